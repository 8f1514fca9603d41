"""Tests of the study report, methods.md and the report's rendering in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from medtl.methods import AUTHOR_TODO, build_methods, methods_markdown
from medtl.report import flatten_numbers, render_report, update_metrics, write_run_report
from medtl.trained import read_run_study
from sample_run import copy_run, trained_sample_run

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def _load(run: Path) -> tuple:
    study = read_run_study(run)
    record = json.loads((run / "run.json").read_text(encoding="utf-8"))
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    return study, record, metrics


def _fake_shift_and_stress(metrics: dict) -> dict:
    """Add small shift and stress sections so the report draws every plot."""
    metrics = dict(metrics)
    metrics["shift"] = {
        "reference": {"group": "train", "n": 4},
        "comparisons": {"site B": {"role": "external", "n": 4,
                                   "proxy_a_distance": {"pad": 1.2, "error": 0.2},
                                   "mmd": {"mmd2": 0.3, "p_value": 0.01}}},
        "embedding": {"pca": [[0, 0], [1, 1], [2, 0], [3, 1]], "tsne": None, "tsne_note": "t-SNE skipped",
                      "group": ["train", "train", "site B", "site B"], "site": ["A", "A", "B", "B"],
                      "label": ["x", "y", "x", "y"]},
        "histograms": {"train": {"edges": [0, 0.5, 1], "density": [1.2, 0.8], "mean": 0.4, "std": 0.2,
                                 "n_images": 2}},
        "settings": {"permutations": 10},
    }
    metrics["stress"] = {"images": "internal test split of A", "n_images": 4, "shifts": {
        "blur": {"severity": [0, 1, 2, 3, 4, 5], "parameter_name": "sigma", "parameter": [0, 1, 2, 3, 4, 5],
                 "auc": [0.9, 0.85, None, 0.7, 0.6, 0.55], "accuracy": [0.8] * 6, "balanced_accuracy": [0.8] * 6}}}
    return metrics


def test_report_is_self_contained(tmp_path):
    study, record, metrics = _load(trained_sample_run())
    page = render_report(study, record, _fake_shift_and_stress(metrics))
    sources = re.findall(r"src='([^']*)'", page)
    assert len(sources) >= 6, "expected training, ROC, calibration, embedding, histogram and stress plots"
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page
    assert "https://" not in page
    assert "Content-Security-Policy" in page


def test_report_lists_summary_and_metrics():
    study, record, metrics = _load(trained_sample_run())
    page = render_report(study, record, metrics)
    assert metrics["data"]["manifest_sha256"] in page
    assert "resnet10" in page
    assert "medtl_plugins.finetune" in page
    assert "Drop from internal test" in page
    # Patient identifiers never reach the report.
    assert "A000" not in page


def test_methods_cover_claim_topics():
    study, record, metrics = _load(trained_sample_run())
    text = methods_markdown(build_methods(study, record, metrics))
    for heading in ("## Data", "## Ground truth", "## Data partitions", "## Model", "## Training",
                    "## Evaluation", "## Items for the authors to complete"):
        assert heading in text, heading
    assert "disjoint at the level of the patient" in text
    assert "External validation" in text
    assert "site B" in text
    assert f"{AUTHOR_TODO}: definition of each label" in text
    assert "Reference standard" in text.split("## Items for the authors to complete")[1]


def test_methods_report_missing_shift_as_todo():
    study, record, metrics = _load(trained_sample_run())
    sections = build_methods(study, record, metrics)
    failure = [i for s in sections for i in s.items if i.topic == "Failure analysis"][0]
    assert failure.text is None
    filled = build_methods(study, record, _fake_shift_and_stress(metrics))
    failure = [i for s in filled for i in s.items if i.topic == "Failure analysis"][0]
    assert "proxy A-distance" in failure.text
    assert "blur" in failure.text


def test_flatten_numbers_keeps_scalars_and_intervals():
    flat = flatten_numbers({"history": [{"loss": 1.0}], "test": {"A": {"auc": 0.8, "n": 10, "notes": {}}},
                            "evaluation": {"sites": {"A": {"ci": {"auc": [0.7, 0.9]}, "roc": {"fpr": [0, 1]}}}},
                            "flag": True})
    assert flat == {"test.A.auc": 0.8, "test.A.n": 10.0, "evaluation.sites.A.ci.auc_low": 0.7,
                    "evaluation.sites.A.ci.auc_high": 0.9}


def test_update_metrics_replaces_one_section(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"test": {"A": {"auc": 0.5}}, "shift": {"old": 1}}), encoding="utf-8")
    merged = update_metrics(path, "shift", {"new": 2})
    assert merged == {"test": {"A": {"auc": 0.5}}, "shift": {"new": 2}}
    assert json.loads(path.read_text(encoding="utf-8")) == merged


def _chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    run = copy_run(tmp_path)
    study, record, metrics = _load(run)
    report = write_run_report(run, study, record, _fake_shift_and_stress(metrics))
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
               "--enable-logging=stderr", "--dump-dom", report.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", done.stdout)
    assert body, f"no <body> in Chromium's DOM dump: {done.stdout[:500]}"
    attributes = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    assert attributes.get("data-errors") == "0", attributes
    assert int(attributes.get("data-images", "0")) >= 6, attributes
    assert attributes.get("data-images-decoded") == attributes.get("data-images"), attributes
    # Console errors and blocked requests appear on stderr with --enable-logging.
    for line in done.stderr.splitlines():
        assert "Uncaught" not in line, line
        assert "Refused to" not in line, line
