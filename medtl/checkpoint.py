"""Training checkpoints: what a resumed run needs, saved so that only tensors are loaded back.

A checkpoint is a dict of tensors and plain Python values (numbers, strings, lists,
dicts, None), so ``torch.load(path, weights_only=True)`` reads it and no pickled
object is ever run. The random number generator states of torch, NumPy and Python
are stored in that form too. Checkpoints are written to a temporary file and
renamed into place, so a crash or a full disk never leaves a half-written
``last.pt`` behind.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtl.errors import ConfigError, OutputError
from medtl.runio import atomic_save
from medtl.weights import load_tensors_only

__all__ = ["CHECKPOINT_FORMAT", "capture_rng_state", "restore_rng_state", "save_checkpoint", "load_checkpoint"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "medtl-checkpoint-2"


def capture_rng_state() -> dict[str, Any]:
    """Return the global RNG states of torch (and CUDA), NumPy and Python as tensors and plain values."""
    np_state: Any = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "algorithm": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global RNG states saved by :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state((
        np_state["algorithm"],
        np_state["keys"].numpy().astype(np.uint32),
        np_state["pos"],
        np_state["has_gauss"],
        np_state["cached_gaussian"],
    ))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(int(v) for v in py_state["internal"].tolist()),
                     py_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning("checkpoint has CUDA RNG states for %d devices but %d are visible; "
                           "CUDA random draws will differ from the interrupted run",
                           len(cuda_states), torch.cuda.device_count())


def save_checkpoint(path: Path, state: dict[str, Any], run_dir: Path) -> None:
    """Write a checkpoint atomically.

    Raises:
        OutputError: the file could not be written (disk full, no permission). The
            previous file at ``path`` is left as it was.
    """
    try:
        atomic_save(path, state)
    except OSError as exc:
        raise OutputError(
            f"cannot write the checkpoint {path}: {exc.strerror or exc}. The previous checkpoint "
            f"is intact; free disk space or fix permissions, then continue with "
            f"'medtl run --resume {run_dir}'."
        ) from exc


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; there is no fallback to full unpickling.

    Raises:
        ConfigError: the file is missing, is not a medtl checkpoint, or holds objects
            other than tensors and plain values (a crafted or foreign pickle).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}. The run has no complete checkpoint to resume from.")
    state = load_tensors_only(path, "a medtl checkpoint", "Resume only from checkpoints that medtl wrote.",
                              map_location=map_location)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"{path}: not a resumable medtl checkpoint (format {found!r}, "
                          f"expected {CHECKPOINT_FORMAT!r})")
    return state
