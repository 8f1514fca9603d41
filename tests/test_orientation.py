"""The study-level data.orientation: DICOM and NIfTI images in one anatomical orientation."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from dicom_builders import CR_IMAGE_STORAGE, make_dataset, save, write_series  # noqa: E402

from medtl.cli import main  # noqa: E402
from medtl.config import study_from_dict  # noqa: E402
from medtl.data import Preprocessor, load_samples  # noqa: E402
from medtl.errors import BadFileError, ConfigError  # noqa: E402
from medtl.manifest import load_manifest  # noqa: E402
from medtl.run import load_run_study, write_resolved_config  # noqa: E402
from medtl.trained import read_run_study  # noqa: E402
from medtl_plugins.dicom import DicomSource  # noqa: E402
from medtl_plugins.nifti import NiftiSource  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DICOM = REPO / "sample_data" / "site_a" / "A000_0.dcm"
SAMPLE_NIFTI = REPO / "sample_data" / "site_b" / "B000_0.nii.gz"


def _study(tmp_path: Path, size=(5, 6), **data):
    return study_from_dict({"data": {"manifest": "manifest.csv", "image_size": list(size), "intensity": "none",
                                     **data},
                            "output": {"dir": str(tmp_path / "runs")}}, base_dir=tmp_path)


def _pixels(rows: int = 6, columns: int = 5) -> np.ndarray:
    # Distinct values, so any flip or transposition changes the array.
    return (np.arange(rows * columns).reshape(rows, columns) * 7 + 100).astype(np.uint16)


def _axial_slice(path: Path, pixels: np.ndarray) -> Path:
    # ImageOrientationPatient (1,0,0,0,1,0): columns run toward L, rows toward P.
    return save(make_dataset(pixels, spacing=(1.0, 1.0), position=(0.0, 0.0, 0.0)), path)


def _read(path: Path, study) -> tuple[np.ndarray, dict]:
    source = DicomSource() if path.suffix == ".dcm" or path.is_dir() else NiftiSource(**study.data.sources.get("nifti", {}))
    array, meta = source.read(str(path))
    return Preprocessor(study).reorient(array, meta, str(path))


def _same_image(a: np.ndarray, b: np.ndarray) -> bool:
    """Compare two arrays that may differ only by singleton axes (a 2D image stored as one slice)."""
    if tuple(s for s in a.shape if s != 1) != tuple(s for s in b.shape if s != 1):
        return False
    return np.array_equal(a.reshape(b.shape), b)


# -- mixed sources ------------------------------------------------------------


def _mixed_sites(tmp_path: Path) -> None:
    """Write one anatomy twice: as an axial DICOM slice and as a NIfTI file stored in RAS order."""
    pixels = _pixels()
    _axial_slice(tmp_path / "a.dcm", pixels)
    # Pixel (r, c) of the DICOM file sits at LPS (c, r, 0), which is RAS (-c, -r, 0). The
    # NIfTI file stores x (toward R) first and y (toward A) second: voxel (i, j) is pixel
    # (rows-1-j, columns-1-i), at RAS (i - (columns-1), j - (rows-1), 0).
    rows, columns = pixels.shape
    data = pixels[::-1, ::-1].T[:, :, None].astype(np.float32)
    affine = np.array([[1.0, 0, 0, -(columns - 1)], [0, 1.0, 0, -(rows - 1)], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "b.nii.gz")
    (tmp_path / "manifest.csv").write_text("path,label,site,patient_id\na.dcm,0,A,p1\nb.nii.gz,1,B,p2\n")


def _load_both(tmp_path: Path, **data) -> list[torch.Tensor]:
    study = _study(tmp_path, **data)
    manifest = load_manifest(tmp_path / "manifest.csv")
    sources = {"dicom": DicomSource(), "nifti": NiftiSource()}
    items = load_samples(manifest.rows, manifest, study, sources, Preprocessor(study))
    return [item["image"] for item in items]


def test_dicom_and_nifti_same_anatomy_match(tmp_path):
    _mixed_sites(tmp_path)
    dicom_image, nifti_image = _load_both(tmp_path, size=(6, 5))
    # The default for a 2D study (PLS) keeps the DICOM slice in pixel_array order.
    assert dicom_image.shape == (1, 6, 5)
    assert torch.equal(dicom_image[0], torch.from_numpy(_pixels().astype(np.float32)))
    assert torch.equal(dicom_image, nifti_image)


def test_dicom_and_nifti_match_in_ras(tmp_path):
    _mixed_sites(tmp_path)
    dicom_image, nifti_image = _load_both(tmp_path, orientation="RAS")
    assert dicom_image.shape == (1, 5, 6)
    assert torch.equal(dicom_image, nifti_image)


def test_without_orientation_sites_differ(tmp_path):
    _mixed_sites(tmp_path)
    dicom_image, nifti_image = _load_both(tmp_path, orientation=None)
    assert not torch.equal(dicom_image, nifti_image)


def test_lps_orientation_matches_too(tmp_path):
    _mixed_sites(tmp_path)
    dicom_image, nifti_image = _load_both(tmp_path, orientation="LPS")
    assert torch.equal(dicom_image, nifti_image)
    ras_image, _ = _load_both(tmp_path, orientation="RAS")
    assert torch.equal(dicom_image, torch.flip(ras_image, dims=(1, 2)))


# -- the reorientation step ------------------------------------------------------


def test_axial_slice_to_ras(tmp_path):
    pixels = _pixels()
    path = _axial_slice(tmp_path / "a.dcm", pixels)
    array, meta = _read(path, _study(tmp_path, orientation="RAS"))
    assert np.array_equal(array[0], pixels[::-1, ::-1].T)
    assert meta["orientation"] == "RAS"
    assert meta["shape"] == (1, 5, 6)


def test_nominal_frame_reoriented_and_logged_once(tmp_path, caplog):
    pixels = _pixels()
    path = save(make_dataset(pixels, sop_class=CR_IMAGE_STORAGE, modality="CR", orientation=None,
                             spacing=(0.5, 0.25)), tmp_path / "cr.dcm")
    preprocessor = Preprocessor(_study(tmp_path, orientation="RAS"))
    array, meta = DicomSource().read(str(path))
    assert meta["patient_frame"] is False
    with caplog.at_level(logging.INFO, logger="medtl.data"):
        first, first_meta = preprocessor.reorient(array, meta, str(path))
        preprocessor.reorient(array, meta, str(path))
    # The nominal frame is axial (columns toward L, rows toward P), as for the axial slice.
    assert np.array_equal(first[0], pixels[::-1, ::-1].T)
    assert first_meta["spacing"] == (0.25, 0.5)
    assert sum("nominal frame" in r.getMessage() for r in caplog.records) == 1


def test_radiograph_keeps_display_order_by_default(tmp_path, caplog):
    pixels = _pixels()
    path = save(make_dataset(pixels, sop_class=CR_IMAGE_STORAGE, modality="CR", orientation=None,
                             spacing=(0.5, 0.25)), tmp_path / "cr.dcm")
    array, meta = DicomSource().read(str(path))
    with caplog.at_level(logging.INFO, logger="medtl.data"):
        out, out_meta = Preprocessor(_study(tmp_path)).reorient(array, meta, str(path))
    assert np.array_equal(out[0], pixels)
    assert out_meta["orientation"] == "PLS"
    assert not any("nominal frame" in r.getMessage() for r in caplog.records)


def test_image_in_order_not_copied(tmp_path):
    path = tmp_path / "ras.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.eye(4)), path)
    array, meta = NiftiSource().read(str(path))
    out, out_meta = Preprocessor(_study(tmp_path, orientation="RAS")).reorient(array, meta, str(path))
    assert out is array
    assert np.array_equal(out_meta["affine"], meta["affine"])
    assert out_meta["orientation"] == "RAS"


def test_null_orientation_keeps_source_order(tmp_path):
    pixels = _pixels()
    path = _axial_slice(tmp_path / "a.dcm", pixels)
    array, meta = DicomSource().read(str(path))
    out, out_meta = Preprocessor(_study(tmp_path, orientation=None)).reorient(array, meta, str(path))
    assert out is array
    assert out_meta is meta


def test_array_without_affine_unchanged(tmp_path):
    array = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    out, meta = Preprocessor(_study(tmp_path)).reorient(array, {"spacing": (1.0, 1.0)}, "x.npz#train/0")
    assert out is array
    assert "affine" not in meta


def test_singular_affine_rejected(tmp_path):
    array = np.zeros((1, 3, 4), dtype=np.float32)
    affine = np.diag([1.0, 0.0, 1.0, 1.0])
    with pytest.raises(BadFileError, match="data.orientation") as info:
        Preprocessor(_study(tmp_path)).reorient(array, {"affine": affine}, "bad.dcm")
    assert "singular" in str(info.value)


def test_orientation_in_description(tmp_path):
    ras = Preprocessor(_study(tmp_path, orientation="RAS")).describe()
    lps = Preprocessor(_study(tmp_path, orientation="LPS")).describe()
    null = Preprocessor(_study(tmp_path, orientation=None)).describe()
    auto = Preprocessor(_study(tmp_path)).describe()
    assert len({ras, lps, null, auto}) == 4
    assert "orientation=RAS" in ras
    assert "orientation=PLS" in auto


# -- the study file -------------------------------------------------------------


def test_orientation_option_validated(tmp_path):
    assert _study(tmp_path).data.orientation == "auto"
    assert _study(tmp_path).data.orientation_codes == "PLS"
    assert _study(tmp_path, size=(4, 5, 6), spatial_dims=3).data.orientation_codes == "RAS"
    assert _study(tmp_path, orientation="AUTO").data.orientation == "auto"
    assert _study(tmp_path, orientation="lps").data.orientation == "LPS"
    assert _study(tmp_path, orientation=None).data.orientation is None
    with pytest.raises(ConfigError, match="data.orientation") as info:
        _study(tmp_path, orientation="RRS")
    assert "one of each of L/R, A/P and S/I" in str(info.value)


def test_old_run_config_keeps_source_order(tmp_path):
    study = _study(tmp_path)
    new_run, old_run = tmp_path / "new", tmp_path / "old"
    for folder in (new_run, old_run):
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "last.pt").write_bytes(b"")
        (folder / "run.json").write_text(json.dumps({"status": "running", "base_dir": str(tmp_path)}))
        write_resolved_config(study, folder / "config.yaml")
    text = (old_run / "config.yaml").read_text()
    assert "  orientation: auto\n" in text
    (old_run / "config.yaml").write_text(text.replace("  orientation: auto\n", ""))
    # Evaluation reads the study with read_run_study, --resume with load_run_study.
    assert read_run_study(new_run).data.orientation == "auto"
    assert read_run_study(old_run).data.orientation is None
    assert load_run_study(new_run).data.orientation == "auto"
    assert load_run_study(old_run).data.orientation is None


# -- medtl convert round trip ---------------------------------------------------------


def _convert(inputs: list[Path], out: Path) -> Path:
    assert main(["convert", *map(str, inputs), str(out)]) == 0
    return out


@pytest.mark.parametrize("kind", ["radiograph", "axial slice"])
def test_convert_2d_round_trip(tmp_path, kind):
    path = SAMPLE_DICOM if kind == "radiograph" else _axial_slice(tmp_path / "a.dcm", _pixels())
    out = _convert([path], tmp_path / "out.nii.gz")
    study = _study(tmp_path)
    direct, direct_meta = _read(path, study)
    back, back_meta = _read(out, study)
    assert _same_image(back, direct)
    assert np.allclose(back_meta["affine"], direct_meta["affine"])


def test_convert_series_round_trip(tmp_path):
    volume = (np.arange(4 * 6 * 5).reshape(4, 6, 5) % 97).astype(np.int16)
    write_series(tmp_path / "s", volume, step=2.0)
    out = _convert([tmp_path / "s"], tmp_path / "out.nii.gz")
    study = _study(tmp_path, size=(5, 6, 4), spatial_dims=3)
    direct, direct_meta = _read(tmp_path / "s", study)
    back, back_meta = _read(out, study)
    assert direct.shape == (1, 5, 6, 4)
    assert np.array_equal(back, direct)
    assert np.allclose(back_meta["affine"], direct_meta["affine"])
    assert direct_meta["spacing"] == pytest.approx((0.8, 0.8, 2.0))


@pytest.mark.parametrize("kind", ["radiograph", "series"])
def test_convert_exact_without_orientation(tmp_path, kind):
    if kind == "radiograph":
        path = SAMPLE_DICOM
    else:
        path = tmp_path / "s"
        write_series(path, (np.arange(3 * 6 * 5).reshape(3, 6, 5) % 89).astype(np.int16))
    out = _convert([path], tmp_path / "out.nii.gz")
    study = _study(tmp_path, orientation=None, sources={"nifti": {"orientation": None}})
    direct, direct_meta = _read(path, study)
    back, back_meta = _read(out, study)
    if kind == "radiograph":
        assert back.shape == direct.shape + (1,)
    assert _same_image(back, direct)
    assert np.allclose(back_meta["affine"], direct_meta["affine"])


# -- the sample study ---------------------------------------------------------------


def _sample_generator():
    spec = importlib.util.spec_from_file_location("make_sample_data", REPO / "sample_data" / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_sites_share_orientation(tmp_path):
    generator = _sample_generator()
    pixels = _pixels()
    generator._write_dicom(tmp_path / "a.dcm", pixels, "P0", 0, 0)
    generator._write_nifti(tmp_path / "b.nii.gz", pixels.astype(np.float32))
    study = _study(tmp_path)
    site_a, meta_a = _read(tmp_path / "a.dcm", study)
    site_b, meta_b = _read(tmp_path / "b.nii.gz", study)
    assert _same_image(site_b, site_a)
    assert meta_a["orientation"] == meta_b["orientation"] == "PLS"


def test_committed_sample_matches_generator():
    # Catches sample files written by an older generator, whose axes disagree with site A's.
    assert nib.aff2axcodes(nib.load(SAMPLE_NIFTI).affine) == ("L", "P", "S")


def test_convert_orientation_option(tmp_path):
    out = tmp_path / "ras.nii.gz"
    assert main(["convert", "--orientation", "ras", str(SAMPLE_DICOM), str(out)]) == 0
    expected, expected_meta = _read(SAMPLE_DICOM, _study(tmp_path, orientation="RAS"))
    img = nib.load(out)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert _same_image(np.asarray(img.dataobj)[None], expected)
    assert np.allclose(img.affine, expected_meta["affine"])


def test_convert_invalid_orientation_rejected(tmp_path, capsys):
    from medtl.errors import EXIT_CONFIG

    assert main(["convert", "--orientation", "RRS", str(SAMPLE_DICOM), str(tmp_path / "x.nii.gz")]) == EXIT_CONFIG
    assert "--orientation" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()
