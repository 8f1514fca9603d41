"""Typed facades for the component kinds that plugins add.

pluggy's hook calls are untyped: ``medtl.create("backbone", ...)`` returns ``Any``.
The :class:`typing.Protocol` classes below state what medtl expects of each kind, so
an editor or mypy can check a plugin's classes against them. The ``create_*``
functions check at run time that a new component has the members of its protocol,
and return it typed.

A plugin author can annotate a factory's return type with a protocol::

    from medtl.protocols import Pooling

    def make_pooling(in_channels: int, **options: Any) -> Pooling:
        return MyPooling(in_channels, **options)

mypy then reports a missing ``out_features`` at the ``return``. Protocols are
structural, so no plugin class needs to inherit from them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn

from medtl._host import get_host
from medtl.errors import PluginError

if TYPE_CHECKING:
    from medtl.model import Classifier
    from medtl.strategy import StrategyContext

__all__ = [
    "Source",
    "Backbone",
    "Pooling",
    "Strategy",
    "SourceFactory",
    "BackboneFactory",
    "PoolingFactory",
    "StrategyFactory",
    "missing_members",
    "create_source",
    "create_backbone",
    "create_pooling",
    "create_strategy",
]


@runtime_checkable
class Source(Protocol):
    """An image reader behind manifest paths.

    ``read`` returns a float32 array with the channel axis first, shaped
    ``(C, *spatial)``, and a metadata dict with at least ``spacing``, a tuple with
    one positive float per spatial axis. An optional ``affine`` (4x4, voxel indices
    to RAS millimetres as in nibabel) lets ``data.orientation`` reorient the image. A
    file that cannot be read raises :class:`medtl.errors.BadFileError` naming the
    path; a readable file without an image (a DICOM structured report, say) raises
    :class:`medtl.errors.SkippedFile`.
    """

    def read(self, path: str) -> tuple[np.ndarray, dict[str, Any]]: ...


@runtime_checkable
class Backbone(Protocol):
    """A feature extractor: ``(B, in_channels, *spatial)`` to its last feature map.

    The output has ``out_channels`` channels and ``spatial_dims`` spatial axes.
    ``stages`` names its stages in input-to-output order, and ``stage_modules``
    returns the submodules of one stage, so strategies can freeze up to a stage.
    """

    out_channels: int

    @property
    def stages(self) -> Sequence[str]: ...

    def stage_modules(self, stage: str) -> list[nn.Module]: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def train(self, mode: bool = True) -> Any: ...


@runtime_checkable
class Pooling(Protocol):
    """A map from a feature map ``(B, C, *spatial)`` to a feature vector ``(B, out_features)``."""

    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


@runtime_checkable
class Strategy(Protocol):
    """An adaptation strategy; :class:`medtl.strategy.Strategy` implements it.

    ``network`` and ``model`` exist once ``setup`` has run. See the base class for the
    order in which the engine calls the methods.
    """

    uses_target: bool
    network: nn.Module
    model: Classifier

    def setup(self, model: Classifier, context: StrategyContext) -> None: ...

    def parameter_groups(self) -> list[dict[str, Any]]: ...

    def on_epoch_start(self, epoch: int) -> None: ...

    def train(self) -> None: ...

    def eval(self) -> None: ...

    def train_step(self, net: nn.Module, source: dict[str, Any], target: dict[str, Any] | None,
                   progress: float) -> dict[str, torch.Tensor]: ...

    def predict(self, x: torch.Tensor) -> torch.Tensor: ...

    def predict_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def epoch_logs(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


#: ``factory(**options) -> Source``
SourceFactory = Callable[..., Source]
#: ``factory(spatial_dims=..., in_channels=..., **options) -> Backbone``
BackboneFactory = Callable[..., Backbone]
#: ``factory(in_channels=..., **options) -> Pooling``
PoolingFactory = Callable[..., Pooling]
#: ``factory(**options) -> Strategy``
StrategyFactory = Callable[..., Strategy]

# Members that a component has only after a later call (Strategy.setup), so they
# are left out of the run-time check when the component is created.
_SET_LATER = {"network", "model"}

def missing_members(obj: object, protocol: type) -> list[str]:
    """Return the members of ``protocol`` that ``obj`` lacks, sorted.

    Attributes that a component only gets in a later call (``Strategy.network`` and
    ``Strategy.model``, set by ``setup``) are not required.
    """
    names = {n for n in vars(protocol) if not n.startswith("_") or n == "__call__"}
    names |= set(getattr(protocol, "__annotations__", {}))
    return sorted(n for n in names - _SET_LATER if not hasattr(obj, n))


def _checked(obj: Any, protocol: type, kind: str, name: str) -> Any:
    missing = missing_members(obj, protocol)
    if missing:
        plugin = get_host().component_plugin(kind, name)
        raise PluginError(
            f"{kind} {name!r} from plugin {plugin!r} built a {type(obj).__name__} without "
            f"{', '.join(missing)}, which medtl.protocols.{protocol.__name__} requires. "
            "Fix the plugin, or block it with MEDTL_BLOCK_PLUGINS."
        )
    return obj


def create_source(name: str, **options: Any) -> Source:
    """Build a registered source and check it against :class:`Source`."""
    return _checked(get_host().create("source", name, **options), Source, "source", name)


def create_backbone(name: str, spatial_dims: int, in_channels: int, **options: Any) -> Backbone:
    """Build a registered backbone and check it against :class:`Backbone`."""
    backbone = get_host().create("backbone", name, spatial_dims=spatial_dims, in_channels=in_channels, **options)
    return _checked(backbone, Backbone, "backbone", name)


def create_pooling(name: str, in_channels: int, **options: Any) -> Pooling:
    """Build a registered pooling and check it against :class:`Pooling`."""
    return _checked(get_host().create("pooling", name, in_channels=in_channels, **options), Pooling, "pooling", name)


def create_strategy(name: str, **options: Any) -> Strategy:
    """Build a registered strategy and check it against :class:`Strategy`."""
    return _checked(get_host().create("strategy", name, **options), Strategy, "strategy", name)
