"""Load a finished run back: its study, manifest split, preprocessing and best model.

``medtl evaluate``, ``medtl shift`` and the stress test all start from a run folder
written by :func:`medtl.engine.run_study`; :func:`load_trained_run` rebuilds what
they share so each of them predicts exactly as the run did.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from medtl._host import PluginHost, set_host
from medtl.config import Study, recorded_study_defaults, study_from_dict
from medtl.data import Preprocessor, SkipRecord, load_samples, make_loader, source_name_for
from medtl.errors import ConfigError, DataError
from medtl.evaluation import Predictions, PredictionSet, predict_items
from medtl.manifest import Manifest, Row, load_manifest

__all__ = ["TrainedRun", "load_trained_run", "read_run_study"]

logger = logging.getLogger(__name__)

_BASE_DIR_LINE = re.compile(r"^#\s*Resolved study; base_dir:\s*(?P<base>.*)$")


def read_run_study(run_dir: Path) -> Study:
    """Read a run folder's ``config.yaml`` back into a :class:`Study`.

    The file's first line records the study file's folder (``base_dir``), which the
    relative paths of the study resolve against.
    """
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a medtl run folder: config.yaml is missing. "
                          "Pass a folder that `medtl run` wrote.")
    text = path.read_text(encoding="utf-8")
    first = text.splitlines()[0] if text else ""
    match = _BASE_DIR_LINE.match(first)
    if match is None:
        raise ConfigError(f"{path}: the first line does not record base_dir "
                          "(expected '# Resolved study; base_dir: FOLDER')")
    raw = recorded_study_defaults(yaml.safe_load(text) or {})
    return study_from_dict(raw, base_dir=match.group("base").strip(), source=str(path))


@dataclass
class TrainedRun:
    """A trained model with the data pipeline and manifest of its run."""

    run_dir: Path
    study: Study
    host: PluginHost
    strategy: Any
    labels: list[str]
    manifest: Manifest
    preprocessor: Preprocessor
    sources: dict[str, Any]
    device: torch.device
    record: dict[str, Any]
    source_sites: list[str]
    target_sites: list[str]
    skipped: list[SkipRecord] = field(default_factory=list)

    # -- data ---------------------------------------------------------------

    def load_manifest(self, path: str | Path) -> Manifest:
        """Read another manifest (a new site, say) with this run's labels.

        Every row counts as external test data, whatever its ``split`` column says.
        """
        npz = self.sources.get("npz")
        manifest = load_manifest(Path(path), default_site=self.study.data.site, labels=self.labels,
                                 allow_missing_patient=self.study.data.split.allow_image_split, npz_source=npz)
        for row in manifest.rows:
            row.split = "test"
        self._add_sources(manifest.rows)
        return manifest

    def load_items(self, rows: list[Row], manifest: Manifest | None = None) -> list[dict[str, Any]]:
        """Read and preprocess rows as the run did; bad files follow ``data.on_bad_file``."""
        manifest = manifest or self.manifest
        self._add_sources(rows)
        return load_samples(rows, manifest, self.study, self.sources, self.preprocessor, skipped=self.skipped)

    def read_raw(self, row: Row) -> np.ndarray:
        """Read one image through its source plugin and reorient it to ``data.orientation``.

        The rest of the preprocessing (channels, resizing, intensity) is left to
        ``self.preprocessor``.
        """
        self._add_sources([row])
        array, meta = self.sources[source_name_for(row)].read(row.path)
        array, _meta = self.preprocessor.reorient(np.asarray(array, dtype=np.float32), meta, row.path)
        return array

    def _add_sources(self, rows: list[Row]) -> None:
        for name in sorted({source_name_for(r) for r in rows}):
            if name not in self.sources:
                self.sources[name] = self.host.create("source", name, **self.study.data.sources.get(name, {}))

    # -- prediction ---------------------------------------------------------

    def predict(self, items: list[dict[str, Any]], with_features: bool = False) -> Predictions:
        """Predict class probabilities (and pooled features) for preprocessed items."""
        loader = make_loader(items, [], self.study.train.batch_size, False, 0, self.study.seed)
        return predict_items(self.strategy, loader, self.device, None, with_features=with_features,
                             tta_flip_axes=self.study.evaluation.tta_flip_axes)

    def prediction_set(self, preds: Predictions, manifest: Manifest, site: str, role: str,
                       split: str = "test") -> PredictionSet:
        """Wrap one site's predictions with the patient of each image."""
        patient = {r.index: r.patient_id for r in manifest.rows}
        patients = np.array([patient[int(i)] for i in preds["row"]], dtype=object)
        return PredictionSet(site=site, role=role, labels=preds["label"], probs=preds["probs"],
                             patients=patients, split=split)


