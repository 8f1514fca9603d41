"""End-to-end tests of `medtl evaluate`, `medtl shift` and `medtl compare` on the sample study."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from medtl.cli import main
from sample_run import REPO, copy_run, trained_sample_run

pytestmark = pytest.mark.skipif(not (REPO / "sample_data" / "manifest.csv").is_file(),
                                reason="sample_data/manifest.csv is missing")


@pytest.fixture(scope="module")
def shifted_run(tmp_path_factory):
    """A copy of the sample run after `medtl evaluate` and `medtl shift` ran on it."""
    run = copy_run(tmp_path_factory.mktemp("shifted"))
    assert main(["-q", "evaluate", str(run), "--bootstrap", "30"]) == 0
    assert main(["-q", "shift", str(run), "--permutations", "50", "--stress", "gamma", "--no-tsne"]) == 0
    return run


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text(encoding="utf-8"))


def test_run_writes_site_intervals():
    evaluation = _metrics(trained_sample_run())["evaluation"]
    assert set(evaluation["sites"]) == {"A", "B"}
    assert evaluation["sites"]["A"]["role"] == "internal"
    assert evaluation["sites"]["B"]["role"] == "external"
    assert evaluation["bootstrap"]["resamples"] == 20
    assert "B" in evaluation["drops"]


def test_evaluate_matches_engine_metrics(shifted_run):
    metrics = _metrics(shifted_run)
    evaluation = metrics["evaluation"]
    assert evaluation["bootstrap"]["resamples"] == 30
    for site in ("A", "B"):
        # The rebuilt model predicts exactly as the engine did at the end of the run.
        assert evaluation["sites"][site]["auc"] == pytest.approx(metrics["test"][site]["auc"], abs=1e-6)
        assert evaluation["sites"][site]["n_images"] == metrics["test"][site]["n"]
        ci = evaluation["sites"][site]["ci"]["auc"]
        assert ci[0] <= evaluation["sites"][site]["auc"] <= ci[1]
    assert evaluation["threshold"]["method"] in ("youden", "default")


def test_shift_larger_at_external_site(shifted_run):
    comparisons = _metrics(shifted_run)["shift"]["comparisons"]
    internal, external = comparisons["internal test"], comparisons["site B"]
    assert external["proxy_a_distance"]["pad"] > internal["proxy_a_distance"]["pad"]
    assert external["mmd"]["mmd2"] > internal["mmd"]["mmd2"]
    assert external["mmd"]["p_value"] < 0.05


def test_shift_writes_stress_and_report(shifted_run):
    metrics = _metrics(shifted_run)
    curve = metrics["stress"]["shifts"]["gamma"]
    assert curve["severity"] == [0, 1, 2, 3, 4, 5]
    assert len(curve["auc"]) == 6
    report = (shifted_run / "report.html").read_text(encoding="utf-8")
    for heading in ("Study summary", "Training curves", "Metrics per site", "Dataset shift",
                    "Stress test", "Methods (CLAIM)"):
        assert heading in report, heading
    assert (shifted_run / "methods.md").is_file()


def test_evaluate_new_manifest_writes_external_folder(tmp_path):
    run = trained_sample_run()
    rows = list(csv.DictReader((REPO / "sample_data" / "manifest.csv").open(encoding="utf-8")))
    site_b = [r for r in rows if r["site"] == "B"][:30]
    manifest = tmp_path / "new_site.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "site", "patient_id"])
        writer.writeheader()
        for r in site_b:
            writer.writerow({"path": str(REPO / "sample_data" / r["path"]), "label": r["label"], "site": "C",
                             "patient_id": r["patient_id"]})
    out = tmp_path / "external"
    assert main(["-q", "evaluate", str(run), "--data", str(manifest), "--bootstrap", "10", "--out", str(out)]) == 0
    evaluation = _metrics(out)["evaluation"]
    assert evaluation["sites"]["C"]["role"] == "external"
    assert evaluation["sites"]["C"]["n_images"] == 30
    assert evaluation["sites"]["A"]["role"] == "internal"
    assert "C" in evaluation["drops"]
    assert (out / "report.html").is_file()
    assert _metrics(out)["external_data"]["manifest"] == "new_site.csv"


def test_evaluate_rejects_non_run_folder(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err


def test_shift_rejects_unknown_stress(capsys):
    assert main(["shift", str(trained_sample_run()), "--stress", "fog"]) == 2
    assert "unknown shift(s) fog" in capsys.readouterr().err


def test_compare_lists_runs_and_matrix(shifted_run, tmp_path, capsys):
    out = tmp_path / "comparison"
    assert main(["-q", "compare", str(trained_sample_run()), str(shifted_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "finetune" in printed
    comparison = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    assert [r["name"] for r in comparison["runs"]] == ["tiny", "run"]
    assert comparison["matrix"]["A"]["B"]["runs"] == 2
    assert (out / "report.html").is_file()
