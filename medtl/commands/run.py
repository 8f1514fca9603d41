"""``medtl run [STUDY]``: run a study end to end."""

from __future__ import annotations

import argparse
from pathlib import Path

from medtl.config import DEFAULT_STUDY, load_study


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="run a study: train, select the best checkpoint, evaluate every site",
        description="Run a study file end to end and write a run folder under output.dir.",
    )
    parser.add_argument("study", nargs="?", default=str(DEFAULT_STUDY),
                        help=f"study YAML file (default: {DEFAULT_STUDY})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a study key, for example --set train.epochs=3 (repeatable)")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from medtl.engine import run_study
    from medtl.stages import format_summary, is_series, run_series

    study = load_study(Path(args.study), args.overrides)
    if is_series(study):
        series = run_series(study)
        print(format_summary(series.summary))
        print(f"series folder: {series.root}")
        return 0
    result = run_study(study)
    print(format_site_table(result.metrics))
    print(f"run folder: {result.run_dir}")
    return 0


def format_site_table(metrics: dict) -> str:
    """Format the test metrics per site as a plain-text table."""
    lines = []
    for split in ("test",):
        per_site = metrics.get(split) or {}
        if not per_site:
            continue
        cols = ["auc", "accuracy", "balanced_accuracy", "n"]
        width = max(len("site"), *(len(s) for s in per_site))
        lines.append(f"{'site':<{width}}  " + "  ".join(f"{c:>17}" for c in cols))
        for site, values in per_site.items():
            cells = []
            for c in cols:
                v = values.get(c)
                cells.append(f"{'n/a' if v is None else (f'{v:.4f}' if isinstance(v, float) else v):>17}")
            lines.append(f"{site:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)