def _read_split(run_dir: Path, manifest: Manifest) -> None:
    path = run_dir / "split.csv"
    if not path.is_file():
        raise DataError(f"{path} is missing; the run folder is incomplete. Rerun the study.")
    with path.open(newline="", encoding="utf-8") as fh:
        assigned = {int(r["row"]): r["split"] for r in csv.DictReader(fh)}
    if len(assigned) != len(manifest.rows):
        raise DataError(f"{path} lists {len(assigned)} rows but the manifest {manifest.path} has "
                        f"{len(manifest.rows)}; the manifest changed after the run. Evaluate it with --data.")
    for row in manifest.rows:
        row.split = assigned[row.index]


def load_trained_run(run_dir: str | Path, device: str | None = None,
                     checkpoint: str = "best.pt") -> TrainedRun:
    """Rebuild the model, manifest split and preprocessing of a finished run.

    Args:
        run_dir: a folder written by ``medtl run``.
        device: ``auto``, ``cpu`` or ``cuda[:N]``; default: the run's ``train.device``.
        checkpoint: file under ``checkpoints/`` with keys ``model``, ``strategy`` and ``labels``.

    Raises:
        ConfigError: when the folder is no run folder or the checkpoint is missing.
        DataError: when the manifest no longer matches the run's split.
    """
    from medtl.engine import build_host, build_model, resolve_device
    from medtl.strategy import StrategyContext

    run_dir = Path(run_dir)
    study = read_run_study(run_dir)
    record_path = run_dir / "run.json"
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    ckpt_path = run_dir / "checkpoints" / checkpoint
    if not ckpt_path.is_file():
        raise ConfigError(f"{ckpt_path} is missing; the run did not finish an epoch. Rerun the study.")
    target = resolve_device(device or study.train.device)
    state = torch.load(ckpt_path, map_location=target, weights_only=True)
    labels = list(state["labels"])

    host = build_host(study)
    set_host(host)
    # The checkpoint replaces every weight, so the starting weights file is not read again.
    model_study = study.model_copy(deep=True)
    model_study.model.backbone.weights = None
    model, _ = build_model(model_study, host, len(labels))

    npz = host.create("source", "npz") if "npz" in host.components("source") else None
    manifest = load_manifest(study.resolve_path(study.data.manifest), default_site=study.data.site,
                             labels=labels, allow_missing_patient=study.data.split.allow_image_split,
                             npz_source=npz)
    _read_split(run_dir, manifest)
    roles = {s: (study.sites[s].role if s in study.sites else "source") for s in manifest.sites}
    source_sites = [s for s in manifest.sites if roles[s] == "source"]
    target_sites = [s for s in manifest.sites if roles[s] == "target"]

    strategy = host.create("strategy", study.strategy.name, **study.strategy.options)
    context = StrategyContext(num_classes=len(labels), epochs=study.train.epochs, steps_per_epoch=1,
                              weight_decay=study.optimizer.weight_decay, lr=study.optimizer.lr, device=target,
                              target_sites=target_sites)
    strategy.setup(model.to(target), context)
    strategy.network.to(target)
    strategy.load_state_dict(state["strategy"])
    strategy.eval()
    logger.info("loaded %s (epoch %s) from %s", checkpoint, state.get("epoch"), run_dir)

    # Like the engine, reuse the npz source that read the manifest unless the study sets its options.
    reuse_npz = npz is not None and not study.data.sources.get("npz")
    sources: dict[str, Any] = {"npz": npz} if reuse_npz else {}
    trained = TrainedRun(run_dir=run_dir, study=study, host=host, strategy=strategy, labels=labels,
                         manifest=manifest, preprocessor=Preprocessor(study), sources=sources, device=target,
                         record=record, source_sites=source_sites, target_sites=target_sites)
    return trained
