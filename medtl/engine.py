"""The training engine: one study from manifest to run folder.

The same code runs in a single process and under ``torchrun``, where each process
trains a DistributedDataParallel replica on its shard of every global batch and
only rank 0 writes outputs. Checkpoints hold everything a resumed run needs to
continue exactly where the interrupted one stopped.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from medtl import distributed as dist
from medtl._host import PluginHost, set_host
from medtl.cache import open_cache
from medtl.checkpoint import CHECKPOINT_FORMAT, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from medtl.config import Study
from medtl.data import InfiniteLoader, Preprocessor, SkipRecord, load_samples, make_loader, source_name_for
from medtl.errors import ConfigError, DataError, MedtlError, OutputError, RunInterrupted, TrainingError
from medtl.evaluation import Predictions, evaluation_from_predictions, predict_items, site_metrics
from medtl.manifest import Manifest, assign_splits, load_manifest, split_summary, write_split_csv
from medtl.model import Classifier
from medtl.run import RunContext, attach_log_file, create_run_dir, versions, write_resolved_config
from medtl.runio import atomic_write_json, atomic_write_text
from medtl.selection import make_selection
from medtl.strategy import Strategy, StrategyContext
from medtl.weights import load_backbone_weights

__all__ = ["run_study", "RunResult", "build_host", "build_model", "seed_everything", "resolve_device"]

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------


def build_host(study: Study) -> PluginHost:
    """Create the plugin host that a study configures (blocked, allowed and local plugins).

    Local modules in ``plugins.modules`` are looked up in the study file's folder first.
    """
    return PluginHost(block=study.plugins.block, allow=study.plugins.allow, modules=study.plugins.modules,
                      search_path=[study.base_dir], strict=study.plugins.strict)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and MONAI, and make cuDNN pick deterministic algorithms.

    The random augmentation is seeded per sample by :class:`medtl.data.AugmentedDataset`.
    """
    from monai.utils import set_determinism

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    set_determinism(seed=seed)


def resolve_device(name: str) -> torch.device:
    """Turn ``train.device`` into a device; ``auto`` takes CUDA when it is available.

    Under ``torchrun``, ``cuda`` without an index means the GPU of ``LOCAL_RANK``.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but CUDA is not available; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def build_model(study: Study, host: PluginHost, num_classes: int) -> tuple[Classifier, dict[str, Any] | None]:
    """Build backbone, pooling and head from their plugins; load starting weights."""
    cfg = study.model
    backbone = host.create("backbone", cfg.backbone.name, spatial_dims=study.data.spatial_dims,
                           in_channels=study.data.channels, **cfg.backbone.options)
    pooling = host.create("pooling", cfg.pooling.name, in_channels=int(backbone.out_channels), **cfg.pooling.options)
    load_report = None
    if cfg.backbone.weights:
        load_report = dict(load_backbone_weights(backbone, study.resolve_path(cfg.backbone.weights),
                                                 strict=cfg.backbone.strict))
    return Classifier(backbone, pooling, num_classes, dropout=cfg.head.dropout), load_report


def build_optimizer(groups: list[dict[str, Any]], study: Study) -> torch.optim.Optimizer:
    cfg = study.optimizer
    for group in groups:
        group["lr"] = cfg.lr * group.pop("lr_scale", 1.0)
        group.setdefault("weight_decay", cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(study: Study, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at a step: linear warmup, then the schedule's decay."""
    cfg = study.schedule
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.name == "cosine":
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "dann":
        # Ganin et al. (JMLR 2016): mu_p = mu_0 / (1 + alpha * p) ** beta
        return 1.0 / (1.0 + cfg.alpha * progress) ** cfg.beta
    return 1.0


