"""``medtl evaluate RUN_DIR``: per-site metrics with patient-bootstrap intervals, and the report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register", "evaluate_command", "output_folder", "save_section", "format_evaluation"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="evaluate a trained run per site, with bootstrap intervals and calibration",
        description="Evaluate a run's best checkpoint on its own test splits or on a new manifest (a new site, "
                    "say), update metrics.json and redraw report.html and methods.md.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by `medtl run`")
    add_common_arguments(parser)
    parser.add_argument("--bootstrap", type=int, default=None, metavar="N",
                        help="patient bootstrap resamples (default: the study's evaluation.bootstrap)")
    parser.set_defaults(func=evaluate_command)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options that ``evaluate`` and ``shift`` share."""
    parser.add_argument("--data", metavar="MANIFEST", default=None,
                        help="evaluate on this manifest instead; all its rows count as external test data")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="folder for metrics.json and the report (default: RUN_DIR, or "
                             "RUN_DIR/external/<manifest name> with --data)")
    parser.add_argument("--device", default=None, help="auto, cpu or cuda[:N] (default: the study's train.device)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and permutations (default 0)")


def output_folder(run_dir: Path, data: str | None, out: str | None) -> Path:
    """Return the folder that receives metrics.json and the report."""
    if out is not None:
        return Path(out)
    if data is None:
        return run_dir
    name = Path(data).name.split(".")[0] or "manifest"
    return run_dir / "external" / name


def save_section(trained: Any, out_dir: Path, section: str, values: dict[str, Any], data: str | None) -> Path:
    """Store one section in ``out_dir/metrics.json`` and redraw the report there.

    A folder other than the run folder starts from a copy of the run's metrics, so its
    report keeps the study summary and training curves.
    """
    from medtl.manifest import file_sha256
    from medtl.report import update_metrics, write_run_report
    from medtl.runio import atomic_write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    if not path.is_file() and out_dir.resolve() != trained.run_dir.resolve():
        base = json.loads((trained.run_dir / "metrics.json").read_text(encoding="utf-8"))
        base.pop("shift", None)
        base.pop("stress", None)
        base.pop("evaluation", None)
        atomic_write_json(path, base)
    if data is not None:
        update_metrics(path, "external_data", {"manifest": Path(data).name, "manifest_sha256": file_sha256(data)})
    metrics = update_metrics(path, section, values)
    return write_run_report(trained.run_dir, trained.study, trained.record, metrics, out_dir)


def _cell(values: dict[str, Any], metric: str) -> str:
    value = values.get(metric)
    ci = (values.get("ci") or {}).get(metric)
    text = "n/a" if value is None else f"{value:.3f}"
    return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else text


def format_evaluation(evaluation: dict[str, Any]) -> str:
    """Format per-site metrics and drops as a plain-text table."""
    metrics = ["auc", "balanced_accuracy", "sensitivity", "specificity", "ece"]
    sites = evaluation["sites"]
    width = max(len("site"), *(len(s) for s in sites))
    lines = [f"{'site':<{width}}  {'role':<8}  {'n':>4}  " + "  ".join(f"{m:>22}" for m in metrics)]
    for name, values in sites.items():
        lines.append(f"{name:<{width}}  {values['role']:<8}  {values['n_images']:>4}  "
                     + "  ".join(f"{_cell(values, m):>22}" for m in metrics))
    for name, drop in evaluation.get("drops", {}).items():
        value, ci = drop["auc"]["value"], drop["auc"]["ci"]
        text = "n/a" if value is None else f"{value:+.3f}"
        lines.append(f"AUC drop, internal test to {name}: {text}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""))
    threshold = evaluation["threshold"]
    if threshold.get("value") is not None:
        lines.append(f"threshold ({threshold['method']}, from validation): {threshold['value']:.4f}; "
                     "sensitivity and specificity use it, while balanced_accuracy (like accuracy in "
                     "metrics.json) counts the most probable class")
    return "\n".join(lines)


def evaluate_command(args: argparse.Namespace) -> int:
    from medtl.errors import ConfigError
    from medtl.evaluation import evaluate_trained
    from medtl.trained import load_trained_run

    if args.bootstrap is not None and args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be 0 or more, got {args.bootstrap}")
    trained = load_trained_run(Path(args.run_dir), device=args.device)
    resamples = trained.study.evaluation.bootstrap if args.bootstrap is None else args.bootstrap
    evaluation = evaluate_trained(trained, data=args.data, resamples=resamples, seed=args.seed)
    out_dir = output_folder(trained.run_dir, args.data, args.out)
    report = save_section(trained, out_dir, "evaluation", evaluation, args.data)
    print(format_evaluation(evaluation))
    print(f"report: {report}")
    return 0
