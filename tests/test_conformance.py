"""Every registered builtin component passes medtl.testing, the plugin authors' kit.

The component lists come from the plugin host, so a new builtin is checked as soon
as it is registered. A source also needs readable sample files: add a builder for
it to SOURCE_SAMPLES.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch.nn.functional as F

import medtl
from medtl.errors import BadFileError
from medtl.strategy import Strategy
from medtl.testing import (ConformanceError, _TinyBackbone, _TinyPooling, check_backbone, check_pooling,
                           check_source, check_strategy)

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"

#: Options for components that cannot be built with their defaults alone.
BACKBONE_OPTIONS: dict[str, dict[str, Any]] = {
    # ImageNet weights exist for 2D only, and they need the imagenet extra.
    "efficientnet-lite0": {"pretrained": False},
}
POOLING_OPTIONS: dict[str, dict[str, Any]] = {}
STRATEGY_OPTIONS: dict[str, dict[str, Any]] = {}


def _dicom_samples(tmp_path: Path) -> dict[str, Any]:
    return {"paths": [SAMPLE_DATA / "site_a" / "A000_0.dcm"], "spatial_dims": 2, "channels": 1,
            "shape": (64, 64), "suffix": ".dcm"}


def _nifti_samples(tmp_path: Path) -> dict[str, Any]:
    # The sample NIfTI files store each 2D slice as a 64 x 64 x 1 volume.
    return {"paths": [SAMPLE_DATA / "site_b" / "B000_0.nii.gz"], "spatial_dims": 3, "channels": 1,
            "shape": (64, 64, 1), "suffix": ".nii.gz"}


def _npz_samples(tmp_path: Path) -> dict[str, Any]:
    file = tmp_path / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(file, train_images=rng.integers(0, 255, (3, 28, 28), dtype=np.uint8),
             train_labels=np.array([[0], [1], [0]]))
    return {"paths": [f"{file}#train/0", f"{file}#train/2"], "spatial_dims": 2, "channels": 1,
            "shape": (28, 28), "suffix": ".npz", "address": lambda path: f"{path}#train/0"}


#: Source name -> builder of check_source keyword arguments (sample files and their shape).
SOURCE_SAMPLES: dict[str, Callable[[Path], dict[str, Any]]] = {
    "dicom": _dicom_samples,
    "nifti": _nifti_samples,
    "npz": _npz_samples,
}


@pytest.mark.parametrize("name", medtl.components("backbone"))
def test_backbone_conforms(name):
    check_backbone(name, options=BACKBONE_OPTIONS.get(name))


@pytest.mark.parametrize("name", medtl.components("pooling"))
def test_pooling_conforms(name):
    check_pooling(name, options=POOLING_OPTIONS.get(name))


@pytest.mark.parametrize("name", medtl.components("strategy"))
def test_strategy_conforms(name):
    check_strategy(name, options=STRATEGY_OPTIONS.get(name))


@pytest.mark.parametrize("name", medtl.components("source"))
def test_source_conforms(name, tmp_path):
    if name not in SOURCE_SAMPLES:
        pytest.fail(f"source {name!r} has no sample files for the conformance check; "
                    "add a builder to SOURCE_SAMPLES in tests/test_conformance.py")
    if name in ("dicom", "nifti") and not SAMPLE_DATA.is_dir():
        pytest.skip("sample_data/ is missing")
    check_source(name, **SOURCE_SAMPLES[name](tmp_path))


# The kit itself must reject components that break the rules.


class _WrongChannels(_TinyBackbone):
    def __init__(self, spatial_dims=2, in_channels=1):
        super().__init__(spatial_dims, in_channels)
        self.out_channels = 7


class _DetachedPooling(_TinyPooling):
    def forward(self, x):
        return super().forward(x.detach())


class _TwoCallStrategy(Strategy):
    def train_step(self, net, source, target, progress):
        net(source["image"])
        return {"loss": F.cross_entropy(net(source["image"]), source["label"])}


class _NamelessErrorSource:
    """Source that reads ``.good`` files as an 8 x 8 image and fails on others without naming the file."""

    def read(self, path):
        if path.endswith(".good"):
            return np.zeros((1, 8, 8), dtype=np.float32), {"spacing": (1.0, 1.0)}
        raise BadFileError("an image", "cannot be read")


class _FlatAffineSource:
    """Source whose affine collapses the second voxel axis."""

    def read(self, path):
        if not path.endswith(".good"):
            raise BadFileError(path, "not a .good file")
        return np.zeros((1, 8, 8), dtype=np.float32), {"spacing": (1.0, 1.0),
                                                        "affine": np.diag([1.0, 0.0, 1.0, 1.0])}


def test_kit_rejects_singular_affine(tmp_path):
    good = tmp_path / "ok.good"
    good.write_bytes(b"")
    with pytest.raises(ConformanceError, match="singular"):
        check_source(_FlatAffineSource, [good], spatial_dims=2, suffix=".raw")


def test_kit_rejects_wrong_out_channels():
    with pytest.raises(ConformanceError, match="declares 7"):
        check_backbone(_WrongChannels, spatial_dims=(2,))


def test_kit_rejects_detached_pooling():
    with pytest.raises(ConformanceError, match="no gradient flows back"):
        check_pooling(_DetachedPooling)


def test_kit_rejects_two_network_calls():
    with pytest.raises(ConformanceError, match="called net 2 times"):
        check_strategy(_TwoCallStrategy)


def test_kit_rejects_error_without_file_name(tmp_path):
    good = tmp_path / "ok.good"
    good.write_bytes(b"")
    with pytest.raises(ConformanceError, match="does not name the file"):
        check_source(_NamelessErrorSource, [good], spatial_dims=2, suffix=".raw")
