"""Builtin poolings: average, max, generalized mean and covariance poolings.

The covariance poolings ``isqrt-cov`` and ``mpn-cov-eig`` live in
:mod:`medtl_plugins.isqrt_cov`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

import medtl
from medtl_plugins.isqrt_cov import ISqrtCovPool, MPNCovEigPool

__all__ = ["AvgPool", "MaxPool", "GeMPool", "ISqrtCovPool", "MPNCovEigPool"]


class AvgPool(nn.Module):
    """Global average pooling over all spatial axes."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = self.out_features = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(dim=2)


class MaxPool(nn.Module):
    """Global max pooling over all spatial axes."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = self.out_features = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).amax(dim=2)


class GeMPool(nn.Module):
    """Generalized mean pooling, (mean x^p)^(1/p), with a learnable exponent p.

    From "Fine-tuning CNN Image Retrieval with No Human Annotation" (Radenović,
    Tolias and Chum, TPAMI 2019). p = 1 is average pooling and p -> inf max pooling.

    Args:
        in_channels: channels of the feature map.
        p: initial exponent (default 3).
        eps: lower clamp on activations, so that the power is defined (default 1e-6).
        learn_p: whether p is a trained parameter (default True).
    """

    def __init__(self, in_channels: int, p: float = 3.0, eps: float = 1e-6, learn_p: bool = True):
        super().__init__()
        self.in_channels = self.out_features = in_channels
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learn_p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)
        return x.float().clamp(min=self.eps).pow(p).flatten(2).mean(dim=2).pow(1.0 / p).to(x.dtype)


@medtl.hookimpl
def medtl_register_poolings() -> dict[str, Callable[..., Any]]:
    return {"avg": AvgPool, "max": MaxPool, "gem": GeMPool, "isqrt-cov": ISqrtCovPool, "mpn-cov-eig": MPNCovEigPool}
