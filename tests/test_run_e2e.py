"""The default sample study, end to end, with few epochs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import SAMPLE_STUDY
from medtl.cli import main
from medtl.errors import EXIT_DATA


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    code = main(["run", str(SAMPLE_STUDY), "--set", f"output.dir={out}", "--set", "train.epochs=2",
                 "--set", "output.name=e2e"])
    assert code == 0
    return out / "e2e"


def test_run_folder_contents(run_dir: Path):
    for name in ("config.yaml", "run.log", "run.json", "split.csv", "metrics.json", "predictions.csv",
                 "report.html", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (run_dir / name).is_file(), name


def test_metrics_per_site_in_range(run_dir: Path):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["test"]) == {"A", "B"}
    for site, values in metrics["test"].items():
        assert 0.0 <= values["auc"] <= 1.0, site
        assert 0.0 <= values["accuracy"] <= 1.0, site
        assert 0.0 <= values["balanced_accuracy"] <= 1.0, site
        assert values["n"] > 0, site


def test_predictions_cover_test_splits(run_dir: Path):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with (run_dir / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for site in ("A", "B"):
        assert sum(r["site"] == site for r in rows) == metrics["test"][site]["n"]
    probs = [float(rows[0]["prob_nodule"]), float(rows[0]["prob_normal"])]
    assert sum(probs) == pytest.approx(1.0, abs=1e-4)


def test_split_keeps_patients_together(run_dir: Path):
    with (run_dir / "split.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    splits_of_patient: dict[str, set[str]] = {}
    for r in rows:
        splits_of_patient.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of_patient.values())
    assert {r["split"] for r in rows} == {"train", "val", "test"}


def test_run_record_has_versions_and_hash(run_dir: Path):
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed"
    assert len(record["manifest_sha256"]) == 64
    assert {"medtl", "torch", "monai", "numpy"} <= set(record["versions"])


def test_missing_image_is_a_data_error(tmp_path: Path, capsys):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,site,patient_id\nnope.dcm,1,A,p1\nalso-nope.dcm,0,A,p2\n")
    study = tmp_path / "study.yaml"
    study.write_text(f"data: {{manifest: manifest.csv}}\noutput: {{dir: {tmp_path / 'runs'}}}\n")
    code = main(["run", str(study)])
    err = capsys.readouterr().err
    assert code == EXIT_DATA
    assert "file not found: nope.dcm" in err
    assert "file not found: also-nope.dcm" in err
