"""Resuming after a crash or Ctrl-C gives the result of an uninterrupted run."""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from _engine_helpers import PYTHON, subprocess_env, tiny_study_dict, write_two_site_study
from medtl.checkpoint import load_checkpoint, save_checkpoint
from medtl.config import study_from_dict
from medtl.engine import run_study
from medtl.errors import EXIT_INTERRUPTED, ConfigError, OutputError
from medtl.run import load_run_study

STEPS_PER_EPOCH = 3


@pytest.fixture(scope="module")
def data_manifest(tmp_path_factory) -> Path:
    return write_two_site_study(tmp_path_factory.mktemp("data"))


@pytest.fixture()
def one_thread():
    # The subprocesses run with OMP_NUM_THREADS=1; bit-identical results need the
    # same thread count in this process.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _raw_study(manifest: Path, output_dir: Path) -> dict:
    raw = tiny_study_dict(manifest, output_dir, steps_per_epoch=STEPS_PER_EPOCH)
    raw["strategy"]["name"] = "finetune-signalled"
    return raw


@pytest.fixture(scope="module")
def reference(data_manifest, tmp_path_factory) -> Path:
    """An uninterrupted run of the study that the resume tests interrupt."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("reference")
        raw = _raw_study(data_manifest, out)
        return run_study(study_from_dict(raw, base_dir=data_manifest.parent)).run_dir
    finally:
        torch.set_num_threads(previous)


def _comparable(run_dir: Path) -> dict:
    """Return metrics.json without the wall-clock fields that differ between any two runs."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["history"] = [{k: v for k, v in h.items() if k not in ("seconds", "cpu_seconds", "images_per_s")}
                          for h in metrics["history"]]
    return metrics


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    assert _comparable(run_dir) == _comparable(reference)
    assert (run_dir / "predictions.csv").read_text() == (reference / "predictions.csv").read_text()
    model = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    reference_model = load_checkpoint(reference / "checkpoints" / "last.pt")["model"]
    for key, value in reference_model.items():
        assert torch.equal(model[key], value), key


def test_sigkill_then_resume_matches_uninterrupted(data_manifest, reference, tmp_path, one_thread):
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(_raw_study(data_manifest, tmp_path / "out")))

    # Killed before epoch 2, step 2: epoch 1's checkpoint is the last complete one.
    env = {**subprocess_env(), "MEDTL_TEST_SIGNAL_AT_STEP": f"{STEPS_PER_EPOCH + 2}:SIGKILL"}
    killed = subprocess.run([PYTHON, "-m", "medtl", "-q", "run", str(study_file)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=240)
    assert killed.returncode == -9, killed.stderr
    run_dir = tmp_path / "out" / "run"
    assert not (run_dir / "metrics.json").exists()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["train"]["epoch"] == 2

    # A temporary file left by an interrupted write must not be picked up.
    (run_dir / "checkpoints" / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    run_study(load_run_study(run_dir), resume=run_dir)

    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed"
    assert len(record["resumed"]) == 1
    _assert_same_run(run_dir, reference)


def test_ctrl_c_saves_mid_epoch_checkpoint(data_manifest, reference, tmp_path, monkeypatch, one_thread, capsys):
    from medtl.cli import main

    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(_raw_study(data_manifest, tmp_path / "out")))
    monkeypatch.setenv("MEDTL_TEST_SIGNAL_AT_STEP", f"{STEPS_PER_EPOCH + 2}:SIGINT")
    assert main(["-q", "run", str(study_file)]) == EXIT_INTERRUPTED
    assert "medtl run --resume" in capsys.readouterr().err

    run_dir = tmp_path / "out" / "run"
    position = load_checkpoint(run_dir / "checkpoints" / "last.pt")["train"]
    assert (position["epoch"], position["step"]) == (2, 2)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"

    monkeypatch.delenv("MEDTL_TEST_SIGNAL_AT_STEP")
    assert main(["-q", "run", "--resume", str(run_dir)]) == 0
    _assert_same_run(run_dir, reference)


def test_checkpoint_loads_weights_only_and_unwrapped(reference):
    state = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "strategy", "labels", "optimizer", "scheduler", "rng", "loaders", "train"):
        assert key in state, key
    assert not any(k.startswith("module.") for k in state["model"])
    assert state["labels"] == ["neg", "pos"]


def test_disk_full_keeps_previous_checkpoint(reference, tmp_path, monkeypatch):
    last = tmp_path / "last.pt"
    last.write_bytes((reference / "checkpoints" / "last.pt").read_bytes())
    before = last.read_bytes()
    checkpoint = load_checkpoint(last)

    def fill_disk(obj, fh, *args, **kwargs):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fill_disk)
    with pytest.raises(OutputError, match="No space left on device"):
        save_checkpoint(last, checkpoint, tmp_path)
    assert last.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_disk_full_during_training_is_output_error(data_manifest, tmp_path, monkeypatch):
    raw = tiny_study_dict(data_manifest, tmp_path / "out", epochs=2, steps_per_epoch=1)
    real_save = torch.save
    calls = {"n": 0}

    def save_then_fill(obj, fh, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # epoch 1 writes best.pt and last.pt; epoch 2 finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fill)
    with pytest.raises(OutputError, match="medtl run --resume"):
        run_study(study_from_dict(raw, base_dir=data_manifest.parent))
    run_dir = tmp_path / "out" / "run"
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["train"]["epoch"] == 2
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"


def test_output_dir_not_writable(data_manifest, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    raw = tiny_study_dict(data_manifest, blocker / "runs")
    with pytest.raises(OutputError, match="Set output.dir to a writable folder"):
        run_study(study_from_dict(raw, base_dir=data_manifest.parent))


def test_resume_rejects_completed_run(reference):
    with pytest.raises(ConfigError, match="already completed"):
        load_run_study(reference)


def test_resume_rejects_folder_without_run(tmp_path):
    with pytest.raises(ConfigError, match="not a medtl run folder"):
        load_run_study(tmp_path)


def test_infinite_loader_resumes_mid_pass():
    from medtl.data import InfiniteLoader, make_loader

    items = [{"image": torch.full((1, 2, 2), float(i)), "label": i % 2, "row": i, "site": "S"} for i in range(10)]

    def rows(loader: InfiniteLoader, count: int) -> list[list[int]]:
        return [loader.next()["row"].tolist() for _ in range(count)]

    uninterrupted = InfiniteLoader(make_loader(items, [], 3, True, 0, seed=5, drop_last=True))
    expected = rows(uninterrupted, 8)  # 3 batches per pass, so this crosses two pass boundaries

    first = InfiniteLoader(make_loader(items, [], 3, True, 0, seed=5, drop_last=True))
    before = rows(first, 4)
    resumed = InfiniteLoader(make_loader(items, [], 3, True, 0, seed=5, drop_last=True))
    resumed.load_state_dict(first.state_dict())
    assert before + rows(resumed, 4) == expected
    assert expected[0] != expected[3], "each pass is shuffled anew"
