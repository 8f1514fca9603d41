"""Tests of manifest validation and the patient-level split."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtl.errors import DataError
from medtl.manifest import (
    assign_splits,
    load_manifest,
    patients_in_several_splits,
    split_summary,
)


def _write(tmp_path: Path, lines: list[str], touch: list[str] = ()) -> Path:
    for name in touch:
        (tmp_path / name).write_bytes(b"")
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reports_every_problem_at_once(tmp_path):
    path = _write(tmp_path, [
        "path,label,site,patient_id",
        "a.dcm,yes,A,p1",
        "a.dcm,no,A,p2",
        "missing.dcm,no,A,p3",
        "b.dcm,maybe,A,p4",
        "c.dcm,no,,p5",
        "d.dcm,yes,A,",
    ], touch=["a.dcm", "b.dcm", "c.dcm", "d.dcm"])
    with pytest.raises(DataError) as info:
        load_manifest(path, labels=["no", "yes"])
    message = str(info.value)
    assert "row 3: duplicate path 'a.dcm' (first at row 2)" in message
    assert "row 4: file not found: missing.dcm" in message
    assert "['maybe'] (rows 5)" in message
    assert "row 6: empty site" in message
    assert "row 7: empty patient_id" in message
    assert "5 problems" in message


def test_missing_patient_column_rejected(tmp_path):
    path = _write(tmp_path, ["path,label,site", "a.dcm,yes,A"], touch=["a.dcm"])
    with pytest.raises(DataError, match="no patient_id column"):
        load_manifest(path)


def test_given_split_mixing_patient_rejected(tmp_path):
    path = _write(tmp_path, [
        "path,label,site,patient_id,split",
        "a.dcm,yes,A,p1,train",
        "b.dcm,yes,A,p1,test",
        "c.dcm,no,A,p2,train",
    ], touch=["a.dcm", "b.dcm", "c.dcm"])
    with pytest.raises(DataError, match="rows 2, 3: one patient_id has images in the splits test, train"):
        load_manifest(path)


def _many_patients(tmp_path: Path, patients: int = 60, images: int = 3) -> Path:
    lines = ["path,label,site,patient_id"]
    names = []
    for p in range(patients):
        for i in range(images):
            name = f"p{p}_{i}.png"
            names.append(name)
            site = "A" if p % 2 else "B"
            lines.append(f"{name},{'pos' if p % 3 == 0 else 'neg'},{site},P{p}")
    return _write(tmp_path, lines, touch=names)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_patient_in_two_splits(tmp_path, seed):
    manifest = load_manifest(_many_patients(tmp_path))
    assign_splits(manifest, val=0.2, test=0.25, seed=seed)
    assert patients_in_several_splits(manifest) == {}
    for site in manifest.sites:
        for split in ("train", "val", "test"):
            labels = {r.label for r in manifest.select(site, split)}
            assert labels == {"pos", "neg"}, (site, split)


def test_split_fractions_near_requested(tmp_path):
    manifest = load_manifest(_many_patients(tmp_path, patients=100))
    assign_splits(manifest, val=0.2, test=0.2, seed=0)
    summary = split_summary(manifest)
    assert 14 <= summary["patients"]["test"] <= 26
    assert 14 <= summary["patients"]["val"] <= 26
    assert sum(summary["images"].values()) == 300


def test_split_summary_tracks_assignment(tmp_path):
    path = _many_patients(tmp_path)
    first = load_manifest(path)
    assign_splits(first, val=0.2, test=0.2, seed=0)
    again = load_manifest(path)
    assign_splits(again, val=0.2, test=0.2, seed=0)
    other = load_manifest(path)
    assign_splits(other, val=0.2, test=0.2, seed=5)
    assert split_summary(first)["sha256"] == split_summary(again)["sha256"]
    assert split_summary(first)["sha256"] != split_summary(other)["sha256"]


def test_unsplit_image_joins_patient_split(tmp_path):
    lines = ["path,label,site,patient_id,split"]
    names = []
    for p in range(20):
        for i in range(2):
            name = f"p{p}_{i}.png"
            names.append(name)
            given = "test" if p == 0 and i == 0 else ""
            lines.append(f"{name},{'pos' if p % 2 else 'neg'},A,P{p},{given}")
    manifest = load_manifest(_write(tmp_path, lines, touch=names))
    assign_splits(manifest, val=0.2, test=0.2, seed=0)
    assert {r.split for r in manifest.rows if r.patient_id == "P0"} == {"test"}
    assert patients_in_several_splits(manifest) == {}
