"""A conformance kit for plugin components, to call from a plugin's own tests.

Each ``check_*`` function builds a component, runs it on small synthetic input on the
CPU and raises :class:`ConformanceError` (an ``AssertionError``, so pytest reports it
as a test failure) naming the component and the broken rule::

    from medtl.testing import check_backbone, check_pooling, check_strategy
    from my_plugin import MyNet, MyPooling, MyStrategy

    def test_backbone():
        check_backbone(MyNet)

    def test_pooling():
        check_pooling(MyPooling)

    def test_strategy():
        check_strategy(MyStrategy, options={"weight": 0.5})

A component is given as a registered name (looked up in :func:`medtl.get_host`) or as
its factory. medtl's own test suite runs every builtin component through these checks.
"""

from __future__ import annotations

import copy
import io
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from medtl._host import get_host
from medtl.errors import BadFileError, SkippedFile
from medtl.model import Classifier
from medtl.protocols import Backbone, Pooling, Source, Strategy, missing_members
from medtl.strategy import StrategyContext

__all__ = ["ConformanceError", "check_backbone", "check_pooling", "check_strategy", "check_source"]


class ConformanceError(AssertionError):
    """A component breaks a rule of its kind; the message names the component and the rule."""


def _resolve(kind: str, component: str | Callable[..., Any]) -> tuple[Callable[..., Any], str]:
    if isinstance(component, str):
        return get_host().factory(kind, component), f"{kind} {component!r}"
    label = getattr(component, "__qualname__", None) or type(component).__name__
    return component, f"{kind} {label}"


def _fail(label: str, message: str) -> ConformanceError:
    return ConformanceError(f"{label}: {message}")


def _check_members(obj: object, protocol: type, label: str) -> None:
    missing = missing_members(obj, protocol)
    if missing:
        raise _fail(label, f"the built {type(obj).__name__} lacks {', '.join(missing)} "
                           f"(see medtl.protocols.{protocol.__name__})")


