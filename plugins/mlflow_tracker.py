"""MLflow tracker, enabled by ``trackers: [mlflow]`` in the study file.

It logs the study settings as parameters, each epoch's losses and validation
metrics, the final metrics, and the report, metrics and methods files as
artifacts. Everything goes to a local MLflow file store in ``RUN_DIR/mlruns``,
with one experiment per study name. View it with
``mlflow ui --backend-store-uri RUN_DIR/mlruns``.
It never contacts a tracking server. It needs the ``mlflow`` extra:
``pip install 'medtl[mlflow]'``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import medtl
from medtl.errors import PluginError

logger = logging.getLogger(__name__)

TRACKER = "mlflow"

#: MLflow run status per medtl run status.
_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}

# (client, MLflow run id) per active run folder.
_runs: dict[Path, tuple[Any, str]] = {}


def _enabled(run: Any) -> bool:
    return TRACKER in run.study.trackers and run.is_main


def _key(name: str) -> str:
    # MLflow keys allow letters, digits, '_', '-', '.', ' ', '/' only.
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def _params(node: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            out.update(_params(value, f"{prefix}.{key}" if prefix else str(key)))
    else:
        out[_key(prefix)] = str(node)[:500]
    return out


@medtl.hookimpl
def medtl_run_start(run: Any) -> None:
    if not _enabled(run):
        return
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise PluginError("trackers: [mlflow] needs the MLflow package. Install it with "
                          "pip install 'medtl[mlflow]', or remove mlflow from trackers.") from exc
    store = run.path("mlruns")
    # MLflow 3 rejects the file store unless this opt-in is set. medtl logs to a local
    # folder so that no tracking server or database is needed. The variable is set for
    # this process only, and a value the user already set is kept.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    experiment = client.get_experiment_by_name(run.study.name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(run.study.name)
    mlflow_run = client.create_run(experiment_id, run_name=run.run_dir.name)
    run_id = mlflow_run.info.run_id
    for key, value in _params(run.study.to_dict()).items():
        client.log_param(run_id, key, value)
    _runs[run.run_dir] = (client, run_id)
    logger.info("MLflow run %s logs to %s", run_id, store)


@medtl.hookimpl
def medtl_epoch_end(run: Any, epoch: int, metrics: dict[str, float]) -> None:
    entry = _runs.get(run.run_dir)
    if entry is None:
        return
    client, run_id = entry
    for key, value in metrics.items():
        client.log_metric(run_id, _key(f"epoch.{key}"), value, step=epoch)


@medtl.hookimpl
def medtl_run_end(run: Any, metrics: dict[str, Any], status: str) -> None:
    entry = _runs.pop(run.run_dir, None)
    if entry is None:
        return
    from medtl.report import flatten_numbers

    client, run_id = entry
    try:
        for key, value in flatten_numbers(metrics).items():
            client.log_metric(run_id, _key(key), value)
        for name in ("metrics.json", "report.html", "methods.md", "config.yaml"):
            path = run.path(name)
            if path.is_file():
                client.log_artifact(run_id, str(path))
    finally:
        client.set_terminated(run_id, status=_STATUS.get(status, "FAILED"))
