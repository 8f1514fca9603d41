"""``medtl shift RUN_DIR``: feature-space shift between sites and the simulated site-shift stress test."""

from __future__ import annotations

import argparse
from pathlib import Path

from medtl.commands.evaluate import add_common_arguments, output_folder, save_section

__all__ = ["register", "shift_command"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from medtl.stress import DEFAULT_SHIFTS, SHIFTS

    parser = subparsers.add_parser(
        "shift", help="measure dataset shift between sites and stress-test the model under simulated shifts",
        description="Compare the training split with the internal test split and each external site in the "
                    "model's feature space (proxy A-distance, kernel MMD with a permutation test, PCA and "
                    "t-SNE embeddings, intensity histograms), then run the site-shift stress test. Results go "
                    "into metrics.json and report.html.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by `medtl run`")
    add_common_arguments(parser)
    parser.add_argument("--permutations", type=int, default=500, metavar="N",
                        help="permutations of the MMD test (default 500)")
    parser.add_argument("--no-tsne", action="store_true", help="skip the t-SNE embedding (PCA only), which is slow")
    parser.add_argument("--stress", default=",".join(DEFAULT_SHIFTS), metavar="SHIFTS",
                        help=f"comma-separated simulated shifts, or 'none' (default: {','.join(DEFAULT_SHIFTS)}; "
                             f"all: {','.join(SHIFTS)})")
    parser.set_defaults(func=shift_command)


def shift_command(args: argparse.Namespace) -> int:
    from medtl.errors import ConfigError
    from medtl.shift import measure_shift
    from medtl.stress import SHIFTS, stress_test
    from medtl.trained import load_trained_run

    if args.permutations < 1:
        raise ConfigError(f"--permutations must be at least 1, got {args.permutations}")
    shifts = [] if args.stress.strip().lower() == "none" else [s.strip() for s in args.stress.split(",") if s.strip()]
    unknown = [s for s in shifts if s not in SHIFTS]
    if unknown:
        raise ConfigError(f"--stress: unknown shift(s) {', '.join(unknown)}; valid: {', '.join(SHIFTS)} or none")

    trained = load_trained_run(Path(args.run_dir), device=args.device)
    out_dir = output_folder(trained.run_dir, args.data, args.out)
    shift = measure_shift(trained, data=args.data, permutations=args.permutations, seed=args.seed,
                          tsne=not args.no_tsne)
    report = save_section(trained, out_dir, "shift", shift, args.data)
    print(f"{'compared with train':<20}  {'n':>4}  {'proxy A-dist':>12}  {'MMD2':>8}  {'p':>6}")
    for name, c in shift["comparisons"].items():
        pad, mmd = c.get("proxy_a_distance"), c.get("mmd")
        print(f"{name:<20}  {c['n']:>4}  {'n/a' if pad is None else format(pad['pad'], '.3f'):>12}  "
              f"{'n/a' if mmd is None else format(mmd['mmd2'], '.4f'):>8}  "
              f"{'n/a' if mmd is None else format(mmd['p_value'], '.3f'):>6}")
    if shifts:
        stress = stress_test(trained, shifts, data=args.data, seed=args.seed)
        report = save_section(trained, out_dir, "stress", stress, args.data)
        for name, curve in stress["shifts"].items():
            print(f"stress {name:<15} AUC by severity: "
                  + " ".join("n/a" if v is None else f"{v:.3f}" for v in curve["auc"]))
    print(f"report: {report}")
    return 0
