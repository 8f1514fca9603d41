"""Measure the site-A-to-site-B AUC drop of the sample study over several seeds.

Usage: python benchmarks/sample_shift.py [--seeds 0 1 2] [--out /tmp/medtl-shift]

Trains on site A only (the default study, strategy finetune) and prints each seed's
test AUC at both sites and the drop, then the mean and standard deviation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from medtl.config import load_study
from medtl.engine import run_study

STUDY = Path(__file__).resolve().parents[1] / "sample_data" / "study.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="/tmp/medtl-shift")
    args = parser.parse_args()
    drops = []
    for seed in args.seeds:
        start = time.perf_counter()
        study = load_study(STUDY, [f"seed={seed}", f"output.dir={args.out}", f"output.name=seed{seed}-{int(time.time())}"])
        result = run_study(study)
        auc_a, auc_b = result.metrics["test"]["A"]["auc"], result.metrics["test"]["B"]["auc"]
        drops.append(auc_a - auc_b)
        print(json.dumps({"seed": seed, "auc_A": round(auc_a, 4), "auc_B": round(auc_b, 4),
                          "drop": round(auc_a - auc_b, 4), "seconds": round(time.perf_counter() - start, 1)}))
    if len(drops) > 1:
        print(f"drop mean {statistics.mean(drops):.4f} sd {statistics.stdev(drops):.4f} over {len(drops)} seeds")


if __name__ == "__main__":
    main()
