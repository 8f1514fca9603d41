"""Shared pieces of the adaptation tests: a tiny backbone plugin and a two-site dataset."""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import medtl
from medtl._host import PluginHost
from medtl.config import study_from_dict


class TinyConvNet(nn.Module):
    """Two convolution stages with BatchNorm, small enough for CPU tests."""

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width),
                                   nn.ReLU())
        self.spatial_dims = spatial_dims
        self.out_channels = 2 * width
        self.stages = ["stem", "block"]

    def stage_modules(self, stage: str) -> list[nn.Module]:
        return [getattr(self, stage)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x))


class TinyBackbonePlugin:
    @medtl.hookimpl
    def medtl_register_backbones(self) -> dict[str, Any]:
        return {"tiny": TinyConvNet}


@medtl.hookimpl
def medtl_register_backbones() -> dict[str, Any]:
    """Register the tiny backbone when a study lists this module under plugins.modules."""
    return {"tiny": TinyConvNet}


@contextlib.contextmanager
def single_thread():
    """Run torch on one CPU thread; tiny models run many times faster without thread contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_host() -> PluginHost:
    host = PluginHost(entry_points=False)
    host.register(TinyBackbonePlugin(), "tiny-backbone")
    return host


def _images(rng: np.random.Generator, labels: np.ndarray, size: int, shift: bool) -> np.ndarray:
    """Class 1 has a bright square in the middle; the shifted site is darker, noisier and inverted in contrast."""
    images = rng.normal(0.3, 0.1, size=(len(labels), size, size))
    lo, hi = size // 4, 3 * size // 4
    images[labels == 1, lo:hi, lo:hi] += 0.5
    if shift:
        images = 1.0 - 0.6 * images + rng.normal(0, 0.15, size=images.shape)
    return images.astype(np.float32)


def write_two_site_study(folder: Path, per_site: int = 48, size: int = 16, seed: int = 0) -> Path:
    """Write site A (source) and site B (target) as NIfTI files with a CSV manifest; return the manifest."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    rows = []
    for site, shift in (("A", False), ("B", True)):
        site_dir = folder / site
        site_dir.mkdir(parents=True, exist_ok=True)
        counts = {"train": per_site // 2, "val": per_site // 4, "test": per_site // 4}
        for split, n in counts.items():
            labels = np.arange(n) % 2
            images = _images(rng, labels, size, shift)
            for i in range(n):
                name = f"{split}_{i}.nii.gz"
                nib.save(nib.Nifti1Image(images[i], np.eye(4)), str(site_dir / name))
                rows.append([f"{site}/{name}", str(int(labels[i])), site, f"{site}-{split}-{i}", split])
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "site", "patient_id", "split"])
        writer.writerows(rows)
    return manifest


def base_study(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """Return a study dict over the two-site dataset with the tiny backbone; sections replace defaults."""
    manifest = write_two_site_study(tmp_path)
    raw: dict[str, Any] = {
        "name": "tiny",
        "data": {"manifest": str(manifest), "image_size": [16, 16], "cache": False},
        "sites": {"A": {"role": "source"}, "B": {"role": "target"}},
        "transforms": {"preset": "none"},
        "model": {"backbone": {"name": "tiny"}},
        "strategy": {"name": "finetune"},
        "optimizer": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 2, "batch_size": 8, "device": "cpu"},
        "output": {"dir": str(tmp_path / "runs")},
    }
    raw.update(sections)
    return raw


def make_study(tmp_path: Path, **sections: Any):
    return study_from_dict(base_study(tmp_path, **sections), base_dir=tmp_path)
