"""Hostile and broken inputs give a clear error or a recorded skip, never a traceback or a wrong array."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medtl
from _engine_helpers import tiny_study_dict, write_two_site_study
from medtl.cli import main
from medtl.errors import EXIT_DATA, BadFileError, DataError
from medtl.manifest import load_manifest

SAMPLE_DICOM = Path(__file__).resolve().parents[1] / "sample_data" / "site_a" / "A000_0.dcm"


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


# -- NIfTI -----------------------------------------------------------------------


def test_nifti_gz_that_is_not_gzip(tmp_path):
    path = tmp_path / "plain.nii.gz"
    path.write_bytes(b"this is not a gzip stream" * 20)
    with pytest.raises(BadFileError, match="plain.nii.gz"):
        medtl.create("source", "nifti").read(str(path))


def test_nifti_zero_affine(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((8, 8, 1))
    header.set_data_dtype(np.float32)
    for key in ("srow_x", "srow_y", "srow_z"):
        header[key] = 0
    header["sform_code"], header["qform_code"] = 1, 0
    path = tmp_path / "zero.nii.gz"
    nib.Nifti1Image(np.ones((8, 8, 1), np.float32), None, header=header).to_filename(str(path))
    with pytest.raises(BadFileError, match="affine"):
        medtl.create("source", "nifti").read(str(path))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_header_larger_than_data(tmp_path, suffix):
    path = _nifti(tmp_path / f"full{suffix}", np.ones((16, 16, 4), np.float32))
    raw = gzip.decompress(path.read_bytes()) if suffix == ".nii.gz" else path.read_bytes()
    cut = raw[: len(raw) - 1000]  # the header still declares 16 x 16 x 4 float32 voxels
    path.write_bytes(gzip.compress(cut) if suffix == ".nii.gz" else cut)
    with pytest.raises(BadFileError, match=path.name):
        medtl.create("source", "nifti").read(str(path))


def test_nifti_nan_voxels_rejected_by_preprocessing(tmp_path):
    from medtl.config import study_from_dict
    from medtl.data import Preprocessor, load_samples

    data = np.ones((8, 8, 1), np.float32)
    data[2, 3, 0] = np.nan
    _nifti(tmp_path / "nan.nii.gz", data)
    _nifti(tmp_path / "good.nii.gz", np.ones((8, 8, 1), np.float32))
    manifest_path = tmp_path / "m.csv"
    manifest_path.write_text("path,label,site,patient_id\nnan.nii.gz,a,S,p1\ngood.nii.gz,b,S,p2\n")
    manifest = load_manifest(manifest_path)
    sources = {"nifti": medtl.create("source", "nifti")}
    for policy in ("fail", "skip"):
        study = study_from_dict({"data": {"manifest": str(manifest_path), "image_size": [8, 8],
                                          "on_bad_file": policy}})
        if policy == "fail":
            with pytest.raises(BadFileError, match="NaN"):
                load_samples(manifest.rows, manifest, study, sources, Preprocessor(study))
        else:
            skipped: list = []
            items = load_samples(manifest.rows, manifest, study, sources, Preprocessor(study), skipped=skipped)
            assert [item["row"] for item in items] == [1]
            assert len(skipped) == 1
            assert "NaN" in skipped[0].reason


# -- DICOM -----------------------------------------------------------------------


def _dicom_copy(tmp_path: Path, name: str, edit) -> Path:
    pydicom = pytest.importorskip("pydicom")
    ds = pydicom.dcmread(str(SAMPLE_DICOM))
    edit(ds)
    path = tmp_path / name
    ds.save_as(str(path), enforce_file_format=False)
    return path


def test_dicom_truncated_pixel_data(tmp_path):
    pytest.importorskip("pydicom")
    data = SAMPLE_DICOM.read_bytes()
    path = tmp_path / "truncated.dcm"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(BadFileError, match="truncated.dcm"):
        medtl.create("source", "dicom").read(str(path))


def test_dicom_missing_transfer_syntax(tmp_path):
    def drop_syntax(ds):
        del ds.file_meta.TransferSyntaxUID

    path = _dicom_copy(tmp_path, "no-syntax.dcm", drop_syntax)
    source = medtl.create("source", "dicom")
    try:
        array, _ = source.read(str(path))
    except BadFileError as exc:
        assert "no-syntax.dcm" in str(exc)
    else:
        # A reader may infer the transfer syntax, but then the pixels must be right.
        reference, _ = source.read(str(SAMPLE_DICOM))
        np.testing.assert_array_equal(array, reference)


def test_dicom_pixel_data_that_does_not_decode(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    def garble(ds):
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = encapsulate([b"\xff\xd8 not a jpeg stream \xff\xd9"])
        ds["PixelData"].VR = "OB"

    path = _dicom_copy(tmp_path, "garbled.dcm", garble)
    with pytest.raises(BadFileError, match="garbled.dcm"):
        medtl.create("source", "dicom").read(str(path))


def test_dicom_zero_pixel_spacing(tmp_path):
    def zero_spacing(ds):
        ds.PixelSpacing = [0, 0]

    path = _dicom_copy(tmp_path, "zero-spacing.dcm", zero_spacing)
    with pytest.raises(BadFileError, match="PixelSpacing"):
        medtl.create("source", "dicom").read(str(path))


def test_dicom_missing_pixel_spacing_reads_positive_spacing(tmp_path):
    def drop_spacing(ds):
        del ds.PixelSpacing

    path = _dicom_copy(tmp_path, "no-spacing.dcm", drop_spacing)
    _, meta = medtl.create("source", "dicom").read(str(path))
    assert all(s > 0 for s in meta["spacing"])


# -- Manifest ----------------------------------------------------------------------


def _write_manifest(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_manifest_missing_files_listed(tmp_path):
    rows = [{"path": f"missing{i}.nii.gz", "label": "a", "site": "S", "patient_id": f"p{i}"} for i in range(3)]
    manifest = _write_manifest(tmp_path / "m.csv", rows, ["path", "label", "site", "patient_id"])
    with pytest.raises(DataError) as info:
        load_manifest(manifest)
    for i in range(3):
        assert f"missing{i}.nii.gz" in str(info.value)


def test_manifest_without_patient_column_needs_flag(tmp_path):
    for i in range(2):
        _nifti(tmp_path / f"x{i}.nii.gz", np.ones((4, 4, 1), np.float32))
    rows = [{"path": f"x{i}.nii.gz", "label": "ab"[i], "site": "S"} for i in range(2)]
    manifest = _write_manifest(tmp_path / "m.csv", rows, ["path", "label", "site"])
    with pytest.raises(DataError, match="allow_image_split"):
        load_manifest(manifest)
    assert len(load_manifest(manifest, allow_missing_patient=True).rows) == 2


def test_run_with_bad_file_unlabeled_rows_and_single_class_site(tmp_path, capsys):
    manifest = write_two_site_study(tmp_path / "data", n_per_site=16)
    with manifest.open() as fh:
        rows = list(csv.DictReader(fh))
    # Site B's test images all get one class; two site A rows lose their label;
    # one site A image holds NaN voxels.
    for row in rows:
        if row["site"] == "B":
            row["label"] = "neg"
    for row in rows[:2]:
        row["label"] = ""
    bad = tmp_path / "data" / "A" / "A005.nii.gz"
    broken = np.full((12, 12, 1), np.nan, np.float32)
    _nifti(bad, broken)
    _write_manifest(manifest, rows, ["path", "label", "site", "patient_id"])

    raw = tiny_study_dict(manifest, tmp_path / "out", epochs=1, steps_per_epoch=1)
    raw["data"]["on_bad_file"] = "skip"
    raw["data"]["labels"] = ["neg", "pos"]
    raw["sites"] = {"A": {"role": "source"}, "B": {"role": "source"}}
    study_file = tmp_path / "study.json"
    study_file.write_text(json.dumps(raw))  # JSON is valid YAML
    assert main(["-q", "run", str(study_file)]) == 0, capsys.readouterr().err

    metrics = json.loads((tmp_path / "out" / "run" / "metrics.json").read_text())
    assert metrics["skipped"]["count"] == 1
    assert "NaN" in metrics["skipped"]["files"][0]["reason"]
    site_b = metrics["test"]["B"]
    assert site_b["auc"] is None
    assert "only class" in site_b["notes"]["auc"]


def test_cli_data_error_has_no_traceback(tmp_path, capsys):
    rows = [{"path": "missing.nii.gz", "label": "a", "site": "S", "patient_id": "p"}]
    manifest = _write_manifest(tmp_path / "m.csv", rows, ["path", "label", "site", "patient_id"])
    study_file = tmp_path / "study.yaml"
    study_file.write_text(f"data: {{manifest: {manifest}}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    assert main(["-q", "run", str(study_file)]) == EXIT_DATA
    err = capsys.readouterr().err
    assert "missing.nii.gz" in err
    assert "Traceback" not in err