def _check_finite(tensor: torch.Tensor, label: str, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise _fail(label, f"{what} contains NaN or infinite values")


# ---------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------


def check_backbone(backbone: str | Callable[..., Any], *, options: Mapping[str, Any] | None = None,
                   spatial_dims: Sequence[int] = (2, 3), in_channels: int = 1, image_size: int = 32,
                   batch_size: int = 2) -> None:
    """Check a backbone factory in each of ``spatial_dims``.

    The rules:

    * the factory takes ``spatial_dims`` and ``in_channels``;
    * the module has the members of :class:`medtl.protocols.Backbone`;
    * ``stages`` is a non-empty list of names whose ``stage_modules`` are submodules
      of the backbone;
    * a batch of ``image_size``-sided images gives a finite
      ``(B, out_channels, *spatial)`` feature map with as many spatial axes as the input;
    * in the first of ``spatial_dims``, gradients reach the parameters of the first stage.

    Args:
        backbone: a registered backbone name or a factory.
        options: extra keyword options for the factory (default: none).
        spatial_dims: the dimensionalities the backbone supports (default 2 and 3).
        in_channels: input channels (default 1).
        image_size: side of the synthetic images (default 32, the smallest input a
            network that downsamples 32 times still maps to a 1-voxel feature map).
        batch_size: images per batch in the first of ``spatial_dims``, where the
            module runs in training mode (default 2, because BatchNorm in training
            mode needs 2); the other dimensionalities use one image.
    """
    factory, base_label = _resolve("backbone", backbone)
    for index, dims in enumerate(spatial_dims):
        label = f"{base_label} ({dims}D)"
        torch.manual_seed(0)
        try:
            module = factory(spatial_dims=dims, in_channels=in_channels, **dict(options or {}))
        except TypeError as exc:
            raise _fail(label, f"the factory does not accept spatial_dims and in_channels: {exc}") from exc
        _check_members(module, Backbone, label)
        if not isinstance(module, nn.Module):
            raise _fail(label, f"the factory returned {type(module).__name__}, not a torch.nn.Module")
        out_channels = module.out_channels
        if not isinstance(out_channels, int) or out_channels < 1:
            raise _fail(label, f"out_channels must be a positive int, got {out_channels!r}")
        _check_stages(module, label)

        # The first dimensionality runs in training mode, for the gradient check. The
        # others check the shape only, in evaluation mode and on one image, which keeps
        # 3D networks fast on a CPU.
        x = torch.rand(batch_size if index == 0 else 1, in_channels, *([image_size] * dims))
        module.train(index == 0)
        with torch.set_grad_enabled(index == 0):
            features = module(x)
        if not isinstance(features, torch.Tensor):
            raise _fail(label, f"forward returned {type(features).__name__}; expected the last feature map "
                               "as one tensor")
        if features.ndim != 2 + dims or features.shape[0] != len(x):
            raise _fail(label, f"forward mapped {tuple(x.shape)} to {tuple(features.shape)}; expected "
                               f"(B, out_channels) followed by {dims} spatial axes")
        if features.shape[1] != out_channels:
            raise _fail(label, f"the feature map has {features.shape[1]} channels but out_channels "
                               f"declares {out_channels}")
        _check_finite(features, label, "the feature map")

        if index == 0:
            _check_backbone_gradients(module, features, label)


def _check_stages(module: nn.Module, label: str) -> None:
    stages = list(getattr(module, "stages"))
    if not stages or not all(isinstance(s, str) for s in stages):
        raise _fail(label, f"stages must be a non-empty list of stage names, got {stages!r}")
    own = {id(m) for m in module.modules()}
    for stage in stages:
        parts = getattr(module, "stage_modules")(stage)
        if not parts:
            raise _fail(label, f"stage_modules({stage!r}) returned no modules")
        foreign = [type(m).__name__ for m in parts if id(m) not in own]
        if foreign:
            raise _fail(label, f"stage_modules({stage!r}) returned modules that are not part of the "
                               f"backbone: {', '.join(foreign)}")


def _check_backbone_gradients(module: nn.Module, features: torch.Tensor, label: str) -> None:
    module.zero_grad(set_to_none=True)
    features.float().pow(2).mean().backward()
    for name, param in module.named_parameters():
        if param.grad is not None and not torch.isfinite(param.grad).all():
            raise _fail(label, f"the gradient of parameter {name} contains NaN or infinite values")
    first_stage = getattr(module, "stages")[0]
    params = [p for m in getattr(module, "stage_modules")(first_stage) for p in m.parameters() if p.requires_grad]
    if params and not any(p.grad is not None and p.grad.abs().sum() > 0 for p in params):
        raise _fail(label, f"no gradient reaches the parameters of the first stage {first_stage!r}; "
                           "does forward detach its input or an intermediate tensor?")
    module.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------
# Poolings
# ---------------------------------------------------------------------------


def check_pooling(pooling: str | Callable[..., Any], *, options: Mapping[str, Any] | None = None,
                  in_channels: int = 8, spatial_dims: Sequence[int] = (2, 3),
                  sizes: Sequence[int] = (4, 3), batch_size: int = 2) -> None:
    """Check a pooling factory on feature maps of each dimensionality and size.

    The rules:

    * the factory takes ``in_channels``;
    * the module has the members of :class:`medtl.protocols.Pooling`, with a positive
      int ``out_features``;
    * a feature map ``(B, in_channels, *spatial)`` gives a finite ``(B, out_features)``
      output for every spatial size;
    * gradients of the output reach the input, and every trainable parameter of the
      pooling gets a finite gradient.

    Args:
        pooling: a registered pooling name or a factory.
        options: extra keyword options for the factory (default: none).
        in_channels: channels of the synthetic feature maps (default 8).
        spatial_dims: the dimensionalities to try (default 2 and 3).
        sizes: sides of the synthetic feature maps (default 4 and 3).
        batch_size: feature maps per batch (default 2).
    """
    factory, label = _resolve("pooling", pooling)
    torch.manual_seed(0)
    try:
        module = factory(in_channels=in_channels, **dict(options or {}))
    except TypeError as exc:
        raise _fail(label, f"the factory does not accept in_channels: {exc}") from exc
    _check_members(module, Pooling, label)
    if not isinstance(module, nn.Module):
        raise _fail(label, f"the factory returned {type(module).__name__}, not a torch.nn.Module")
    out_features = module.out_features
    if not isinstance(out_features, int) or out_features < 1:
        raise _fail(label, f"out_features must be a positive int, got {out_features!r}")

    module.train()
    for dims in spatial_dims:
        for size in sizes:
            case = f"{label} ({dims}D, {size}-sided feature map)"
            # Post-ReLU feature maps are non-negative; a small offset keeps them positive.
            x = (torch.rand(batch_size, in_channels, *([size] * dims)) + 0.1).requires_grad_(True)
            module.zero_grad(set_to_none=True)
            out = module(x)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (batch_size, out_features):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise _fail(case, f"output is {shape}; expected ({batch_size}, out_features={out_features})")
            _check_finite(out, case, "the output")
            if not out.requires_grad:
                raise _fail(case, "no gradient flows back to the feature map: the output does not require grad")
            # Random output weights, so that gradients of a normalized output do not cancel out.
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            (out.float() * weights).sum().backward()
            if x.grad is None or not x.grad.abs().sum() > 0:
                raise _fail(case, "no gradient flows back to the feature map")
            _check_finite(x.grad, case, "the gradient of the feature map")
            for name, param in module.named_parameters():
                if not param.requires_grad:
                    continue
                if param.grad is None:
                    raise _fail(case, f"trainable parameter {name} gets no gradient")
                _check_finite(param.grad, case, f"the gradient of parameter {name}")


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------


class _TinyBackbone(nn.Module):
    """Two-stage convolutional backbone, small enough for conformance runs."""

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, width: int = 8):
        super().__init__()
        conv: Any = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm: Any = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        self.stem = nn.Sequential(conv(in_channels, width, 3, padding=1), norm(width), nn.ReLU())
        self.block = nn.Sequential(conv(width, 2 * width, 3, stride=2, padding=1), norm(2 * width), nn.ReLU())
        self.out_channels = 2 * width
        self.stages = ["stem", "block"]

    def stage_modules(self, stage: str) -> list[nn.Module]:
        return [getattr(self, stage)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x))


