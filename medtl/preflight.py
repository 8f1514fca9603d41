"""Checks of a study that need the plugins but no data, run before any work starts.

:func:`check_study` runs before the run folder is created and before any image is
read, so that a misspelt component name or a missing weights file fails at once,
with exit code 2, and leaves no half-made run folder behind.
"""

from __future__ import annotations

import logging

from medtl._host import PluginHost, unknown_component_message
from medtl.config import Study
from medtl.errors import ConfigError, did_you_mean
from medtl.manifest import source_column

__all__ = ["check_study", "study_problems", "unknown_trackers"]

logger = logging.getLogger(__name__)


def _component_names(study: Study) -> list[tuple[str, str, str]]:
    """List ``(key path, component kind, name)`` for every component that a study names."""
    names = [
        ("model.backbone.name", "backbone", study.model.backbone.name),
        ("model.pooling.name", "pooling", study.model.pooling.name),
        ("strategy.name", "strategy", study.strategy.name),
        ("transforms.preset", "transform", study.transforms.preset),
    ]
    if study.train.select:
        names.append(("train.select", "validator", study.train.select))
    for source in study.data.sources:
        names.append((f"data.sources.{source}", "source", source))
    for index, metric in enumerate(study.evaluation.metrics):
        names.append((f"evaluation.metrics.{index}", "metric", metric))
    # "loss" is the validation loss, which the engine computes without a metric plugin.
    if study.train.select_metric != "loss":
        names.append(("train.select_metric", "metric", study.train.select_metric))
    return names


def study_problems(study: Study, host: PluginHost) -> list[tuple[str, str]]:
    """Return ``(key path, message)`` for each unknown component name and missing manifest or weights file.

    Component names come from the study and from the source column of a CSV manifest.
    """
    problems = []
    for key, kind, name in _component_names(study):
        valid = host.components(kind)
        if name not in valid:
            problems.append((key, unknown_component_message(kind, name, valid)))

    # A manifest's source column names source plugins too. Reading it reads no image.
    manifest = study.resolve_path(study.data.manifest)
    if not manifest.is_file():
        problems.append(("data.manifest", (
            f"manifest not found: {manifest} (value {study.data.manifest!r}). Set it to an existing CSV or "
            f".npz file, relative to the study file's folder {study.base_dir}")))
    valid_sources = host.components("source")
    for name, rows in source_column(manifest).items():
        if name not in valid_sources:
            where = f"row {rows[0]}" + (f" and {len(rows) - 1} more" if len(rows) > 1 else "")
            problems.append(("data.manifest", f"{manifest}, source column, {where}: "
                             + unknown_component_message("source", name, valid_sources)))

    weights = study.model.backbone.weights
    if weights:
        path = study.resolve_path(weights)
        if not path.is_file():
            problems.append(("model.backbone.weights", (
                f"weights file not found: {path} (value {weights!r}). Set it to a local .pt, .pth or "
                f".safetensors file, relative to the study file's folder {study.base_dir}, or remove it")))
    return [(key, study.override_note(key, text)) for key, text in problems]


def unknown_trackers(study: Study, host: PluginHost) -> list[str]:
    """Return a warning for each name in ``trackers`` that no loaded plugin declares.

    A tracker plugin declares its name in a module-level ``TRACKER`` string, as the
    builtin ``tensorboard`` and ``mlflow`` trackers do. A third-party tracker that does
    not declare it still works, so an unknown name only warns.
    """
    declared = sorted({name for plugin in host.pm.get_plugins()
                       if isinstance(name := getattr(plugin, "TRACKER", None), str)})
    warnings = []
    for name in study.trackers:
        if name in declared:
            continue
        warnings.append(f"trackers lists {name!r}, which no loaded plugin declares, so probably nothing logs to it."
                        f"{did_you_mean(name, declared)} Known trackers: {', '.join(declared) or 'none'}. A third-party tracker "
                        "without a module-level TRACKER name is not listed and can ignore this warning.")
    return warnings


def check_study(study: Study, host: PluginHost) -> None:
    """Raise a :class:`ConfigError` listing every problem that :func:`study_problems` finds.

    Unknown tracker names (see :func:`unknown_trackers`) are logged as warnings.
    """
    for warning in unknown_trackers(study, host):
        logger.warning("%s", warning)
    problems = study_problems(study, host)
    if problems:
        raise ConfigError(f"study {study.name!r} names unknown components or missing files, so nothing "
                          "was run and no run folder was created:", problems)
