"""``medtl run [STUDY]``: run a study end to end."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from medtl.config import DEFAULT_STUDY, load_study
from medtl.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="run a study: train, select the best checkpoint, evaluate every site",
        description="Run a study file end to end and write a run folder under output.dir.",
    )
    parser.add_argument("study", nargs="?", default=None,
                        help=f"study YAML file (default: {DEFAULT_STUDY})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a study key, for example --set train.epochs=3 (repeatable)")
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help="continue an interrupted run from its last complete checkpoint, with the "
                             "study saved in RUN_DIR")
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="train with N processes on this machine through torchrun "
                             "(DistributedDataParallel; gloo on CPU, nccl on GPU)")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    if args.nproc is not None:
        return _launch_torchrun(args)
    from medtl.engine import run_study
    from medtl.run import load_run_study
    from medtl.stages import format_summary, is_series, run_series

    if args.resume is not None:
        if args.study is not None or args.overrides:
            raise ConfigError("--resume continues a run with the study saved in its folder; "
                              "drop the STUDY argument and --set")
        study = load_run_study(Path(args.resume))
    else:
        study = load_study(Path(args.study or DEFAULT_STUDY), args.overrides)
    if is_series(study):
        if args.resume is not None:
            raise ConfigError("--resume continues one run; resume each run folder of a series on its own")
        series = run_series(study)
        print(format_summary(series.summary))
        print(f"series folder: {series.root}")
        return 0
    result = run_study(study, resume=args.resume)
    if int(os.environ.get("RANK", 0)) == 0:
        print(format_site_table(result.metrics))
        print(f"run folder: {result.run_dir}")
    return 0


def _launch_torchrun(args: argparse.Namespace) -> int:
    """Start ``torchrun --standalone --nproc_per_node=N -m medtl run ...`` and return its exit code."""
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", "-m", "medtl", "run"]
    if args.resume is not None:
        command += ["--resume", args.resume]
    if args.study is not None:
        command.append(args.study)
    for override in args.overrides:
        command += ["--set", override]
    return subprocess.call(command)


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