class _TinyPooling(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.out_features = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(dim=2)


def _tiny_classifier(num_classes: int, spatial_dims: int, seed: int) -> Classifier:
    torch.manual_seed(seed)
    backbone = _TinyBackbone(spatial_dims)
    return Classifier(backbone, _TinyPooling(backbone.out_channels), num_classes)


def _batch(batch_size: int, image_size: int, spatial_dims: int, num_classes: int, site: str,
           labeled: bool, generator: torch.Generator) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "image": torch.rand(batch_size, 1, *([image_size] * spatial_dims), generator=generator),
        "row": torch.arange(batch_size),
        "site": [site] * batch_size,
    }
    if labeled:
        batch["label"] = torch.arange(batch_size) % num_classes
    return batch


def check_strategy(strategy: str | Callable[..., Any], *, options: Mapping[str, Any] | None = None,
                   num_classes: int = 3, steps: int = 2, spatial_dims: int = 2, image_size: int = 16,
                   batch_size: int = 6) -> None:
    """Check a strategy factory by training a tiny classifier for a few steps.

    The rules:

    * the strategy has the members of :class:`medtl.protocols.Strategy`;
    * ``setup`` builds ``network``;
    * ``parameter_groups`` lists parameters of the network, each at most once;
    * ``train_step`` calls ``net`` exactly once and returns a dict of finite
      one-element tensors with a ``"loss"`` that has a gradient;
    * an optimizer step over ``parameter_groups`` changes the network;
    * ``predict`` and ``predict_with_features`` give finite ``(B, num_classes)``
      logits and ``(B, feature_dim)`` features;
    * ``epoch_logs`` returns numbers;
    * the state survives ``torch.save`` and ``torch.load(weights_only=True)`` into a
      fresh strategy, which then predicts the same logits.

    Target batches, given when ``uses_target`` is true, have no ``"label"`` key.

    Args:
        strategy: a registered strategy name or a factory.
        options: keyword options for the factory (default: none).
        num_classes: classes of the synthetic task (default 3).
        steps: training steps (default 2).
        spatial_dims: 2 or 3 (default 2).
        image_size: side of the synthetic images (default 16).
        batch_size: images per batch (default 6).
    """
    factory, label = _resolve("strategy", strategy)
    context = StrategyContext(num_classes=num_classes, epochs=1, steps_per_epoch=steps, weight_decay=1e-4,
                              lr=1e-2, device=torch.device("cpu"), target_sites=["target"])
    built = factory(**dict(options or {}))
    _check_members(built, Strategy, label)
    built.setup(_tiny_classifier(num_classes, spatial_dims, seed=0), copy.deepcopy(context))
    network = getattr(built, "network", None)
    if not isinstance(network, nn.Module):
        raise _fail(label, "setup did not set network to a torch.nn.Module")

    optimizer = _strategy_optimizer(built, network, label)
    before = [p.detach().clone() for p in network.parameters()]
    generator = torch.Generator().manual_seed(0)
    calls = [0]

    def count_call(module: nn.Module, args: Any) -> None:
        calls[0] += 1

    handle = network.register_forward_pre_hook(count_call)
    try:
        built.on_epoch_start(1)
        for step in range(steps):
            built.train()
            source = _batch(batch_size, image_size, spatial_dims, num_classes, "source", True, generator)
            target = (_batch(batch_size, image_size, spatial_dims, num_classes, "target", False, generator)
                      if built.uses_target else None)
            calls[0] = 0
            losses = built.train_step(network, source, target, step / max(1, steps))
            _check_losses(losses, calls[0], f"{label} (step {step + 1})")
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
    finally:
        handle.remove()
    if all(torch.equal(a, b.detach()) for a, b in zip(before, network.parameters())):
        raise _fail(label, "an optimizer step over parameter_groups() changed no parameter of the network")

    logs = built.epoch_logs()
    if not isinstance(logs, dict) or not all(_is_number(v) for v in logs.values()):
        raise _fail(label, f"epoch_logs must return a dict of numbers, got {logs!r}")

    x = torch.rand(batch_size, 1, *([image_size] * spatial_dims), generator=generator)
    built.eval()
    logits = _check_predictions(built, x, num_classes, label)
    _check_restore(factory, options, built, x, logits, num_classes, spatial_dims, context, label)


