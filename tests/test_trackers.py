"""Tests of the TensorBoard and MLflow tracker plugins, driven through their run-event hooks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from medtl.config import study_from_dict
from medtl.errors import PluginError
from medtl.run import RunContext


def _run(tmp_path: Path, trackers: list[str]) -> RunContext:
    study = study_from_dict({"name": "tracked", "data": {"manifest": "m.csv"}, "trackers": trackers})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "methods.md").write_text("# Methods\n", encoding="utf-8")
    (run_dir / "metrics.json").write_text("{}\n", encoding="utf-8")
    return RunContext(study=study, run_dir=run_dir, host=None)


def _drive(plugin, run: RunContext) -> None:
    plugin.medtl_run_start(run=run)
    plugin.medtl_epoch_end(run=run, epoch=1, metrics={"loss": 0.7, "val_auc": 0.6})
    plugin.medtl_epoch_end(run=run, epoch=2, metrics={"loss": 0.5, "val_auc": 0.7})
    plugin.medtl_run_end(run=run, metrics={"test": {"A": {"auc": 0.75}}}, status="completed")


def test_trackers_off_by_default(tmp_path):
    from medtl_plugins import mlflow_tracker, tensorboard_tracker

    run = _run(tmp_path, [])
    _drive(tensorboard_tracker, run)
    _drive(mlflow_tracker, run)
    assert not (run.run_dir / "tensorboard").exists()
    assert not (run.run_dir / "mlruns").exists()


def test_trackers_are_builtin_plugins():
    from medtl._host import BUILTIN_PLUGINS

    assert "medtl_plugins.tensorboard_tracker" in BUILTIN_PLUGINS
    assert "medtl_plugins.mlflow_tracker" in BUILTIN_PLUGINS


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="the tensorboard extra is not installed")
def test_tensorboard_logs_epochs_and_final_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medtl_plugins import tensorboard_tracker

    run = _run(tmp_path, ["tensorboard"])
    _drive(tensorboard_tracker, run)
    events = EventAccumulator(str(run.run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "epoch/loss" in scalars
    assert [e.value for e in events.Scalars("epoch/loss")] == pytest.approx([0.7, 0.5])
    assert events.Scalars("final/test.A.auc")[0].value == pytest.approx(0.75)


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="the mlflow extra is not installed")
def test_mlflow_logs_to_local_file_store(tmp_path):
    from mlflow.tracking import MlflowClient

    from medtl_plugins import mlflow_tracker

    run = _run(tmp_path, ["mlflow"])
    _drive(mlflow_tracker, run)
    client = MlflowClient(tracking_uri=(run.run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("tracked")
    logged = client.search_runs([experiment.experiment_id])[0]
    assert logged.info.status == "FINISHED"
    assert logged.data.metrics["test.A.auc"] == pytest.approx(0.75)
    assert logged.data.params["name"] == "tracked"
    history = client.get_metric_history(logged.info.run_id, "epoch.loss")
    assert [m.value for m in history] == pytest.approx([0.7, 0.5])
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"methods.md", "metrics.json"} <= artifacts


def test_missing_tracker_package_names_extra(tmp_path, monkeypatch):
    import builtins

    from medtl_plugins import tensorboard_tracker

    real_import = builtins.__import__

    def fail_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fail_tensorboard)
    with pytest.raises(PluginError, match=r"medtl\[tensorboard\]"):
        tensorboard_tracker.medtl_run_start(run=_run(tmp_path, ["tensorboard"]))


def test_unknown_tracker_name_warns_with_closest(tmp_path):
    from medtl._host import PluginHost
    from medtl.config import study_from_dict
    from medtl.preflight import unknown_trackers

    host = PluginHost()
    typo = study_from_dict({"data": {"manifest": "m.csv"}, "trackers": ["tensorbaord", "mlflow"]}, base_dir=tmp_path)
    (warning,) = unknown_trackers(typo, host)
    assert "'tensorbaord'" in warning
    assert "Did you mean 'tensorboard'?" in warning
    known = study_from_dict({"data": {"manifest": "m.csv"}, "trackers": ["tensorboard"]}, base_dir=tmp_path)
    assert unknown_trackers(known, host) == []
