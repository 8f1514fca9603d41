"""TensorBoard tracker, enabled by ``trackers: [tensorboard]`` in the study file.

It logs each epoch's losses and validation metrics, the final metrics and the
run's text outputs (resolved configuration, methods section) to ``RUN_DIR/tensorboard``;
view them with ``tensorboard --logdir RUN_DIR/tensorboard``. It needs the
``tensorboard`` extra: ``pip install 'medtl[tensorboard]'``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import medtl
from medtl.errors import PluginError

logger = logging.getLogger(__name__)

TRACKER = "tensorboard"

# One writer per active run folder; a process may run several studies one after another.
_writers: dict[Path, Any] = {}


def _enabled(run: Any) -> bool:
    return TRACKER in run.study.trackers and run.is_main


@medtl.hookimpl
def medtl_run_start(run: Any) -> None:
    if not _enabled(run):
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise PluginError("trackers: [tensorboard] needs the TensorBoard package. Install it with "
                          "pip install 'medtl[tensorboard]', or remove tensorboard from trackers.") from exc
    log_dir = run.path("tensorboard")
    writer = SummaryWriter(log_dir=str(log_dir))
    config = run.path("config.yaml")
    if config.is_file():
        writer.add_text("config", "```\n" + config.read_text(encoding="utf-8") + "\n```", 0)
    _writers[run.run_dir] = writer
    logger.info("TensorBoard logs go to %s", log_dir)


@medtl.hookimpl
def medtl_epoch_end(run: Any, epoch: int, metrics: dict[str, float]) -> None:
    writer = _writers.get(run.run_dir)
    if writer is None:
        return
    for key, value in metrics.items():
        writer.add_scalar(f"epoch/{key}", value, epoch)
    writer.flush()


@medtl.hookimpl
def medtl_run_end(run: Any, metrics: dict[str, Any], status: str) -> None:
    writer = _writers.pop(run.run_dir, None)
    if writer is None:
        return
    from medtl.report import flatten_numbers

    try:
        for key, value in flatten_numbers(metrics).items():
            writer.add_scalar(f"final/{key}", value, 0)
        methods = run.path("methods.md")
        if methods.is_file():
            writer.add_text("methods", methods.read_text(encoding="utf-8"), 0)
        writer.add_text("status", status, 0)
    finally:
        writer.close()
