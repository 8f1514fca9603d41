"""Determinism: the same study and seed give bit-identical results, and the run record pins the inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _engine_helpers import tiny_study_dict, write_two_site_study
from medtl.config import study_from_dict
from medtl.engine import run_study
from medtl.manifest import file_sha256


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_two_site_study(tmp_path_factory.mktemp("data"), n_per_site=16)


def _run(manifest: Path, out: Path, **train) -> Path:
    raw = tiny_study_dict(manifest, out, epochs=2, steps_per_epoch=2, **train)
    return run_study(study_from_dict(raw, base_dir=manifest.parent)).run_dir


def _results(run_dir: Path) -> tuple[dict, str]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["history"] = [{k: v for k, v in h.items() if k not in ("seconds", "cpu_seconds", "images_per_s")}
                          for h in metrics["history"]]
    return metrics, (run_dir / "predictions.csv").read_text()


@pytest.fixture(scope="module")
def base_run(manifest, tmp_path_factory) -> Path:
    return _run(manifest, tmp_path_factory.mktemp("base"))


def test_same_seed_bit_identical(manifest, base_run, tmp_path):
    assert _results(_run(manifest, tmp_path / "again")) == _results(base_run)


def test_worker_count_does_not_change_result(manifest, base_run, tmp_path):
    # Augmentation is seeded per sample and pass, not per worker process.
    assert _results(_run(manifest, tmp_path / "workers2", num_workers=2)) == _results(base_run)


def test_other_seed_changes_result(manifest, base_run, tmp_path):
    raw = tiny_study_dict(manifest, tmp_path / "seed", epochs=2, steps_per_epoch=2)
    raw["seed"] = 11
    other = run_study(study_from_dict(raw, base_dir=manifest.parent)).run_dir
    assert _results(other) != _results(base_run)


def test_run_record_pins_versions_data_split_and_config(manifest, base_run):
    run_dir = base_run
    record = json.loads((run_dir / "run.json").read_text())
    for package in ("medtl", "torch", "monai", "numpy"):
        assert record["versions"][package], package
    assert record["versions"]["plugins"]["_engine_helpers"] == "module"
    assert record["versions"]["plugins"]["medtl_plugins.finetune"]
    assert record["manifest_sha256"] == file_sha256(manifest)
    assert record["split"]["sha256"] == file_sha256(run_dir / "split.csv")
    assert record["split"]["images"]["train"] > 0
    assert record["config"]["train"]["epochs"] == 2
    assert record["config"]["seed"] == 3


def test_bf16_channels_last_losses_finite(manifest, tmp_path):
    import math

    raw = tiny_study_dict(manifest, tmp_path / "bf16", epochs=1, steps_per_epoch=2, precision="bf16",
                          channels_last=True, device="cpu")
    result = run_study(study_from_dict(raw, base_dir=manifest.parent))
    assert all(math.isfinite(entry["loss"]) for entry in result.metrics["history"])
    for values in result.metrics["test"].values():
        assert values["n"] > 0
