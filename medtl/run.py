"""The run folder and the run context handed to run-event hooks."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medtl.config import Study
from medtl.errors import ConfigError, OutputError
from medtl.runio import atomic_write_json, atomic_write_text

__all__ = ["RunContext", "create_run_dir", "load_run_study", "versions"]

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
        raise OutputError(f"cannot create the run folder {candidate}: {exc.strerror}. "
                          "Set output.dir to a writable folder.") from None
    return candidate


def load_run_study(run_dir: str | Path) -> Study:
    """Read the resolved study of an existing run folder, to resume it.

    The study's ``base_dir`` (the folder that relative paths resolve against) comes
    from run.json, so a run resumes from any working directory.

    Raises:
        ConfigError: the folder is not a medtl run folder, or its run has already completed.
    """
    from medtl.config import recorded_study_defaults, study_from_dict

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    record_path = run_dir / "run.json"
    if not config_path.is_file() or not record_path.is_file():
        raise ConfigError(f"{run_dir} is not a medtl run folder (config.yaml or run.json is missing); "
                          "pass the folder that 'medtl run' printed")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{run_dir}: cannot read the run's config.yaml or run.json: {exc}") from None
    if record.get("status") == "completed":
        raise ConfigError(f"{run_dir}: the run has already completed; there is nothing to resume")
    if not (run_dir / "checkpoints" / "last.pt").is_file():
        raise ConfigError(f"{run_dir}: no complete checkpoint yet (checkpoints/last.pt is missing), because "
                          "the run stopped before its first epoch ended. Start the study again instead.")
    return study_from_dict(recorded_study_defaults(raw), base_dir=record.get("base_dir", "."),
                           source=str(config_path))


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
    """Send medtl's log records to the run log, readable by its owner only like the other outputs."""
    handler = logging.FileHandler(path, encoding="utf-8")
    try:
        os.chmod(path, 0o600)
    except OSError:  # a file system without POSIX modes keeps its default
        pass
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("medtl")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler
