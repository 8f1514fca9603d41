"""Studies with several seeds or chained stages, each stage one :func:`medtl.engine.run_study`.

A study file with ``seeds: [0, 1, 2]`` runs once per seed. A study file with
``stages:`` runs its stages in order for every seed, and each stage starts from the
backbone of an earlier one, so that contrastive pretraining, then adaptation, then
evaluation run from one file and fully offline. The layout is::

    OUTPUT_DIR/NAME/seed-S/STAGE/   one run folder per seed and stage
    OUTPUT_DIR/NAME/summary.json    test metrics per stage: per seed, mean and std

The standard deviation is the sample standard deviation (ddof=1) over seeds.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medtl.config import Study, study_from_dict
from medtl.errors import ConfigError
from medtl.runio import atomic_save, atomic_write_json

__all__ = ["run_series", "check_stages", "stage_studies", "summarize", "format_summary", "SeriesResult", "is_series"]

logger = logging.getLogger(__name__)

#: the metrics aggregated over seeds, per split and site
SUMMARY_METRICS = ("auc", "accuracy", "balanced_accuracy")


@dataclass
class SeriesResult:
    """The folder of a multi-seed or multi-stage study and its summary."""

    root: Path
    summary: dict[str, Any]
    runs: dict[int, dict[str, Path]]


def is_series(study: Study) -> bool:
    """Return whether a study needs :func:`run_series` instead of a single run."""
    return bool(study.seeds) or bool(study.stages)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def stage_studies(study: Study, seed: int, root: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """Return ``(stage name, init, study dict)`` per stage of one seed, without weights set yet.

    A study without ``stages`` has one stage named ``run``. Every stage is
    validated here, so a bad stage fails before the first one starts training.
    """
    base = study.to_dict()
    base.pop("seeds", None)
    base.pop("stages", None)
    if study.model.backbone.weights:
        base["model"]["backbone"]["weights"] = str(study.resolve_path(study.model.backbone.weights))
    stages = study.stages or []
    plan = []
    if not stages:
        plan.append(("run", "study", base))
    for stage in stages:
        sections = stage.model_dump(exclude={"name", "init"}, exclude_none=True)
        merged = _merge(base, sections)
        strategy = sections.get("strategy", {})
        if strategy.get("name", base["strategy"]["name"]) != base["strategy"]["name"]:
            # Another strategy takes none of the study strategy's options.
            merged["strategy"] = copy.deepcopy(strategy)
        plan.append((stage.name, stage.init, merged))

    result = []
    for name, init, raw in plan:
        raw = copy.deepcopy(raw)
        raw["seed"] = seed
        raw["output"] = {**raw.get("output", {}), "dir": str(root / f"seed-{seed}"), "name": name}
        study_from_dict(raw, base_dir=study.base_dir, source=f"stage {name!r} of study {study.name!r}")
        result.append((name, init, raw))
    return result


def _stage_key(stage: dict[str, Any] | None, key: str, index: int) -> str:
    """Return the key path of ``key`` under ``stages.INDEX`` when that stage sets it, else ``key``."""
    node: Any = stage
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return key
    return f"stages.{index}.{key}"


def check_stages(study: Study, plan: list[tuple[str, str, dict[str, Any]]], host: Any = None) -> None:
    """Check the component names and weights file of every stage before the first one starts.

    A problem in a value that a stage sets itself is reported under ``stages.N``.
    The study's weights file is checked only where a stage starts from it.

    Raises:
        ConfigError: listing every unknown component name and the missing weights file.
    """
    from medtl.engine import build_host
    from medtl.preflight import study_problems

    host = host or build_host(study)
    problems: list[tuple[str, str]] = []
    for index, (name, init, raw) in enumerate(plan):
        stage_study = study_from_dict(raw, base_dir=study.base_dir, source=f"stage {name!r}")
        starts_from_study = init == "study" or (init == "previous" and index == 0)
        stage = study.stages[index].model_dump(exclude_none=True) if study.stages else None
        for key, text in study_problems(stage_study, host):
            if key == "model.backbone.weights" and not starts_from_study:
                continue
            stage_key = _stage_key(stage, key, index)
            if stage_key == key:
                text = study.override_note(key, text)
            problem = (stage_key, text)
            if problem not in problems:
                problems.append(problem)
    if problems:
        raise ConfigError(f"study {study.name!r} names unknown components or missing files, so nothing "
                          "was run and no output folder was created:", problems)


def _export_backbone(run_dir: Path) -> Path:
    """Write the backbone tensors of a run's best checkpoint to ``backbone.pt`` and return its path."""
    checkpoint = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    state = {k[len("backbone."):]: v for k, v in checkpoint["model"].items() if k.startswith("backbone.")}
    path = run_dir / "backbone.pt"
    atomic_save(path, state)
    logger.info("exported %d backbone tensors to %s", len(state), path)
    return path


def run_series(study: Study, host: Any = None) -> SeriesResult:
    """Run every seed and stage of a study and write ``summary.json``.

    Returns the root folder, the summary and the run folder of each seed and stage.
    """
    from medtl.engine import run_study

    seeds = study.seeds or [study.seed]
    root = Path(study.output.dir).expanduser() / (study.output.name or
                                                  f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if root.exists():
        raise ConfigError(f"the output folder {root} exists already; set output.name to a new name")
    plans = {seed: stage_studies(study, seed, root) for seed in seeds}
    # Seeds change nothing that the check reads, so the first seed's stages represent all seeds.
    check_stages(study, plans[seeds[0]], host)
    root.mkdir(parents=True)
    logger.info("series folder: %s (%d seeds, %d stages each)", root, len(seeds), len(plans[seeds[0]]))

    runs: dict[int, dict[str, Path]] = {}
    metrics: dict[str, dict[int, dict[str, Any]]] = {}
    for seed in seeds:
        runs[seed] = {}
        backbones: dict[str, Path] = {}
        previous: str | None = None
        for name, init, raw in plans[seed]:
            raw = copy.deepcopy(raw)
            if init == "previous":
                source = previous
            elif init == "study":
                source = None
            else:
                source = init
            if source is not None:
                raw["model"]["backbone"]["weights"] = str(backbones[source].resolve())
            stage_study = study_from_dict(raw, base_dir=study.base_dir, source=f"stage {name!r}")
            logger.info("seed %d, stage %s: strategy %s, starting weights %s", seed, name,
                        stage_study.strategy.name, "from stage " + source if source else
                        ("from the study" if stage_study.model.backbone.weights else "none"))
            result = run_study(stage_study, host)
            runs[seed][name] = result.run_dir
            backbones[name] = _export_backbone(result.run_dir)
            metrics.setdefault(name, {})[seed] = result.metrics
            previous = name

    summary = summarize(metrics)
    summary["runs"] = {str(seed): {name: str(path) for name, path in stages.items()} for seed, stages in runs.items()}
    atomic_write_json(root / "summary.json", summary)
    return SeriesResult(root, summary, runs)


def _mean_std(values: list[float]) -> dict[str, Any]:
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "values": []}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": values}


def summarize(metrics: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Aggregate the metrics of each stage over seeds.

    Args:
        metrics: stage name -> seed -> the run's ``metrics.json`` content.

    Returns:
        ``{"stages": {stage: {split: {site: {metric: {mean, std, n, values}}}}}}``.
        A metric that is undefined in some seed (AUC with one class) is averaged over
        the seeds where it is defined, and ``n`` is the number of those seeds.
    """
    # summary.json is written with sorted keys, so the run order is kept apart.
    out: dict[str, Any] = {"stages": {}, "stage_order": list(metrics)}
    for stage, per_seed in metrics.items():
        stage_out: dict[str, Any] = {}
        for seed_metrics in per_seed.values():
            for split, per_site in seed_metrics.items():
                if split in ("history", "data", "skipped", "best_epoch", "selection") or not isinstance(per_site, dict):
                    continue
                for site, values in per_site.items():
                    if not isinstance(values, dict):
                        continue
                    for metric in SUMMARY_METRICS:
                        value = values.get(metric)
                        if value is not None:
                            (stage_out.setdefault(split, {}).setdefault(site, {})
                             .setdefault(metric, []).append(float(value)))
        for split, per_site in stage_out.items():
            for site, per_metric in per_site.items():
                for metric, values in per_metric.items():
                    per_metric[metric] = _mean_std(values)
        selection = [m["selection"] for m in per_seed.values() if "selection" in m]
        if selection:
            stage_out["selection"] = {
                "validator": selection[0]["validator"],
                "target_val_auc_at": {
                    choice: _mean_std([s["target_val_auc_at"][choice] for s in selection
                                       if s["target_val_auc_at"][choice] is not None])
                    for choice in ("validator", "oracle", "source_val")
                },
            }
        out["stages"][stage] = stage_out
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """Format the test AUC and accuracy per stage and site as mean ± std over seeds."""
    lines = []
    for stage in summary.get("stage_order", list(summary["stages"])):
        per_split = summary["stages"][stage]
        for site, per_metric in (per_split.get("test") or {}).items():
            cells = []
            for metric in SUMMARY_METRICS:
                stats = per_metric.get(metric)
                if stats is None or stats["mean"] is None:
                    cells.append(f"{metric} n/a")
                elif stats["std"] is None:
                    cells.append(f"{metric} {stats['mean']:.4f}")
                else:
                    cells.append(f"{metric} {stats['mean']:.4f} ± {stats['std']:.4f} (n={stats['n']})")
            lines.append(f"{stage:<12} {site:<10} " + "  ".join(cells))
    return "\n".join(lines)
