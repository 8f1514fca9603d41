"""Hook implementations of the example plugin: one backbone, one pooling, one strategy."""

from __future__ import annotations

from typing import Any, Callable

import medtl
from medtl_example.entropy import EntropyMinimization
from medtl_example.networks import AttentionPooling, SmallConvNet


@medtl.hookimpl
def medtl_register_backbones() -> dict[str, Callable[..., Any]]:
    return {"example-convnet": SmallConvNet}


@medtl.hookimpl
def medtl_register_poolings() -> dict[str, Callable[..., Any]]:
    return {"example-attention": AttentionPooling}


@medtl.hookimpl
def medtl_register_strategies() -> dict[str, Callable[..., Any]]:
    return {"example-entropy": EntropyMinimization}