def _is_number(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _strategy_optimizer(built: Any, network: nn.Module, label: str) -> torch.optim.Optimizer:
    groups = [dict(g) for g in built.parameter_groups()]
    seen: set[int] = set()
    for group in groups:
        group.pop("lr_scale", None)
        group["params"] = list(group["params"])
        for param in group["params"]:
            if id(param) in seen:
                raise _fail(label, "parameter_groups() lists a parameter twice")
            seen.add(id(param))
    if not seen:
        raise _fail(label, "parameter_groups() lists no parameters")
    unknown = seen - {id(p) for p in network.parameters()}
    if unknown:
        raise _fail(label, f"parameter_groups() lists {len(unknown)} parameters that are not in network; "
                           "register extra modules as attributes of the module that build_network returns")
    return torch.optim.SGD(groups, lr=0.05)


def _check_losses(losses: Any, calls: int, label: str) -> None:
    if calls != 1:
        raise _fail(label, f"train_step called net {calls} times; it must call it exactly once per step, "
                           "so that DistributedDataParallel can wrap it")
    if not isinstance(losses, dict) or "loss" not in losses:
        raise _fail(label, f"train_step must return a dict with the key 'loss', got {losses!r}")
    for name, value in losses.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise _fail(label, f"loss {name!r} must be a one-element tensor, got {value!r}")
        _check_finite(value, label, f"loss {name!r}")
    if not losses["loss"].requires_grad:
        raise _fail(label, "the 'loss' tensor has no gradient; is it detached?")


def _check_predictions(built: Any, x: torch.Tensor, num_classes: int, label: str) -> torch.Tensor:
    logits = built.predict(x)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (len(x), num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise _fail(label, f"predict returned {shape}; expected ({len(x)}, {num_classes})")
    _check_finite(logits, label, "predict's logits")
    pair = built.predict_with_features(x)
    if not isinstance(pair, tuple) or len(pair) != 2:
        raise _fail(label, "predict_with_features must return (logits, features)")
    feature_logits, features = pair
    if tuple(feature_logits.shape) != (len(x), num_classes) or features.ndim != 2 or len(features) != len(x):
        raise _fail(label, f"predict_with_features returned shapes {tuple(feature_logits.shape)} and "
                           f"{tuple(features.shape)}; expected ({len(x)}, {num_classes}) and (B, feature_dim)")
    _check_finite(features, label, "predict_with_features' features")
    return logits


def _check_restore(factory: Callable[..., Any], options: Mapping[str, Any] | None, built: Any, x: torch.Tensor,
                   logits: torch.Tensor, num_classes: int, spatial_dims: int, context: StrategyContext,
                   label: str) -> None:
    buffer = io.BytesIO()
    torch.save(built.state_dict(), buffer)
    buffer.seek(0)
    try:
        state = torch.load(buffer, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickling error says which type is not allowed
        raise _fail(label, f"state_dict() cannot be loaded with torch.load(weights_only=True), as medtl "
                           f"loads checkpoints: {exc}") from exc
    restored = factory(**dict(options or {}))
    # A different seed, so that only load_state_dict can make the predictions match.
    restored.setup(_tiny_classifier(num_classes, spatial_dims, seed=1), copy.deepcopy(context))
    restored.load_state_dict(state)
    restored.eval()
    again = restored.predict(x)
    if not torch.allclose(again, logits, atol=1e-5):
        diff = (again - logits).abs().max().item()
        raise _fail(label, f"a strategy restored from state_dict() predicts different logits "
                           f"(max difference {diff:.3g})")


# ---------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------


def check_source(source: str | Callable[..., Any], paths: Sequence[str | Path], *, spatial_dims: int,
                 suffix: str, options: Mapping[str, Any] | None = None, channels: int | None = None,
                 shape: Sequence[int] | None = None, meta_keys: Sequence[str] = ("spacing",),
                 address: Callable[[str], str] = str) -> None:
    """Check a source on readable files and on a missing and a corrupt one.

    The rules:

    * the source has the members of :class:`medtl.protocols.Source`;
    * each of ``paths`` reads as a finite float32 array ``(C, *spatial)`` with
      ``spatial_dims`` spatial axes, and with the declared ``channels`` and spatial
      ``shape`` when they are given;
    * the metadata is a dict with ``meta_keys`` and a positive ``spacing`` value per
      spatial axis;
    * a missing file and a file of garbage bytes raise
      :class:`medtl.errors.BadFileError`, not :class:`~medtl.errors.SkippedFile`,
      with a message that names the file.

    Args:
        source: a registered source name or a factory.
        paths: files the source can read (as written in a manifest).
        spatial_dims: spatial axes the images of ``paths`` have.
        suffix: file suffix the source reads, such as ``".dcm"``; the missing and
            corrupt files get it.
        options: keyword options for the factory (default: none).
        channels: channels the images of ``paths`` have (default: not checked).
        shape: spatial shape the images of ``paths`` have (default: not checked).
        meta_keys: keys every metadata dict must have (default ``("spacing",)``).
        address: turns a file name into the path given to ``read``, for sources
            whose paths point into a file, such as ``lambda f: f + "#train/0"``.
    """
    factory, label = _resolve("source", source)
    reader = factory(**dict(options or {}))
    _check_members(reader, Source, label)
    if not paths:
        raise ValueError("check_source needs at least one readable path in paths")
    for path in paths:
        case = f"{label} reading {Path(str(path)).name}"
        result = reader.read(str(path))
        if not isinstance(result, tuple) or len(result) != 2:
            raise _fail(case, "read must return a tuple (array, meta)")
        array, meta = result
        _check_array(array, case, spatial_dims, channels, shape)
        _check_meta(meta, case, spatial_dims, meta_keys)

    with tempfile.TemporaryDirectory(prefix="medtl-check-source-") as tmp:
        missing = str(Path(tmp) / f"missing{suffix}")
        _expect_bad_file(reader, address(missing), missing, f"{label} reading a missing file")
        corrupt = Path(tmp) / f"corrupt{suffix}"
        corrupt.write_bytes(b"this is not an image file\n" * 40)
        _expect_bad_file(reader, address(str(corrupt)), str(corrupt), f"{label} reading a corrupt file")


def _check_array(array: Any, case: str, spatial_dims: int, channels: int | None,
                 shape: Sequence[int] | None) -> None:
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        kind = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise _fail(case, f"the image must be a float32 numpy array, got {kind}")
    if array.ndim != spatial_dims + 1:
        raise _fail(case, f"the image has shape {array.shape}; expected (C, *spatial) with "
                          f"{spatial_dims} spatial axes")
    if channels is not None and array.shape[0] != channels:
        raise _fail(case, f"the image has {array.shape[0]} channels (axis 0), expected {channels}")
    if shape is not None and tuple(array.shape[1:]) != tuple(shape):
        raise _fail(case, f"the image has spatial shape {array.shape[1:]}, expected {tuple(shape)}")
    if not np.isfinite(array).all():
        raise _fail(case, "the image contains NaN or infinite values")


def _check_meta(meta: Any, case: str, spatial_dims: int, meta_keys: Sequence[str]) -> None:
    if not isinstance(meta, dict):
        raise _fail(case, f"the metadata must be a dict, got {type(meta).__name__}")
    absent = [k for k in meta_keys if k not in meta]
    if absent:
        raise _fail(case, f"the metadata lacks {', '.join(absent)}")
    _check_affine(meta.get("affine"), case)
    spacing = meta.get("spacing")
    if spacing is None:
        return
    values = list(spacing)
    if len(values) != spatial_dims or not all(math.isfinite(float(v)) and float(v) > 0 for v in values):
        raise _fail(case, f"spacing must hold {spatial_dims} positive numbers, got {spacing!r}")


def _check_affine(affine: Any, case: str) -> None:
    # data.orientation reorients every image by its affine, so a malformed one fails each read.
    if affine is None:
        return
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise _fail(case, f"meta['affine'] must be a finite 4x4 matrix, got shape {matrix.shape}")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise _fail(case, "meta['affine'] is singular (zero or parallel voxel axes), so data.orientation cannot "
                          "reorient the image; leave 'affine' out when the geometry is unknown")


def _expect_bad_file(reader: Any, path: str, file: str, case: str) -> None:
    try:
        reader.read(path)
    except SkippedFile as exc:
        raise _fail(case, f"raised SkippedFile ({exc}); SkippedFile is for readable files without an "
                          "image, so an unreadable file must raise BadFileError") from exc
    except BadFileError as exc:
        if file not in str(exc):
            raise _fail(case, f"the BadFileError message {str(exc)!r} does not name the file {file}") from exc
        return
    except Exception as exc:  # noqa: BLE001 - any other type breaks the rule, and is reported
        raise _fail(case, f"raised {type(exc).__name__} ({exc}); raise medtl.errors.BadFileError(path, "
                          "reason) so that the loader can report or skip the file") from exc
    raise _fail(case, "read returned without raising BadFileError")
