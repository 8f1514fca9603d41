"""Loading starting weights from local files, safely.

Only tensors are ever loaded: ``torch.load(weights_only=True)`` or safetensors, with
no fallback to unpickling arbitrary objects.

Supported layouts, recognized from their keys:

* a plain state dict of the backbone, as written by ``backbone.state_dict()``;
* a medtl checkpoint ``{"model": Classifier.state_dict()}`` from an earlier run
  (keys ``backbone.*``, ``pooling.*`` and ``head.*``), so that one stage's result
  starts the next;
* a MedicalNet 3D ResNet (Chen, Ma and Zheng, "Med3D", 2019), saved from
  ``DataParallel`` as ``{"state_dict": {"module.conv1.weight": ...}}`` with a
  segmentation head ``conv_seg``;
* a torchvision-style ResNet with its classifier ``fc``.

MedicalNet and torchvision use the same layer names as MONAI's ResNet (``conv1``,
``bn1``, ``layer1``..``layer4``, ``downsample.0`` and ``downsample.1``), so mapping them
means stripping the ``module.``, ``model.`` and ``backbone.`` prefixes and dropping
the heads. The one difference is that their shortcut convolutions have no bias while
MONAI's ResNet has one by default. A missing shortcut bias is set to zero, which is
the same function, and the load report lists it under ``zero_filled``.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medtl.errors import ConfigError

__all__ = [
    "read_state_dict",
    "load_tensors_only",
    "load_backbone_weights",
    "adapt_input_channels",
    "map_keys",
    "detect_format",
    "LoadReport",
]

logger = logging.getLogger(__name__)

_PREFIXES = ("module.", "model.", "backbone.")
#: Heads that are never part of a backbone: medtl's pooling and classifier, the
#: classifier of torchvision ResNets and the segmentation head of MedicalNet.
_HEAD_PREFIXES = ("head.", "pooling.", "fc.", "conv_seg.")
#: How many names of each kind the report keeps.
_REPORT_NAMES = 5


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.pt``, ``.pth`` or ``.safetensors`` file.

    medtl checkpoints (with a ``"model"`` entry) and files that wrap their weights
    in ``"state_dict"`` are unwrapped.

    Raises:
        ConfigError: the file is missing, contains anything but tensors and plain
            containers, or is not a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path} (model.backbone.weights)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError, reported in one line
            logger.debug("reading %s with safetensors failed", path, exc_info=True)
            raise ConfigError(f"{path}: not a valid .safetensors file ({type(exc).__name__}: "
                              f"{_first_sentence(str(exc))}). Convert the weights again or pass a .pt "
                              "or .pth state dict.") from None
    obj = load_tensors_only(path, "weights", "Re-save only the tensors, for example with "
                            "torch.save(model.state_dict(), path), or convert the file to .safetensors.")
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: contains no state dict: expected a dict of tensors, found an object of "
                          f"type {type(obj).__name__}. Save model.state_dict() instead of the whole object.")
    other = next((key for key, value in obj.items() if not isinstance(value, torch.Tensor)), None)
    if other is not None:
        raise ConfigError(f"{path}: contains no state dict: expected a dict of tensors, but entry {other!r} "
                          f"has type {type(obj[other]).__name__}. Save model.state_dict(), or a dict with the "
                          "state dict under 'state_dict' or 'model'.")
    return obj


#: The name of the object that weights-only unpickling rejects, in torch's message.
_REJECTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _first_sentence(text: str) -> str:
    sentence = text.strip().split("\n", 1)[0].split(". ", 1)[0]
    return sentence if len(sentence) <= 160 else sentence[:157] + "..."


def load_tensors_only(path: Path, purpose: str, remedy: str, map_location: str | torch.device = "cpu") -> Any:
    """Read a torch file with ``weights_only=True`` and turn any failure into a one-line ConfigError.

    The message names the file and states whether it contains pickled objects other
    than tensors (then it ends with ``remedy``) or is no intact torch file at all.
    torch's own message, several paragraphs long, is logged at DEBUG level only.

    Args:
        path: the file.
        purpose: what the file should be, such as ``"weights"`` or ``"a medtl checkpoint"``.
        remedy: the sentence that explains the user what to do about unsafe content.
        map_location: passed to ``torch.load``.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {purpose}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on foreign or damaged files
        logger.debug("torch.load(%s, weights_only=True) failed", path, exc_info=True)
        rejected = _REJECTED_GLOBAL.search(str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
        if rejected is not None:
            raise ConfigError(
                f"{path}: cannot be loaded safely as {purpose}: it contains a pickled {rejected.group(1)}, "
                "and medtl loads only tensors and plain containers (torch.load with weights_only=True) "
                f"because unpickling other objects can run code. {remedy}"
            ) from None
        raise ConfigError(
            f"{path}: cannot be loaded as {purpose}: it is not a file written by torch.save, or it is truncated "
            f"or corrupt (torch.load raised {type(exc).__name__}; run with -v to see torch's message)."
        ) from None


class LoadReport(dict):
    """Counts and first names of loaded, missing and unexpected tensors, as a plain dict.

    Keys: ``path``, ``format``, ``loaded`` (a count), ``loaded_names``, ``missing``,
    ``unexpected``, ``zero_filled`` (name lists, the first few of each) and their
    counts ``n_missing``, ``n_unexpected``, ``n_zero_filled``, and ``adapted_channels``
    (``[from, to]`` when the input convolution was adapted, else None).
    """

    def summary(self) -> str:
        text = (f"{self['loaded']} tensors loaded, {self['n_missing']} missing, "
                f"{self['n_unexpected']} unexpected")
        if self["n_zero_filled"]:
            text += f", {self['n_zero_filled']} shortcut biases set to zero"
        if self["adapted_channels"]:
            text += f"; input channels adapted {self['adapted_channels'][0]} -> {self['adapted_channels'][1]}"
        for key in ("missing", "unexpected"):
            if self[key]:
                text += f"; first {key}: {', '.join(self[key])}"
        return text


def detect_format(state: dict[str, torch.Tensor]) -> str:
    """Name the layout of a raw state dict: medtl, medicalnet, torchvision or plain."""
    keys = list(state)
    if any(k.startswith(("backbone.", "model.backbone.")) for k in keys):
        return "medtl"
    if any(k.split(".", 1)[-1].startswith("conv_seg.") or k.startswith("conv_seg.") for k in keys):
        return "medicalnet"
    if any(k in ("fc.weight", "module.fc.weight") for k in keys):
        return "torchvision"
    return "plain"


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def map_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a state dict in any supported layout onto backbone names.

    Strips the ``module.``, ``model.`` and ``backbone.`` prefixes (repeatedly, so that
    ``module.backbone.`` goes too) and drops classifier and segmentation heads.
    """
    out = {}
    for key, value in state.items():
        key = _strip_prefixes(key)
        if not key.startswith(_HEAD_PREFIXES):
            out[key] = value
    return out


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt the filters of an input convolution ``(out, c, *kernel)`` to ``in_channels``.

    Every new input channel gets the sum of the old filters over their channels,
    divided by ``in_channels``. So 3 to 1 sums RGB filters, 1 to 3 repeats the filter
    and scales it by 1/3, and in both cases an input with the same values on every
    channel gives the same response as before.
    """
    if weight.shape[1] == in_channels:
        return weight
    summed = weight.sum(dim=1, keepdim=True)
    repeats = (1, in_channels) + (1,) * (weight.dim() - 2)
    return (summed / in_channels).repeat(repeats)


def _input_conv_key(own: dict[str, torch.Tensor]) -> str | None:
    """Return the name of the first convolution weight, the one applied to the input."""
    for key, value in own.items():
        if key.endswith("weight") and value.dim() in (4, 5):
            return key
    return None


def load_backbone_weights(backbone: nn.Module, path: str | Path, strict: bool = False) -> LoadReport:
    """Load a weights file into a backbone and log a load report.

    The input convolution is adapted when only its channel count differs (see
    :func:`adapt_input_channels`).

    Raises:
        ConfigError: a tensor's shape differs from the backbone's, or ``strict`` is set
            and tensors are missing or unexpected.
    """
    raw = read_state_dict(path)
    source_format = detect_format(raw)
    state = map_keys(raw)
    own = backbone.state_dict()

    # input channels: adapt the first convolution when only dimension 1 differs
    adapted: list[int] | None = None
    first = _input_conv_key(own)
    if first is not None and first in state:
        theirs, mine = state[first].shape, own[first].shape
        if theirs != mine and theirs[:1] == mine[:1] and theirs[2:] == mine[2:]:
            state[first] = adapt_input_channels(state[first], mine[1])
            adapted = [int(theirs[1]), int(mine[1])]

    # shapes must match everywhere else
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ConfigError(
                f"{path}: layer {key} has shape {tuple(value.shape)} in the file but "
                f"{tuple(own[key].shape)} in the backbone; check model.backbone.name, its options "
                "and data.channels"
            )

    # MedicalNet and torchvision shortcuts have no bias; zero is the same function
    zero_filled = []
    for key in sorted(set(own) - set(state)):
        if key.endswith("downsample.0.bias") and key[: -len("bias")] + "weight" in state:
            state[key] = torch.zeros_like(own[key])
            zero_filled.append(key)

    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise ConfigError(
            f"{path}: strict loading failed: {len(missing)} missing, {len(unexpected)} unexpected "
            f"(first missing: {missing[:_REPORT_NAMES]}, first unexpected: {unexpected[:_REPORT_NAMES]}); "
            "set model.backbone.strict=false to load what matches"
        )
    loaded = [k for k in own if k in state]
    backbone.load_state_dict({k: state[k] for k in loaded}, strict=False)

    report = LoadReport(
        path=str(path), format=source_format, loaded=len(loaded) - len(zero_filled),
        loaded_names=[k for k in loaded if k not in zero_filled][:_REPORT_NAMES],
        missing=missing[:_REPORT_NAMES], n_missing=len(missing),
        unexpected=unexpected[:_REPORT_NAMES], n_unexpected=len(unexpected),
        zero_filled=zero_filled[:_REPORT_NAMES], n_zero_filled=len(zero_filled),
        adapted_channels=adapted,
    )
    logger.info("loaded %s weights from %s: %s", source_format, Path(path).name, report.summary())
    return report

