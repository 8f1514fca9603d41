"""Resuming after a crash: SIGKILL mid-training, then ``medtl run --resume`` gives the same result."""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from _engine_helpers import PYTHON, subprocess_env, tiny_study, tiny_study_dict, write_two_site_study
from medtl.checkpoint import load_checkpoint
from medtl.engine import run_study
from medtl.errors import ConfigError, OutputError

STEPS_PER_EPOCH = 3


def _comparable(metrics: dict) -> dict:
    """Drop the wall-clock fields that differ between any two runs."""
    out = dict(metrics)
    out["history"] = [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")}
                      for h in metrics["history"]]
    return out


def _run_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "medtl", "-q", "run", *args], cwd=cwd, env={**subprocess_env(), **env},
                          capture_output=True, text=True, timeout=240)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    manifest = write_two_site_study(tmp_path / "data")
    raw = tiny_study_dict(manifest, tmp_path / "killed", steps_per_epoch=STEPS_PER_EPOCH)
    raw["strategy"]["name"] = "finetune-killable"
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(raw))

    # Killed in epoch 2, step 2: epoch 1's checkpoint is the last complete one.
    killed = _run_cli([str(study_file)], tmp_path, MEDTL_TEST_KILL_AT_STEP=str(STEPS_PER_EPOCH + 2))
    assert killed.returncode == -9, killed.stderr
    run_dir = tmp_path / "killed" / "run"
    assert not (run_dir / "metrics.json").exists()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["train"]["epoch"] == 2

    # A temporary file left by an interrupted write must not be picked up.
    (run_dir / "checkpoints" / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    resumed = _run_cli(["--resume", str(run_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed"
    assert len(record["resumed"]) == 1

    raw["output"]["dir"] = str(tmp_path / "reference")
    study_file.write_text(yaml.safe_dump(raw))
    reference = _run_cli([str(study_file)], tmp_path)
    assert reference.returncode == 0, reference.stderr
    reference_dir = tmp_path / "reference" / "run"

    resumed_metrics = json.loads((run_dir / "metrics.json").read_text())
    reference_metrics = json.loads((reference_dir / "metrics.json").read_text())
    assert _comparable(resumed_metrics) == _comparable(reference_metrics)
    assert (run_dir / "predictions.csv").read_text() == (reference_dir / "predictions.csv").read_text()
    resumed_model = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    reference_model = load_checkpoint(reference_dir / "checkpoints" / "last.pt")["model"]
    for key, value in reference_model.items():
        assert torch.equal(resumed_model[key], value), key


def test_checkpoint_loads_weights_only_and_unwrapped(tmp_path):
    manifest = write_two_site_study(tmp_path / "data", n_per_site=12)
    result = run_study(tiny_study(manifest, tmp_path / "out", epochs=1, steps_per_epoch=2))
    state = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "strategy", "labels", "optimizer", "scheduler", "rng", "loaders", "train"):
        assert key in state, key
    assert not any(k.startswith("module.") for k in state["model"])
    assert state["labels"] == ["neg", "pos"]


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    manifest = write_two_site_study(tmp_path / "data", n_per_site=12)
    result = run_study(tiny_study(manifest, tmp_path / "out", epochs=1, steps_per_epoch=2))
    last = result.run_dir / "checkpoints" / "last.pt"
    before = last.read_bytes()
    checkpoint = load_checkpoint(last)

    def fill_disk(obj, fh, *args, **kwargs):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fill_disk)
    from medtl.checkpoint import save_checkpoint

    with pytest.raises(OutputError, match="No space left on device"):
        save_checkpoint(last, checkpoint, result.run_dir)
    assert last.read_bytes() == before
    assert not list(last.parent.glob(".*.tmp"))


def test_disk_full_during_training_is_output_error(tmp_path, monkeypatch):
    manifest = write_two_site_study(tmp_path / "data", n_per_site=12)
    study = tiny_study(manifest, tmp_path / "out", epochs=2, steps_per_epoch=2)
    real_save = torch.save
    calls = {"n": 0}

    def save_then_fill(obj, fh, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # epoch 1 writes best.pt and last.pt; epoch 2 finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fill)
    with pytest.raises(OutputError, match="medtl run --resume"):
        run_study(study)
    run_dir = tmp_path / "out" / "run"
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["train"]["epoch"] == 2


def test_resume_rejects_completed_run(tmp_path):
    from medtl.run import load_run_study

    manifest = write_two_site_study(tmp_path / "data", n_per_site=12)
    result = run_study(tiny_study(manifest, tmp_path / "out", epochs=1, steps_per_epoch=1))
    with pytest.raises(ConfigError, match="already completed"):
        load_run_study(result.run_dir)


def test_resume_rejects_folder_without_run(tmp_path):
    from medtl.run import load_run_study

    with pytest.raises(ConfigError, match="not a medtl run folder"):
        load_run_study(tmp_path)
