"""``medtl compare RUN_DIR...``: several runs side by side in one table and one report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register", "compare_command", "collect_comparison", "DEFAULT_OUT"]

#: Output folder, relative to the current directory, when --out is not given.
DEFAULT_OUT = "comparison"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="put several runs (strategies, seeds, training sites) side by side",
        description="Read each run's metrics.json, print one table, and write comparison.json (the table and "
                    "a train-site x test-site matrix) and report.html to the --out folder, which is "
                    f"./{DEFAULT_OUT} in the current directory by default.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by `medtl run`")
    parser.add_argument("--metric", default="auc",
                        help="metric to compare: auc, accuracy, balanced_accuracy, sensitivity, specificity "
                             "or ece (default auc)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"folder for comparison.json and report.html, created if missing "
                             f"(default: ./{DEFAULT_OUT} in the current directory)")
    parser.set_defaults(func=compare_command)


def _run_summary(run_dir: Path) -> dict[str, Any]:
    from medtl.errors import ConfigError
    from medtl.trained import read_run_study

    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise ConfigError(f"{run_dir}: metrics.json is missing; pass folders of finished runs")
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    record_path = run_dir / "run.json"
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    study = read_run_study(run_dir)
    evaluation = metrics.get("evaluation") or {}
    # Runs from before cross-site evaluation existed only have point estimates under "test".
    sites = evaluation.get("sites") or {name: {**values, "role": "n/a"} for name, values in
                                        (metrics.get("test") or {}).items()}
    return {"name": run_dir.name, "path": str(run_dir), "strategy": study.strategy.name, "seed": study.seed,
            "source_sites": record.get("source_sites", []), "sites": sites}


def collect_comparison(run_dirs: list[Path], metric: str) -> dict[str, Any]:
    """Gather per-site values of ``metric`` from runs, with the training-site x test-site matrix.

    Matrix rows are the training sites of a run joined by ``+``. A cell is the mean of
    ``metric`` over the runs with those training sites.
    """
    runs = [_run_summary(d) for d in run_dirs]
    sites = sorted({s for run in runs for s in run["sites"]})
    cells: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        key = "+".join(run["source_sites"]) or "unknown"
        for site, values in run["sites"].items():
            if values.get(metric) is not None:
                cells.setdefault(key, {}).setdefault(site, []).append(values[metric])
    matrix = {row: {site: {"mean": sum(v) / len(v), "runs": len(v)} for site, v in per.items()}
              for row, per in cells.items()}
    return {"metric": metric, "sites": sites, "runs": runs, "matrix": matrix}


def compare_command(args: argparse.Namespace) -> int:
    from medtl.errors import ConfigError
    from medtl.evaluation import CORE_METRICS
    from medtl.report import render_comparison
    from medtl.runio import atomic_write_json, atomic_write_text

    if args.metric not in CORE_METRICS:
        raise ConfigError(f"--metric {args.metric!r} is not one of {', '.join(CORE_METRICS)}")
    comparison = collect_comparison([Path(d) for d in args.run_dirs], args.metric)
    out = Path(args.out if args.out is not None else DEFAULT_OUT)
    atomic_write_json(out / "comparison.json", comparison)
    atomic_write_text(out / "report.html", render_comparison(comparison))

    sites = comparison["sites"]
    width = max(len("run"), *(len(r["name"]) for r in comparison["runs"]))
    print(f"{'run':<{width}}  {'strategy':<12}  {'seed':>4}  " + "  ".join(f"{s:>24}" for s in sites))
    for run in comparison["runs"]:
        cells = []
        for site in sites:
            values = run["sites"].get(site) or {}
            value, ci = values.get(args.metric), (values.get("ci") or {}).get(args.metric)
            text = "n/a" if value is None else f"{value:.3f}"
            cells.append(f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else text)
        print(f"{run['name']:<{width}}  {run['strategy']:<12}  {run['seed']:>4}  "
              + "  ".join(f"{c:>24}" for c in cells))
    where = "" if args.out is not None else " (the default folder; set --out DIR to write elsewhere)"
    print(f"wrote {out / 'comparison.json'} and {out / 'report.html'}{where}")
    print(f"report: {out / 'report.html'}")
    return 0
