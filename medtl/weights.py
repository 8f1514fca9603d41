"""Loading starting weights from local files, safely.

Only tensors are ever loaded: ``torch.load(weights_only=True)`` or safetensors, with
no fallback to unpickling arbitrary objects.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medtl.errors import ConfigError

__all__ = ["read_state_dict", "load_backbone_weights", "LoadReport"]

logger = logging.getLogger(__name__)

_PREFIXES = ("module.", "model.", "backbone.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.pt``, ``.pth`` or ``.safetensors`` file.

    medtl checkpoints (with a ``"model"`` entry) and files that wrap their weights
    in ``"state_dict"`` are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path} (model.backbone.weights)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise ConfigError(
            f"{path}: cannot be loaded safely as weights: {exc}. medtl loads only tensors "
            "(torch.load with weights_only=True); re-save the file as a plain state dict or safetensors."
        ) from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return obj


class LoadReport(dict):
    """Counts and first names of loaded, missing and unexpected tensors."""

    def summary(self) -> str:
        parts = [f"{self['loaded']} tensors loaded", f"{len(self['missing'])} missing", f"{len(self['unexpected'])} unexpected"]
        text = ", ".join(parts)
        for key in ("missing", "unexpected"):
            if self[key]:
                text += f"; first {key}: {', '.join(self[key][:5])}"
        return text


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def load_backbone_weights(backbone: nn.Module, path: str | Path, strict: bool = False) -> LoadReport:
    """Load a weights file into a backbone and log a load report.

    Raises:
        ConfigError: a tensor's shape differs from the backbone's, or ``strict`` is set
            and tensors are missing or unexpected.
    """
    state = _strip_prefixes(read_state_dict(path))
    own = backbone.state_dict()
    # Heads of medtl checkpoints and classifiers are not part of the backbone.
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "pooling.", "fc."))}
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ConfigError(
                f"{path}: layer {key} has shape {tuple(value.shape)} in the file but "
                f"{tuple(own[key].shape)} in the backbone; check model.backbone.name and data.channels"
            )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise ConfigError(f"{path}: strict loading failed: {len(missing)} missing, {len(unexpected)} unexpected "
                          f"(first missing: {missing[:5]}, first unexpected: {unexpected[:5]})")
    backbone.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    report = LoadReport(loaded=len(set(state) & set(own)), missing=missing, unexpected=unexpected, path=str(path))
    logger.info("loaded weights from %s: %s", Path(path).name, report.summary())
    return report
