"""No patient identifier from DICOM headers reaches any output of a study.

The files carry distinctive fake identifiers in the usual tags, in nested sequences and
in a private tag. A whole study runs on them (with one non-image object and one
truncated file skipped), and every byte of every output, file names included, is
searched for the identifiers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from dicom_builders import BASIC_TEXT_SR, make_dataset, save  # noqa: E402

UID_ROOT = "1.2.826.0.1.3680043.10.777.4242."

IDENTIFIERS = {
    "PatientName": "Quixotephi^Dulcinea^Marisol",
    "PatientID": "PHIZ-4417-0093",
    "PatientBirthDate": "19230417",
    "AccessionNumber": "ACCZ99173",
    "InstitutionName": "Saint Phiobe Memorial Hospital",
    "InstitutionAddress": "17 Zeppelinweg Vorstadt",
    "ReferringPhysicianName": "Hoggleworth^Barnaby",
    "OperatorsName": "Trumbleduff^Ines",
    "StudyDate": "19970302",
    "SeriesDate": "19970302",
    "AcquisitionDate": "19970303",
    "StudyTime": "041723.118811",
    "StudyID": "STUDYZ-8812",
    "StationName": "CTZ-PHI-STATION",
}

#: Values set inside sequences and a private block.
NESTED = {
    "other_id": "PHIZ-OTHER-5521",
    "nested_accession": "ACCZNESTED7731",
    "nested_physician": "Pendergrastle^Olive",
    "private": "PRIVZ-Secret-Kinnear",
}


def _needles() -> list[str]:
    values = set(IDENTIFIERS.values()) | set(NESTED.values())
    for value in list(values):
        values.update(part for part in value.split("^") if len(part) >= 4)
    values.add(UID_ROOT)
    return sorted(values)


def _identified(pixels: np.ndarray | None, index: int, **kwargs):
    from pydicom.dataset import Dataset

    ds = make_dataset(pixels, identifiers=IDENTIFIERS, orientation=None, **kwargs)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        setattr(ds, keyword, f"{UID_ROOT}{index}.{len(keyword)}")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    other = Dataset()
    other.PatientID = NESTED["other_id"]
    ds.OtherPatientIDsSequence = [other]
    request = Dataset()
    request.AccessionNumber = NESTED["nested_accession"]
    request.RequestingPhysician = NESTED["nested_physician"]
    item = Dataset()
    item.ReferencedSOPInstanceUID = f"{UID_ROOT}{index}.99"
    request.ReferencedStudySequence = [item]
    ds.RequestAttributesSequence = [request]
    block = ds.private_block(0x0011, "ACME PHI TEST", create=True)
    block.add_new(0x01, "LO", NESTED["private"])
    return ds


def _build_study(root: Path) -> Path:
    rng = np.random.default_rng(0)
    data = root / "data"
    lines = ["path,label,site,patient_id"]
    for p in range(16):
        label = "pos" if p % 2 else "neg"
        for i in range(2):
            pixels = rng.integers(0, 1000, size=(20, 20)).astype(np.uint16)
            if label == "pos":
                pixels[8:12, 8:12] += 2000
            name = f"img_{p:02d}_{i}.dcm"
            save(_identified(pixels, p * 10 + i, modality="DX"), data / name)
            lines.append(f"{name},{label},A,S{p:03d}")
    save(_identified(None, 900, sop_class=BASIC_TEXT_SR, modality="SR"), data / "report.dcm")
    lines.append(f"report.dcm,neg,A,S{100:03d}")
    truncated = data / "cut.dcm"
    save(_identified(rng.integers(0, 1000, size=(20, 20)).astype(np.uint16), 901, modality="DX"), truncated)
    truncated.write_bytes(truncated.read_bytes()[:-300])
    lines.append(f"cut.dcm,pos,A,S{101:03d}")
    (data / "manifest.csv").write_text("\n".join(lines) + "\n")
    return data


def _outputs(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_study_outputs_contain_no_identifiers(tmp_path, caplog, capsys):
    from medtl.cli import main
    from medtl.config import study_from_dict
    from medtl.engine import run_study

    data = _build_study(tmp_path)
    # The files really carry the identifiers, or the search below proves nothing.
    raw = (data / "img_00_0.dcm").read_bytes()
    for needle in _needles():
        assert needle.encode() in raw or needle in NESTED.values() or needle == UID_ROOT, needle

    study = study_from_dict({
        "name": "phi-check",
        "seed": 0,
        "data": {"manifest": "manifest.csv", "image_size": [16, 16], "labels": ["neg", "pos"],
                 "split": {"val": 0.25, "test": 0.25}, "on_bad_file": "skip",
                 "cache_dir": str(tmp_path / "cache")},
        "model": {"backbone": {"name": "resnet10"}},
        "train": {"epochs": 1, "batch_size": 4, "steps_per_epoch": 2, "device": "cpu"},
        "output": {"dir": str(tmp_path / "runs"), "name": "run"},
    }, base_dir=data)
    # The CLI stops the medtl logger from propagating, so listen on medtl's own loggers.
    loggers = [logging.getLogger(name) for name in ("medtl", "medtl_plugins")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(caplog.handler)
        lg.setLevel(logging.DEBUG)
    try:
        result = run_study(study)
        assert main(["inspect", "--json", str(data)]) == 3  # the truncated file fails
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(caplog.handler)
            lg.setLevel(level)
    printed = capsys.readouterr()

    import hashlib

    record = json.loads((result.run_dir / "run.json").read_text())
    split_csv = (result.run_dir / "split.csv").read_bytes()
    assert record["split"]["sha256"] == hashlib.sha256(split_csv).hexdigest()
    assert len(record["manifest_sha256"]) == 64

    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    reasons = [entry["reason"] for entry in metrics["skipped"]["files"]]
    assert metrics["skipped"]["count"] == 2
    assert any("Basic Text SR Storage" in reason for reason in reasons)
    assert any("could not be decoded" in reason for reason in reasons)
    outputs = _outputs(result.run_dir) + _outputs(tmp_path / "cache")
    assert any(p.suffix == ".npy" for p in outputs)
    texts = {"log records": caplog.text, "stdout": printed.out, "stderr": printed.err}

    leaks = []
    needles = _needles()
    for path in outputs:
        name = str(path.relative_to(tmp_path))
        content = path.read_bytes().lower()
        for needle in needles:
            if needle.lower() in name.lower():
                leaks.append(f"{needle!r} in file name {name}")
            for encoded in {needle.lower().encode("utf-8"), needle.lower().encode("utf-16-le")}:
                if encoded in content:
                    leaks.append(f"{needle!r} in {name}")
    for needle in needles:
        for where, text in texts.items():
            if needle.lower() in text.lower():
                leaks.append(f"{needle!r} in {where}")
    assert leaks == []
