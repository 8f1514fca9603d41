"""Tiny studies for the engine tests: a small CNN without BatchNorm and a synthetic site.

The test modules import this file by name; pytest puts ``tests/`` on ``sys.path``.
Subprocesses (torchrun, the SIGKILL test) get the folder through ``PYTHONPATH``.
"""

from __future__ import annotations

import csv
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import medtl
from medtl.config import study_from_dict
from medtl_plugins.finetune import FineTune

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


class TinyCNN(nn.Module):
    """Two convolutions and no normalization, so that DDP replicas match a single process exactly."""

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, width: int = 8):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.conv1 = conv(in_channels, width, 3, padding=1)
        self.conv2 = conv(width, width, 3, padding=1, stride=2)
        self.act = nn.ReLU()
        self.out_channels = width
        self.stages = ["conv1", "conv2"]

    def stage_modules(self, stage: str) -> list[nn.Module]:
        return [getattr(self, stage)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.act(self.conv1(x))))


class FineTuneSignalledAtStep(FineTune):
    """FineTune that sends itself a signal at a training step, to test crashes and Ctrl-C.

    ``MEDTL_TEST_SIGNAL_AT_STEP=STEP:NAME`` (``5:SIGKILL``, say) sends signal NAME
    before step STEP, counted from 1 in this process. Without the variable it is
    plain FineTune, so one study serves the interrupted run, its continuation and an
    uninterrupted reference.
    """

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._steps = 0

    def train_step(self, net, source, target, progress):
        self._steps += 1
        request = os.environ.get("MEDTL_TEST_SIGNAL_AT_STEP")
        if request:
            step, name = request.split(":")
            if self._steps == int(step):
                os.kill(os.getpid(), getattr(signal, name))
        return super().train_step(net, source, target, progress)


@medtl.hookimpl
def medtl_register_backbones() -> dict[str, Callable[..., Any]]:
    return {"tiny-cnn": TinyCNN}


@medtl.hookimpl
def medtl_register_strategies() -> dict[str, Callable[..., Any]]:
    return {"finetune-signalled": FineTuneSignalledAtStep}


def write_two_site_study(folder: Path, n_per_site: int = 24, size: int = 12, seed: int = 0) -> Path:
    """Write two sites of NIfTI images (a bright square means class 'pos') and a manifest."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    rows = []
    for site in ("A", "B"):
        (folder / site).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_site):
            label = i % 2
            image = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
            if label:
                image[2:6, 2:6] += 3.0
            if site == "B":
                image = image * 1.5 + 0.5
            path = folder / site / f"{site}{i:03d}.nii.gz"
            nib.save(nib.Nifti1Image(image[..., None], np.eye(4)), str(path))
            rows.append({"path": f"{site}/{path.name}", "label": "pos" if label else "neg", "site": site,
                         "patient_id": f"{site}-p{i // 2}"})
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "site", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def tiny_study_dict(manifest: Path, output_dir: Path, **train: Any) -> dict[str, Any]:
    """A study on the synthetic sites that trains the tiny CNN for a few steps."""
    return {
        "name": "tiny",
        "seed": 3,
        "data": {"manifest": str(manifest), "image_size": [12, 12], "split": {"val": 0.25, "test": 0.25}},
        "sites": {"A": {"role": "source"}, "B": {"role": "target"}},
        "model": {"backbone": {"name": "tiny-cnn"}, "pooling": {"name": "avg"}, "head": {"dropout": 0.2}},
        "strategy": {"name": "finetune", "options": {"mixup_alpha": 0.4}},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5},
        "train": {"epochs": 3, "batch_size": 4, **train},
        "output": {"dir": str(output_dir), "name": "run"},
        "plugins": {"modules": ["_engine_helpers"]},
    }


def tiny_study(manifest: Path, output_dir: Path, **train: Any):
    return study_from_dict(tiny_study_dict(manifest, output_dir, **train), base_dir=manifest.parent)


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: this folder importable, one thread, no torchrun leftovers."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


PYTHON = sys.executable