def _autocast_factory(precision: str, device: torch.device) -> Callable[[], Any] | None:
    """Return a factory of autocast contexts for ``train.precision``, or None for fp32.

    Losses and softmax are computed in float32 by the strategies and by
    :func:`medtl.evaluation.predict_items`; components with numerically sensitive
    steps (matrix square roots, contrastive logits) leave autocast themselves.
    """
    if precision == "fp32":
        return None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision fp16 needs a CUDA device; use bf16 on CPU")
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _memory_format(study: Study) -> torch.memory_format | None:
    if not study.train.channels_last:
        return None
    return torch.channels_last if study.data.spatial_dims == 2 else torch.channels_last_3d


def _write_output(path: Path, write: Callable[[Path], None]) -> None:
    """Run an output write, turning an OSError (disk full, no permission) into an OutputError."""
    try:
        write(path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}. Free disk space or fix "
                          "the folder's permissions; checkpoints written earlier are intact.") from exc


class _StopRequest:
    """Turns SIGINT and SIGTERM into a request to stop after the current training step.

    A second signal raises KeyboardInterrupt at once. Handlers are only installed
    from the main thread, because Python allows signal handlers nowhere else.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self.uninstall()
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("received %s: stopping after this step and saving a resumable checkpoint; "
                       "send it again to stop at once", signal.Signals(signum).name)


@dataclass
class TrainState:
    """Training progress: the epoch in progress and the steps done in it.

    After epoch ``e`` ends, ``epoch`` is ``e + 1`` and ``step`` is 0. ``sums`` and
    ``seen`` accumulate the epoch in progress, so a checkpoint taken mid-epoch
    resumes with the same epoch averages.
    """

    epoch: int = 1
    step: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    seen: int = 0
    best_score: float = -math.inf
    best_epoch: int = 0
    best_val_score: float = -math.inf
    best_val_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    selection: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "sums": dict(self.sums), "seen": self.seen,
                "best_score": self.best_score, "best_epoch": self.best_epoch,
                "best_val_score": self.best_val_score, "best_val_epoch": self.best_val_epoch,
                "history": list(self.history), "selection": dict(self.selection)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "TrainState":
        return cls(**state)


# ---------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------


class _Study:
    """State of one run while it goes through its phases."""

    def __init__(self, study: Study, host: PluginHost, ctx: RunContext, device: torch.device,
                 checkpoint: dict[str, Any] | None = None):
        self.study = study
        self.host = host
        self.ctx = ctx
        self.device = device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.autocast = _autocast_factory(study.train.precision, self.device)
        self.memory_format = _memory_format(study)
        self.checkpoint = checkpoint
        self.skipped: list[SkipRecord] = []

    # -- data ---------------------------------------------------------------

    def load_data(self) -> None:
        study, host = self.study, self.host
        npz = host.create("source", "npz") if "npz" in host.components("source") else None
        manifest_path = study.resolve_path(study.data.manifest)
        self.manifest: Manifest = load_manifest(
            manifest_path, default_site=study.data.site, labels=study.data.labels,
            allow_missing_patient=study.data.split.allow_image_split, npz_source=npz,
        )
        assign_splits(self.manifest, study.data.split.val, study.data.split.test, study.seed)
        if self.ctx.is_main:
            _write_output(self.ctx.path("split.csv"), lambda p: write_split_csv(self.manifest, p))

        sites = self.manifest.sites
        unknown = sorted(set(study.sites) - set(sites))
        if unknown:
            raise ConfigError(f"sites: {unknown} are not in the manifest, which has sites {sites}")
        roles = {s: (study.sites[s].role if s in study.sites else "source") for s in sites}
        undeclared = [s for s in sites if s not in study.sites]
        if study.sites and undeclared:
            logger.warning("sites %s are in the manifest but not under sites:; they are trained on as "
                           "labeled source sites. Add them under sites: to set their role.", undeclared)
        self.source_sites = [s for s in sites if roles[s] == "source"]
        self.target_sites = [s for s in sites if roles[s] == "target"]
        if not self.source_sites:
            raise ConfigError("no site has role: source; training needs at least one labeled site")

        names = sorted({source_name_for(r) for r in self.manifest.rows})
        self.sources = {n: host.create("source", n, **study.data.sources.get(n, {})) for n in names}
        if npz is not None and "npz" in self.sources and not study.data.sources.get("npz"):
            self.sources["npz"] = npz  # reuse the arrays already read for the manifest
        self.preprocessor = Preprocessor(study)
        self.cache = open_cache(study, self.sources)

        def load(rows: list) -> list[dict[str, Any]]:
            return load_samples(rows, self.manifest, study, self.sources, self.preprocessor, cache=self.cache,
                                skipped=self.skipped)

        m = self.manifest
        self.train_items = load([r for s in self.source_sites for r in m.select(s, "train") if r.label is not None])
        self.val_items = load([r for s in self.source_sites for r in m.select(s, "val") if r.label is not None])
        self.target_items = load([r for s in self.target_sites for r in m.select(s, "train")])
        self.target_val_items = (load([r for s in self.target_sites for r in m.select(s, "val")])
                                 if study.train.select else [])
        self.eval_items = {
            split: {site: load(m.select(site, split)) for site in sites} for split in study.evaluation.splits
        }
        if not self.train_items:
            raise DataError("no labeled training images in the source sites after splitting")
        logger.info("data: %d train, %d val, %d unlabeled target images; %d skipped",
                    len(self.train_items), len(self.val_items), len(self.target_items), len(self.skipped))
        if self.cache is not None:
            logger.info("cache %s: %d hits, %d misses", self.cache.root, self.cache.hits, self.cache.misses)

    def make_loaders(self, strategy: Strategy) -> None:
        study = self.study
        t = study.train
        if t.batch_size % self.world_size:
            raise ConfigError(f"train.batch_size is the global batch, {t.batch_size}, which does not divide "
                              f"into {self.world_size} processes; set it to a multiple of {self.world_size}")
        self.local_batch = t.batch_size // self.world_size
        pin = self.device.type == "cuda"
        preset = study.transforms.preset
        augment = self.host.create("transform", preset, data=study.data, **study.transforms.options)
        shard: dict[str, Any] = {"rank": self.rank, "world_size": self.world_size, "pin_memory": pin}
        self.train_loader = make_loader(self.train_items, augment, self.local_batch, True, t.num_workers,
                                        study.seed, drop_last=True, **shard)
        self.target_loader = None
        if strategy.uses_target:
            if not self.target_items:
                raise ConfigError(f"strategy {study.strategy.name!r} needs unlabeled target images, "
                                  "but no site has role: target")
            self.target_loader = make_loader(self.target_items, augment, self.local_batch, True, t.num_workers,
                                             study.seed + 1, drop_last=True, **shard)
        self.val_loader = self._eval_loader(self.val_items)
        self.steps_per_epoch = t.steps_per_epoch or max(1, len(self.train_loader))
        # The validator scores whole sets on every rank, so it gets an unsharded source loader.
        selection_source = self.val_loader if self.world_size == 1 else make_loader(
            self.val_items, [], self.local_batch, False, 0, study.seed, pin_memory=self.device.type == "cuda")
        self.selection = make_selection(study, self.host, self.target_val_items, selection_source, make_loader)

    def _eval_loader(self, items: list[dict[str, Any]]) -> Any:
        return make_loader(items, [], self.local_batch, False, 0, self.study.seed, rank=self.rank,
                           world_size=self.world_size, pin_memory=self.device.type == "cuda")

    # -- model --------------------------------------------------------------

    def build(self) -> Strategy:
        study = self.study
        num_classes = len(self.manifest.labels)
        model, load_report = build_model(study, self.host, num_classes)
        if load_report is not None:
            self.ctx.record["weights"] = load_report
        self.strategy: Strategy = self.host.create("strategy", study.strategy.name, **study.strategy.options)
        context = StrategyContext(
            num_classes=num_classes, epochs=study.train.epochs, steps_per_epoch=1,
            weight_decay=study.optimizer.weight_decay, lr=study.optimizer.lr, device=self.device,
            target_sites=self.target_sites,
        )
        self.strategy_context = context
        self.strategy.setup(model.to(self.device), context)
        self.strategy.network.to(self.device)
        if self.memory_format is not None:
            self.strategy.network.to(memory_format=self.memory_format)
        return self.strategy

    def _wrap_network(self) -> torch.nn.Module:
        """Return the module that ``train_step`` calls: the network, or its DDP wrapper."""
        network = self.strategy.network
        if self.world_size == 1:
            return network
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(network, device_ids=device_ids,
                                       find_unused_parameters=self.study.train.find_unused_parameters)

    # -- training -----------------------------------------------------------

    def train(self) -> list[dict[str, Any]]:
        study, strategy = self.study, self.strategy
        self.strategy_context.steps_per_epoch = self.steps_per_epoch
        optimizer = build_optimizer(strategy.parameter_groups(), study)
        total = study.train.epochs * self.steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(study, step, total, self.steps_per_epoch))
        scaler = torch.amp.GradScaler("cuda") if study.train.precision == "fp16" else None
        loaders = {"source": InfiniteLoader(self.train_loader)}
        if self.target_loader is not None:
            loaders["target"] = InfiniteLoader(self.target_loader)
        state = TrainState()
        if self.checkpoint is not None:
            state = self._restore(self.checkpoint, optimizer, scheduler, scaler, loaders)
        self.trainer = _Trainer(self, optimizer, scheduler, scaler, loaders, total)
        stop = _StopRequest()
        stop.install()
        try:
            self.trainer.fit(state, stop)
        finally:
            stop.uninstall()
        self.best_epoch = state.best_epoch
        self.best_val_epoch = state.best_val_epoch
        return state.history

    def _restore(self, checkpoint: dict[str, Any], optimizer: Any, scheduler: Any, scaler: Any,
                 loaders: dict[str, InfiniteLoader]) -> TrainState:
        """Load a resumable checkpoint into the freshly built run, RNG states last."""
        self.strategy.load_state_dict(checkpoint["strategy"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        for name, loader in loaders.items():
            loader.load_state_dict(checkpoint["loaders"][name])
        rng_states = checkpoint["rng"]
        if len(rng_states) == self.world_size:
            restore_rng_state(rng_states[self.rank])
        else:
            logger.warning("the checkpoint was written by %d processes and this run has %d; every process "
                           "restores rank 0's random state, so dropout and mixup draws differ from an "
                           "uninterrupted run", len(rng_states), self.world_size)
            restore_rng_state(rng_states[0])
        state = TrainState.from_state_dict(checkpoint["train"])
        if self.selection is not None and state.selection:
            self.selection.scores = dict(state.selection["scores"])
            self.selection.oracle = dict(state.selection["oracle"])
        logger.info("resuming at epoch %d, step %d of %d", state.epoch, state.step, self.steps_per_epoch)
        return state

    def checkpoint_state(self, state: TrainState, optimizer: Any, scheduler: Any, scaler: Any,
                         loaders: dict[str, InfiniteLoader]) -> dict[str, Any]:
        """Collect a checkpoint. Every rank must call it, because it gathers their RNG states."""
        rng_states = dist.all_gather_objects(capture_rng_state())
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": state.epoch - 1,  # completed epochs
            "model": self.strategy.model.state_dict(),
            "strategy": self.strategy.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "labels": self.manifest.labels,
            "loaders": {name: loader.state_dict() for name, loader in loaders.items()},
            "rng": rng_states,
            "train": state.state_dict(),
            "world_size": self.world_size,
        }

    def save_checkpoint(self, name: str, checkpoint: dict[str, Any]) -> None:
        if self.ctx.is_main:
            save_checkpoint(self.ctx.path("checkpoints", name), checkpoint, self.ctx.run_dir)

    def metric_fns(self) -> dict[str, Any]:
        names = list(dict.fromkeys(self.study.evaluation.metrics + [self.study.train.select_metric]))
        return {n: self.host.factory("metric", n) for n in names if n != "loss"}

    def validate(self, metric_fns: dict[str, Any]) -> dict[str, Any]:
        preds = self._predict(self.val_loader)
        if len(preds["label"]) == 0:
            return {"loss": 0.0}
        result = site_metrics(preds["label"], preds["probs"], metric_fns)
        probs = np.clip(preds["probs"][np.arange(len(preds["label"])), preds["label"]], 1e-12, 1.0)
        result["loss"] = float(-np.log(probs).mean())
        return result

    def _predict(self, loader: Any) -> Predictions:
        """Predict this rank's shard and gather every rank's, in item order."""
        preds = predict_items(self.strategy, loader, self.device, self.autocast,
                              tta_flip_axes=self.study.evaluation.tta_flip_axes)
        return _merge_shards(dist.all_gather_objects(dict(preds)))

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, non_blocking=True)
                if key == "image" and self.memory_format is not None:
                    value = value.contiguous(memory_format=self.memory_format)
            out[key] = value
        return out

    # -- evaluation ---------------------------------------------------------

    def evaluate(self) -> tuple[dict[str, Any], list[Predictions]]:
        if self.ctx.is_main:
            best = load_checkpoint(self.ctx.path("checkpoints", "best.pt"), map_location=self.device)
            self.strategy.load_state_dict(best["strategy"])
        dist.broadcast_module_state(self.strategy.network)
        metric_fns = {n: self.host.factory("metric", n) for n in self.study.evaluation.metrics}
        results: dict[str, Any] = {}
        all_preds = []
        for split, per_site in self.eval_items.items():
            results[split] = {}
            for site, items in per_site.items():
                preds = self._predict(self._eval_loader(items))
                preds["split"] = split
                all_preds.append(preds)
                results[split][site] = site_metrics(preds["label"], preds["probs"], metric_fns)
        return results, all_preds

    def cross_site_evaluation(self, all_preds: list[Predictions]) -> dict[str, Any]:
        """Per-site metrics with patient-bootstrap intervals, validation threshold and drops."""
        splits = self.study.evaluation.splits
        if not splits:
            return {}
        split = "test" if "test" in splits else splits[0]
        val_preds = self._predict(self.val_loader)
        patient_of_row = {r.index: r.patient_id for r in self.manifest.rows}
        return evaluation_from_predictions(val_preds, [p for p in all_preds if p["split"] == split],
                                           patient_of_row, self.source_sites, self.study.evaluation.bootstrap,
                                           self.study.seed)

    def write_predictions(self, all_preds: list[Predictions]) -> None:
        patient = {r.index: r.patient_id for r in self.manifest.rows}
        labels = self.manifest.labels
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["row", "site", "split", "patient_id", "label", "prediction"] + [f"prob_{l}" for l in labels])
        for preds in all_preds:
            for i in range(len(preds["row"])):
                row = int(preds["row"][i])
                lab = int(preds["label"][i])
                writer.writerow([row, preds["site"][i], preds["split"], patient[row], labels[lab] if lab >= 0 else "",
                                 labels[int(preds["probs"][i].argmax())]] + [f"{p:.6f}" for p in preds["probs"][i]])
        _write_output(self.ctx.path("predictions.csv"), lambda p: atomic_write_text(p, buf.getvalue()))


def _merge_shards(parts: list[dict[str, Any]]) -> Predictions:
    """Interleave the predictions of ShardSampler shards back into item order.

    Rank ``r`` predicted items ``r, r + W, r + 2W, ...``, with no padding, so every
    item appears exactly once.
    """
    if len(parts) == 1:
        return Predictions(parts[0])
    world = len(parts)
    total = sum(len(p["row"]) for p in parts)
    filled = [p for p in parts if len(p["row"])] or parts[:1]
    merged = Predictions()
    for key, first in filled[0].items():
        if not isinstance(first, np.ndarray):
            merged[key] = first
            continue
        array = np.empty((total, *first.shape[1:]), dtype=first.dtype)
        for rank, part in enumerate(parts):
            if len(part["row"]):
                array[rank::world] = part[key]
        merged[key] = array
    return merged


class _Trainer:
    """The epoch and step loop, with validation, checkpoints and stop requests."""

    def __init__(self, runner: _Study, optimizer: Any, scheduler: Any, scaler: Any,
                 loaders: dict[str, InfiniteLoader], total_steps: int):
        self.runner = runner
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.loaders = loaders
        self.total_steps = total_steps
        self.net = runner._wrap_network()

    def fit(self, state: TrainState, stop: _StopRequest) -> None:
        runner, study = self.runner, self.runner.study
        metric_fns = runner.metric_fns()
        epochs, steps = study.train.epochs, runner.steps_per_epoch
        while state.epoch <= epochs:
            epoch = state.epoch
            runner.strategy.on_epoch_start(epoch)
            runner.strategy.train()
            start, cpu_start = time.perf_counter(), time.process_time()
            bar = tqdm(range(state.step, steps), desc=f"epoch {epoch}/{epochs}", leave=False,
                       disable=None if runner.ctx.is_main else True, unit="step")
            for step in bar:
                self._step(state, epoch, step)
                state.step = step + 1
                bar.set_postfix(loss=f"{state.sums['loss'] / state.step:.4f}")
                if dist.any_rank(stop.signum is not None, runner.device) and state.step < steps:
                    self._stop(state, epoch)
            elapsed = time.perf_counter() - start
            self._end_epoch(state, epoch, elapsed, time.process_time() - cpu_start, metric_fns)
            if dist.any_rank(stop.signum is not None, runner.device) and state.epoch <= epochs:
                self._stop(state, epoch)

    def _step(self, state: TrainState, epoch: int, step: int) -> None:
        runner, study = self.runner, self.runner.study
        source = runner.to_device(self.loaders["source"].next())
        target = None
        if "target" in self.loaders:
            # Target-site labels never reach a strategy.
            target = runner.to_device({k: v for k, v in self.loaders["target"].next().items() if k != "label"})
        progress = ((epoch - 1) * runner.steps_per_epoch + step) / max(1, self.total_steps)
        with runner.autocast() if runner.autocast is not None else nullcontext():
            losses = runner.strategy.train_step(self.net, source, target, progress)
        loss = losses["loss"]

        # Every rank checks, so that all of them stop together instead of one
        # waiting forever in the gradient all-reduce.
        if dist.any_rank(not bool(torch.isfinite(loss)), runner.device):
            raise TrainingError(
                f"the loss became non-finite ({loss.item()} on rank {runner.rank}) at epoch {epoch}, step "
                f"{step + 1}. Lower optimizer.lr, or set train.grad_clip."
            )

        optimizer, scaler = self.optimizer, self.scaler
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if study.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(runner.strategy.network.parameters(), study.train.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        self.scheduler.step()

        for key, value in losses.items():
            state.sums[key] = state.sums.get(key, 0.0) + float(value.detach())
        state.seen += len(source["image"]) * runner.world_size

    def _end_epoch(self, state: TrainState, epoch: int, elapsed: float, cpu_seconds: float,
                   metric_fns: dict[str, Any]) -> None:
        runner, study = self.runner, self.runner.study
        steps = runner.steps_per_epoch
        sums = _mean_over_ranks(state.sums, runner.device)
        entry: dict[str, Any] = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"],
                                 "images_per_s": state.seen / elapsed if elapsed > 0 else 0.0,
                                 "seconds": elapsed, "cpu_seconds": cpu_seconds}
        entry.update({k: v / steps for k, v in sums.items()})
        entry.update(runner.strategy.epoch_logs())

        # Validation runs on rank 0's weights and buffers (BatchNorm statistics
        # drift apart between DDP replicas), sharded over the ranks.
        dist.broadcast_module_state(runner.strategy.network)
        val = runner.validate(metric_fns)
        select = study.train.select_metric
        entry.update({f"val_{k}": v for k, v in val.items() if not isinstance(v, dict)})
        score = val.get(select)
        score = -val["loss"] if score is None else score
        if score > state.best_val_score:
            state.best_val_score, state.best_val_epoch = score, epoch
        if runner.selection is not None:
            # A label-free validator on the target sites picks the checkpoint instead.
            score = runner.selection.score_epoch(epoch, runner.strategy, runner.device, runner.autocast)
            entry[f"select_{runner.selection.name}"] = score
            state.selection = {"scores": dict(runner.selection.scores), "oracle": dict(runner.selection.oracle)}
        improved = score > state.best_score
        if improved:
            state.best_score, state.best_epoch = score, epoch
        state.history.append(entry)
        state.epoch, state.step, state.sums, state.seen = epoch + 1, 0, {}, 0

        checkpoint = runner.checkpoint_state(state, self.optimizer, self.scheduler, self.scaler, self.loaders)
        if improved:
            runner.save_checkpoint("best.pt", checkpoint)
        runner.save_checkpoint("last.pt", checkpoint)
        logger.info("epoch %d/%d: loss %.4f, val %s %s, %.0f img/s%s", epoch, study.train.epochs,
                    entry["loss"], select, _fmt(val.get(select)), entry["images_per_s"],
                    " (best)" if improved else "")
        if runner.ctx.is_main:
            runner.host.pm.hook.medtl_epoch_end(run=runner.ctx, epoch=epoch,
                                             metrics={k: v for k, v in entry.items() if isinstance(v, float)})
            _write_output(runner.ctx.path("history.json"), lambda p: atomic_write_json(p, state.history))

    def _stop(self, state: TrainState, epoch: int) -> None:
        runner = self.runner
        checkpoint = runner.checkpoint_state(state, self.optimizer, self.scheduler, self.scaler, self.loaders)
        runner.save_checkpoint("last.pt", checkpoint)
        where = f"epoch {state.epoch}, step {state.step}" if state.step else f"the end of epoch {state.epoch - 1}"
        raise RunInterrupted(f"interrupted; a resumable checkpoint was saved at {where}. Continue with "
                             f"'medtl run --resume {runner.ctx.run_dir}'.", str(runner.ctx.run_dir))


def _mean_over_ranks(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average per-rank loss sums, so that the logged loss is that of the global batch."""
    if dist.get_world_size() == 1 or not sums:
        return sums
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    values /= dist.get_world_size()
    return dict(zip(keys, values.tolist()))


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def _open_run_dir(study: Study, resume: Path | None) -> tuple[Path, dict[str, Any] | None]:
    """Create the run folder on rank 0 (or reuse ``resume``) and share its path with every rank."""
    if resume is not None:
        checkpoint = load_checkpoint(resume / "checkpoints" / "last.pt")
        return resume, checkpoint
    run_dir = None
    error = None
    if dist.get_rank() == 0:
        try:
            run_dir = create_run_dir(study)
        except MedtlError as exc:
            error = exc
    run_dir = dist.broadcast_object(str(run_dir) if run_dir is not None else None)
    if error is not None:
        raise error
    if run_dir is None:
        raise OutputError("rank 0 could not create the run folder; see its error message")
    return Path(run_dir), None


