"""Tests of the nifti source against nibabel's test data and hand-built headers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from medtl.errors import BadFileError, ConfigError  # noqa: E402
from medtl_plugins.nifti import NiftiSource  # noqa: E402

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def _nifti_test_files() -> list[Path]:
    files = sorted(NIBABEL_DATA.glob("*.nii")) + sorted(NIBABEL_DATA.glob("*.nii.gz"))
    return [f for f in files if isinstance(nib.load(f), (nib.Nifti1Image, nib.Nifti2Image))]


@pytest.mark.parametrize("path", _nifti_test_files(), ids=lambda p: p.name)
def test_matches_nibabel_canonical(path):
    canonical = nib.as_closest_canonical(nib.load(path))
    expected = canonical.get_fdata(dtype=np.float32)
    if expected.ndim == 3:
        expected = expected[..., None]
    expected = expected.reshape(expected.shape[:3] + (-1,))
    policy = "zero" if not np.isfinite(expected).all() else "fail"
    array, meta = NiftiSource(nan_policy=policy).read(str(path))
    assert array.shape == (expected.shape[3],) + expected.shape[:3]
    assert np.array_equal(array, np.moveaxis(np.nan_to_num(expected, nan=0.0, posinf=0.0, neginf=0.0), -1, 0))
    assert np.allclose(meta["affine"], canonical.affine)
    assert meta["orientation"] == "RAS"


def test_cifti_file_rejected():
    with pytest.raises(BadFileError, match="not a NIfTI image"):
        NiftiSource().read(str(NIBABEL_DATA / "row_major.dconn.nii"))


def _save(tmp_path: Path, data: np.ndarray, affine: np.ndarray, name: str = "img.nii.gz", **header) -> Path:
    img = nib.Nifti1Image(data, affine)
    for key, value in header.items():
        img.header[key] = value
    path = tmp_path / name
    nib.save(img, path)
    return path


def test_sform_preferred_over_qform(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    img = nib.Nifti1Image(data, None)
    img.set_qform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    img.set_sform(np.diag([-1.0, 1.0, 1.0, 1.0]), code=2)
    nib.save(img, tmp_path / "both.nii")
    array, meta = NiftiSource().read(str(tmp_path / "both.nii"))
    assert meta["form"] == "sform"
    assert meta["spacing"] == pytest.approx((1.0, 1.0, 1.0))
    assert np.array_equal(array[0], data[::-1])  # the sform's flipped x axis is reoriented to R

    img.set_sform(np.eye(4), code=0)
    nib.save(img, tmp_path / "qform.nii")
    _, meta = NiftiSource().read(str(tmp_path / "qform.nii"))
    assert meta["form"] == "qform"
    assert meta["spacing"] == pytest.approx((2.0, 2.0, 2.0))


def test_scaling_applied(tmp_path):
    data = np.array([[[0, 1], [2, 3]]], dtype=np.int16)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(2.0, 10.0)
    nib.save(img, tmp_path / "scaled.nii")
    array, _ = NiftiSource().read(str(tmp_path / "scaled.nii"))
    assert np.array_equal(array[0], data * 2.0 + 10.0)


def test_configured_orientation(tmp_path):
    data = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    path = _save(tmp_path, data, np.eye(4))
    array, meta = NiftiSource(orientation="LPS").read(str(path))
    assert meta["orientation"] == "LPS"
    assert np.array_equal(array[0], data[::-1, ::-1, :])


def test_invalid_orientation_rejected():
    with pytest.raises(ConfigError, match="data.sources.nifti.orientation"):
        NiftiSource(orientation="RRS")


def test_4d_volume_and_channels(tmp_path):
    data = np.stack([np.full((2, 2, 2), v, dtype=np.float32) for v in (1, 2, 3)], axis=-1)
    path = _save(tmp_path, data, np.eye(4))
    channels, _ = NiftiSource().read(str(path))
    assert channels.shape == (3, 2, 2, 2)
    second, _ = NiftiSource(volume=1).read(str(path))
    assert second.shape == (1, 2, 2, 2)
    assert np.all(second == 2)
    with pytest.raises(BadFileError, match="3 volumes"):
        NiftiSource(volume=5).read(str(path))


def test_nan_policy(tmp_path, caplog):
    data = np.array([[[np.nan, 1.0], [np.inf, 4.0]]], dtype=np.float32)
    path = _save(tmp_path, data, np.eye(4))
    with pytest.raises(BadFileError, match="2 voxels are NaN or infinite"):
        NiftiSource().read(str(path))
    zero, _ = NiftiSource(nan_policy="zero").read(str(path))
    assert np.array_equal(zero[0], [[[0.0, 1.0], [0.0, 4.0]]])
    with caplog.at_level(logging.WARNING, logger="medtl_plugins.nifti"):
        low, _ = NiftiSource(nan_policy="min").read(str(path))
    assert np.array_equal(low[0], [[[1.0, 1.0], [1.0, 4.0]]])
    assert "replaced 2" in caplog.text


def test_corrupt_file_error_names_file(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(BadFileError) as info:
        NiftiSource().read(str(path))
    assert info.value.path == str(path)


def test_convert_nifti_keeps_what_source_reads(tmp_path):
    from medtl.cli import main

    data = np.random.default_rng(1).random((3, 4, 5)).astype(np.float32)
    affine = np.diag([-1.5, 1.5, 3.0, 1.0])
    path = _save(tmp_path, data, affine, "in.nii.gz")
    out = tmp_path / "out.nii.gz"
    assert main(["convert", str(path), str(out)]) == 0
    array, meta = NiftiSource().read(str(path))
    written = nib.load(out)
    assert np.array_equal(np.asarray(written.dataobj), array[0])
    assert np.allclose(written.affine, meta["affine"])


def test_inspect_shows_stored_orientation(tmp_path):
    import nibabel as nib

    from medtl.commands.inspect import inspect_paths

    path = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5), dtype=np.float32), np.diag([-1.0, -1.0, 1.0, 1.0])), path)
    (entry,) = inspect_paths([path])
    assert entry["orientation"] == "RAS"
    assert entry["stored_orientation"] == "LPS"
