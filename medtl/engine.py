"""The training engine: one study from manifest to run folder."""

from __future__ import annotations

import csv
import io
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from medtl._host import PluginHost, set_host
from medtl.cache import open_cache
from medtl.config import Study
from medtl.data import InfiniteLoader, Preprocessor, SkipRecord, load_samples, make_loader, source_name_for
from medtl.errors import ConfigError, DataError, MedtlError, TrainingError
from medtl.evaluation import Predictions, evaluation_from_predictions, predict_items, site_metrics
from medtl.manifest import Manifest, assign_splits, load_manifest, split_summary, write_split_csv
from medtl.model import Classifier
from medtl.run import RunContext, attach_log_file, create_run_dir, versions, write_resolved_config
from medtl.runio import atomic_save, atomic_write_json, atomic_write_text
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
    """Create the plugin host that a study asks for (blocked, allowed and local plugins).

    Local modules in ``plugins.modules`` are looked up in the study file's folder first.
    """
    return PluginHost(block=study.plugins.block, allow=study.plugins.allow, modules=study.plugins.modules,
                      search_path=[study.base_dir], strict=study.plugins.strict)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and MONAI's random transforms."""
    from monai.utils import set_determinism

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    set_determinism(seed=seed)


def resolve_device(name: str) -> torch.device:
    """Turn ``train.device`` into a device; ``auto`` takes CUDA when it is available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but CUDA is not available; use 'auto' or 'cpu'")
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
    if precision == "fp32":
        return None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision fp16 needs a CUDA device; use bf16 on CPU")
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------


class _Study:
    """State of one run while it goes through its phases."""

    def __init__(self, study: Study, host: PluginHost, ctx: RunContext):
        self.study = study
        self.host = host
        self.ctx = ctx
        self.device = resolve_device(study.train.device)
        self.autocast = _autocast_factory(study.train.precision, self.device)
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
        write_split_csv(self.manifest, self.ctx.path("split.csv"))

        sites = self.manifest.sites
        unknown = sorted(set(study.sites) - set(sites))
        if unknown:
            raise ConfigError(f"sites: {unknown} are not in the manifest, which has sites {sites}")
        roles = {s: (study.sites[s].role if s in study.sites else "source") for s in sites}
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
        preset = study.transforms.preset
        augment = self.host.create("transform", preset, data=study.data, **study.transforms.options)
        self.train_loader = make_loader(self.train_items, augment, t.batch_size, True, t.num_workers,
                                        study.seed, drop_last=True)
        self.target_loader = None
        if strategy.uses_target:
            if not self.target_items:
                raise ConfigError(f"strategy {study.strategy.name!r} needs unlabeled target images, "
                                  "but no site has role: target")
            self.target_loader = make_loader(self.target_items, augment, t.batch_size, True, t.num_workers,
                                             study.seed + 1, drop_last=True)
        self.val_loader = make_loader(self.val_items, [], t.batch_size, False, 0, study.seed)
        self.steps_per_epoch = t.steps_per_epoch or max(1, len(self.train_loader))
        self.selection = make_selection(study, self.host, self.target_val_items, self.val_loader, make_loader)

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
        return self.strategy

    # -- training -----------------------------------------------------------

    def train(self) -> list[dict[str, Any]]:
        study, strategy = self.study, self.strategy
        self.strategy_context.steps_per_epoch = self.steps_per_epoch
        optimizer = build_optimizer(strategy.parameter_groups(), study)
        total = study.train.epochs * self.steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(study, step, total, self.steps_per_epoch))
        scaler = torch.amp.GradScaler("cuda") if study.train.precision == "fp16" else None
        source_iter = InfiniteLoader(self.train_loader)
        target_iter = InfiniteLoader(self.target_loader) if self.target_loader is not None else None
        history: list[dict[str, Any]] = []
        best_score, best_epoch = -math.inf, 0
        best_val_score, self.best_val_epoch = -math.inf, 0
        select = study.train.select_metric
        metric_fns = self._metric_fns()

        for epoch in range(1, study.train.epochs + 1):
            strategy.on_epoch_start(epoch)
            strategy.train()
            sums: dict[str, float] = {}
            seen, start = 0, time.perf_counter()
            bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {epoch}/{study.train.epochs}",
                       leave=False, disable=None, unit="step")
            for step in bar:
                source = self._to_device(source_iter.next())
                target = None
                if target_iter is not None:
                    # Target-site labels never reach a strategy.
                    target = self._to_device({k: v for k, v in target_iter.next().items() if k != "label"})
                progress = ((epoch - 1) * self.steps_per_epoch + step) / max(1, total)
                with self.autocast() if self.autocast is not None else nullcontext():
                    losses = strategy.train_step(strategy.network, source, target, progress)
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss.item()} at epoch {epoch}, step {step + 1}. "
                        "Lower optimizer.lr, or set train.grad_clip."
                    )
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if study.train.grad_clip:
                    torch.nn.utils.clip_grad_norm_(strategy.network.parameters(), study.train.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                seen += len(source["image"])
                bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.4f}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}")
            elapsed = time.perf_counter() - start
            entry: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                                     "images_per_s": seen / elapsed, "seconds": elapsed}
            entry.update({k: v / self.steps_per_epoch for k, v in sums.items()})
            entry.update(strategy.epoch_logs())

            val = self._validate(metric_fns)
            entry.update({f"val_{k}": v for k, v in val.items() if not isinstance(v, dict)})
            score = val.get(select)
            score = -val["loss"] if score is None else score
            if score > best_val_score:
                best_val_score, self.best_val_epoch = score, epoch
            if self.selection is not None:
                # A label-free validator on the target sites picks the checkpoint instead.
                score = self.selection.score_epoch(epoch, strategy, self.device, self.autocast)
                entry[f"select_{self.selection.name}"] = score
            improved = score > best_score
            if improved:
                best_score, best_epoch = score, epoch
                self._save_checkpoint("best.pt", epoch, optimizer, scheduler)
            self._save_checkpoint("last.pt", epoch, optimizer, scheduler)
            history.append(entry)
            logger.info("epoch %d/%d: loss %.4f, val %s %s, %.0f img/s%s", epoch, study.train.epochs,
                        entry["loss"], select, _fmt(val.get(select)), entry["images_per_s"],
                        " (best)" if improved else "")
            self.host.pm.hook.medtl_epoch_end(run=self.ctx, epoch=epoch,
                                              metrics={k: v for k, v in entry.items() if isinstance(v, float)})
            atomic_write_json(self.ctx.path("history.json"), history)
        self.best_epoch = best_epoch
        return history

    def _metric_fns(self) -> dict[str, Any]:
        names = list(dict.fromkeys(self.study.evaluation.metrics + [self.study.train.select_metric]))
        return {n: self.host.factory("metric", n) for n in names if n != "loss"}

    def _validate(self, metric_fns: dict[str, Any]) -> dict[str, Any]:
        preds = predict_items(self.strategy, self.val_loader, self.device, self.autocast)
        if len(preds["label"]) == 0:
            return {"loss": 0.0}
        result = site_metrics(preds["label"], preds["probs"], metric_fns)
        probs = np.clip(preds["probs"][np.arange(len(preds["label"])), preds["label"]], 1e-12, 1.0)
        result["loss"] = float(-np.log(probs).mean())
        return result

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in batch.items()}

    def _save_checkpoint(self, name: str, epoch: int, optimizer: Any, scheduler: Any) -> None:
        state = {
            "format": "medtl-checkpoint-1",
            "epoch": epoch,
            "model": self.strategy.model.state_dict(),
            "strategy": self.strategy.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "labels": self.manifest.labels,
        }
        atomic_save(self.ctx.path("checkpoints", name), state)

    # -- evaluation ---------------------------------------------------------

    def evaluate(self) -> tuple[dict[str, Any], list[Predictions]]:
        best = torch.load(self.ctx.path("checkpoints", "best.pt"), map_location=self.device, weights_only=True)
        self.strategy.load_state_dict(best["strategy"])
        metric_fns = {n: self.host.factory("metric", n) for n in self.study.evaluation.metrics}
        results: dict[str, Any] = {}
        all_preds = []
        for split, per_site in self.eval_items.items():
            results[split] = {}
            for site, items in per_site.items():
                loader = make_loader(items, [], self.study.train.batch_size, False, 0, self.study.seed)
                preds = predict_items(self.strategy, loader, self.device, self.autocast)
                preds["split"] = split
                all_preds.append(preds)
                results[split][site] = site_metrics(preds["label"], preds["probs"], metric_fns)
        return results, all_preds

    def cross_site_evaluation(self, all_preds: list[Predictions]) -> dict[str, Any]:
        """Per-site metrics with patient-bootstrap intervals, validation threshold and drops."""
        splits = self.study.evaluation.splits
        split = "test" if "test" in splits else splits[0]
        val_preds = predict_items(self.strategy, self.val_loader, self.device, self.autocast)
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
        atomic_write_text(self.ctx.path("predictions.csv"), buf.getvalue())


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def run_study(study: Study, host: PluginHost | None = None) -> RunResult:
    """Run a whole study and return its run folder and metrics.

    Raises:
        MedtlError: for invalid configuration, data or a failed training, with a
            message that says what to fix.
    """
    host = host or build_host(study)
    previous = set_host(host)
    run_dir = create_run_dir(study)
    handler = attach_log_file(run_dir / "run.log")
    ctx = RunContext(study=study, run_dir=run_dir, host=host)
    status = "failed"
    metrics: dict[str, Any] = {}
    try:
        seed_everything(study.seed)
        write_resolved_config(study, run_dir / "config.yaml")
        ctx.record.update({"study": study.name, "seed": study.seed, "versions": versions(host),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "plugin_failures":
                           [f.__dict__ for f in host.failures]})
        logger.info("run folder: %s", run_dir)
        runner = _Study(study, host, ctx)
        runner.load_data()
        ctx.record.update({"manifest_sha256": runner.manifest.sha256, "split": split_summary(runner.manifest),
                           "labels": runner.manifest.labels,
                           "preprocessing": runner.preprocessor.describe(),
                           "source_sites": runner.source_sites, "target_sites": runner.target_sites})
        strategy = runner.build()
        runner.make_loaders(strategy)
        ctx.save_record()
        host.pm.hook.medtl_run_start(run=ctx)

        history = runner.train()
        results, all_preds = runner.evaluate()
        runner.write_predictions(all_preds)
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
        atomic_write_json(run_dir / "metrics.json", metrics)
        from medtl.report import write_report

        write_report(ctx, metrics, all_preds, runner.manifest.labels)
        status = "completed"
        return RunResult(run_dir, metrics)
    except KeyboardInterrupt:
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
            ctx.save_record()
            host.pm.hook.medtl_run_end(run=ctx, metrics=metrics, status=status)
        finally:
            logging.getLogger("medtl").removeHandler(handler)
            handler.close()
            set_host(previous)
