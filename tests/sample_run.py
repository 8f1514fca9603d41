"""A tiny trained run of the sample study, trained once per test session and shared.

The evaluate, shift and report tests need a finished run folder. Training one costs
most of their time, so they share this one and never modify it. Commands that
write files run on copies or write to their own output folders.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_STUDY = REPO / "sample_data" / "study.yaml"

#: Overrides that make the sample study train in seconds on a CPU.
TINY = ["train.epochs=1", "train.steps_per_epoch=2", "data.image_size=[32,32]", "evaluation.bootstrap=20",
        "train.device=cpu"]


@lru_cache(maxsize=None)
def trained_sample_run() -> Path:
    """Train the sample study with tiny settings and return its run folder."""
    from medtl.config import load_study
    from medtl.engine import run_study

    root = Path(tempfile.mkdtemp(prefix="medtl-sample-run-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    study = load_study(SAMPLE_STUDY, TINY + [f"output.dir={root}", "output.name=tiny"])
    return run_study(study).run_dir


def copy_run(tmp_path: Path) -> Path:
    """Copy the shared run into ``tmp_path`` so a test may change its files."""
    target = tmp_path / "run"
    shutil.copytree(trained_sample_run(), target)
    return target