def run_study(study: Study, host: PluginHost | None = None, resume: str | Path | None = None) -> RunResult:
    """Run a whole study and return its run folder and metrics.

    Under ``torchrun`` with more than one process, a gloo (CPU) or nccl (CUDA)
    process group is started and every process must call this function.

    Args:
        study: the validated study.
        host: the plugin host; default: one built from ``study.plugins``.
        resume: a run folder to continue from its ``checkpoints/last.pt``. The study
            should be the one that started the run (see :func:`medtl.run.load_run_study`).

    Raises:
        MedtlError: for invalid configuration, data or a failed training, with a
            message that states what to fix. :class:`RunInterrupted` after SIGINT or
            SIGTERM, once a resumable checkpoint is saved.
    """
    host = host or build_host(study)
    previous = set_host(host)
    device = resolve_device(study.train.device)
    started_group = dist.init_process_group(device)
    try:
        return _run(study, host, device, Path(resume) if resume is not None else None)
    finally:
        set_host(previous)
        if started_group:
            dist.destroy_process_group()


def _run(study: Study, host: PluginHost, device: torch.device, resume: Path | None) -> RunResult:
    run_dir, checkpoint = _open_run_dir(study, resume)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    handler = attach_log_file(run_dir / "run.log") if rank == 0 else None
    ctx = RunContext(study=study, run_dir=run_dir, host=host, rank=rank, world_size=world_size)
    status = "failed"
    metrics: dict[str, Any] = {}
    try:
        seed_everything(study.seed)
        if resume is not None:
            ctx.record.update(_read_record(run_dir))
            ctx.record.setdefault("resumed", []).append(time.strftime("%Y-%m-%dT%H:%M:%S"))
        else:
            if ctx.is_main:
                _write_output(run_dir / "config.yaml", lambda p: write_resolved_config(study, p))
            ctx.record.update({"study": study.name, "seed": study.seed, "versions": versions(host),
                               "config": study.to_dict(), "base_dir": str(study.base_dir),
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "plugin_failures":
                               [f.__dict__ for f in host.failures]})
        ctx.record.update({"world_size": world_size, "device": str(device), "status": "running"})
        logger.info("run folder: %s", run_dir)
        runner = _Study(study, host, ctx, device, checkpoint)
        runner.load_data()
        if resume is not None and ctx.record.get("manifest_sha256") not in (None, runner.manifest.sha256):
            raise DataError(f"{runner.manifest.path} changed since the run started (its SHA-256 differs from "
                            "run.json's manifest_sha256); a resumed run must read the same data. Start a new run.")
        ctx.record.update({"manifest_sha256": runner.manifest.sha256, "split": split_summary(runner.manifest),
                           "labels": runner.manifest.labels,
                           "preprocessing": runner.preprocessor.describe(),
                           "source_sites": runner.source_sites, "target_sites": runner.target_sites})
        strategy = runner.build()
        runner.make_loaders(strategy)
        ctx.save_record()
        if ctx.is_main:
            host.pm.hook.medtl_run_start(run=ctx)

        history = runner.train()
        results, all_preds = runner.evaluate()
        metrics = {
            **results,
            "best_epoch": runner.best_epoch,
            **({"selection": runner.selection.summary(runner.best_epoch, runner.best_val_epoch)}
               if runner.selection is not None else {}),
            "history": history,
            "data": {"counts": runner.manifest.counts(), "manifest_sha256": runner.manifest.sha256},
            "skipped": {"count": len(runner.skipped), "files": [s.__dict__ for s in runner.skipped]},
        }
        metrics["evaluation"] = runner.cross_site_evaluation(all_preds)
        if ctx.is_main:
            runner.write_predictions(all_preds)
            _write_output(run_dir / "metrics.json", lambda p: atomic_write_json(p, metrics))
            from medtl.report import write_report

            _write_output(run_dir / "report.html",
                          lambda p: write_report(ctx, metrics, all_preds, runner.manifest.labels))
        status = "completed"
        return RunResult(run_dir, metrics)
    except (KeyboardInterrupt, RunInterrupted):
        status = "interrupted"
        raise
    except MedtlError as exc:
        logger.error("run failed: %s", exc)
        raise
    except Exception:
        logger.exception("run failed with an unexpected error")
        raise
    finally:
        ctx.record["status"] = status
        ctx.record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        try:
            try:
                ctx.save_record()
            except OSError as exc:
                logger.error("cannot write %s: %s", run_dir / "run.json", exc)
            if ctx.is_main:
                host.pm.hook.medtl_run_end(run=ctx, metrics=metrics, status=status)
        finally:
            if handler is not None:
                logging.getLogger("medtl").removeHandler(handler)
                handler.close()


def _read_record(run_dir: Path) -> dict[str, Any]:
    import json

    path = run_dir / "run.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        logger.warning("%s is missing or unreadable; the resumed run starts a new record", path)
        return {}
