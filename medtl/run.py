"""The run folder and the run context handed to run-event hooks."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medtl.config import Study
from medtl.runio import atomic_write_json, atomic_write_text

__all__ = ["RunContext", "create_run_dir", "versions"]

logger = logging.getLogger(__name__)


@dataclass
class RunContext:
    """A run in progress: its resolved study, folder, plugin host and record."""

    study: Study
    run_dir: Path
    host: Any
    record: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    def save_record(self) -> None:
        if self.is_main:
            atomic_write_json(self.path("run.json"), self.record)


def create_run_dir(study: Study) -> Path:
    """Create a new, uniquely named run folder under ``output.dir``.

    ``output.dir`` is relative to the current directory, like the outputs of most
    command-line tools; the other paths of a study resolve against the study file.
    """
    root = Path(study.output.dir).expanduser()
    name = study.output.name or f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate = root / name
    suffix = 1
    while candidate.exists():
        suffix += 1
        candidate = root / f"{name}-{suffix}"
    try:
        (candidate / "checkpoints").mkdir(parents=True)
    except OSError as exc:
        from medtl.errors import ConfigError

        raise ConfigError(f"cannot create the run folder {candidate}: {exc.strerror}. "
                          "Set output.dir to a writable folder.") from None
    return candidate


def write_resolved_config(study: Study, path: Path) -> None:
    text = yaml.safe_dump(study.to_dict(), sort_keys=False)
    atomic_write_text(path, f"# Resolved study; base_dir: {study.base_dir}\n" + text)


def versions(host: Any = None) -> dict[str, Any]:
    """Return the versions that make a run reproducible."""
    import monai
    import numpy
    import torch

    import medtl

    out: dict[str, Any] = {
        "medtl": medtl.__version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if host is not None:
        out["plugins"] = host.plugin_versions()
    return out


def attach_log_file(path: Path) -> logging.Handler:
    """Send medtl's log records to the run log."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("medtl")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler
