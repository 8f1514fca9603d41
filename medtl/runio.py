"""Atomic file writes: write to a temporary file in the same folder, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write_text", "atomic_write_bytes", "atomic_write_json", "atomic_save"]


def _atomic(path: str | Path, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic(path, lambda fh: fh.write(text), "w")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(path, lambda fh: fh.write(data), "wb")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def atomic_save(path: str | Path, obj: Any) -> None:
    """Save a torch object atomically, so a crash never leaves a half-written checkpoint."""
    import torch

    _atomic(path, lambda fh: torch.save(obj, fh), "wb")
