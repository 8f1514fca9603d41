"""Hook specifications: the contract between medtl and its plugins.

Every hook carries the ``medtl_`` prefix. Plugins implement them with
:data:`medtl.hookimpl`. The reference page ``docs/plugins.md`` describes each hook
with an example.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from medtl.run import RunContext

__all__ = ["hookspec"]

hookspec = pluggy.HookspecMarker("medtl")


# ---------------------------------------------------------------------------
# Components. Each hook returns a mapping from a component name to a factory.
# The host merges the mappings of all plugins; two plugins that register the
# same name for the same kind are an error that names both plugins.
# ---------------------------------------------------------------------------


@hookspec
def medtl_register_sources() -> dict[str, Callable[..., Any]]:
    """Register image sources, the readers behind manifest paths.

    A factory takes keyword options and returns an object with
    ``read(path) -> (array, meta)``, where ``array`` is float32 with the channel
    axis first, and ``meta`` is a dict with at least ``spacing``.

    :return: a dict from source name to factory. Results of all plugins are merged.
    """


@hookspec
def medtl_register_transforms() -> dict[str, Callable[..., Any]]:
    """Register augmentation presets.

    A factory is called as ``factory(data_config, **options)`` and returns a list
    of MONAI dictionary transforms that act on the key ``"image"``.

    :return: a dict from preset name to factory. Results of all plugins are merged.
    """


@hookspec
def medtl_register_backbones() -> dict[str, Callable[..., Any]]:
    """Register backbones.

    A factory is called as ``factory(spatial_dims=..., in_channels=..., **options)``
    and returns a ``torch.nn.Module`` that maps ``(B, C, *spatial)`` to its last
    feature map and declares the feature map's channel count as ``out_channels``.

    :return: a dict from backbone name to factory. Results of all plugins are merged.
    """


@hookspec
def medtl_register_poolings() -> dict[str, Callable[..., Any]]:
    """Register poolings that turn a feature map into a feature vector.

    A factory is called as ``factory(in_channels=..., **options)`` and returns a
    ``torch.nn.Module`` mapping ``(B, C, *spatial)`` to ``(B, out_features)``; the
    module declares ``out_features``.

    :return: a dict from pooling name to factory. Results of all plugins are merged.
    """


@hookspec
def medtl_register_strategies() -> dict[str, Callable[..., Any]]:
    """Register adaptation strategies.

    A factory takes the strategy's keyword options from the study file and
    returns a :class:`medtl.strategy.Strategy`.

    :return: a dict from strategy name to factory. Results of all plugins are merged.
    """


@hookspec
def medtl_register_metrics() -> dict[str, Callable[..., Any]]:
    """Register evaluation metrics.

    A metric is called as ``metric(labels, probabilities)`` with integer labels of
    shape ``(n,)`` and class probabilities of shape ``(n, classes)`` and returns a
    float, or ``None`` when it is undefined for that input.

    :return: a dict from metric name to function. Results of all plugins are merged.
    """


@hookspec
def medtl_register_validators() -> dict[str, Callable[..., Any]]:
    """Register label-free model-selection validators.

    A factory takes keyword options and returns an object with
    ``score(outputs) -> float`` (higher is better), where ``outputs`` holds the
    target-site predictions and features of one checkpoint.

    :return: a dict from validator name to factory. Results of all plugins are merged.
    """


# ---------------------------------------------------------------------------
# Run events, for trackers. They are called on rank 0 only, in plugin order.
# ---------------------------------------------------------------------------


@hookspec
def medtl_run_start(run: "RunContext") -> None:
    """Called once a run folder exists, before training starts.

    :param run: the run context, with the resolved config and the run folder.
    """


@hookspec
def medtl_epoch_end(run: "RunContext", epoch: int, metrics: dict[str, float]) -> None:
    """Called after each epoch's validation.

    :param run: the run context.
    :param epoch: the epoch just finished, counted from 1.
    :param metrics: training losses and validation metrics of that epoch.
    """


@hookspec
def medtl_run_end(run: "RunContext", metrics: dict[str, Any], status: str) -> None:
    """Called when a run ends, after evaluation and the report.

    :param run: the run context.
    :param metrics: the content of ``metrics.json``.
    :param status: ``"completed"``, ``"failed"`` or ``"interrupted"``.
    """
