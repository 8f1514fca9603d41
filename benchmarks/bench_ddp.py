"""Benchmark DistributedDataParallel: N processes against 1 on the same total work.

Usage:
    python benchmarks/bench_ddp.py [--nproc 2] [--epochs 2] [--steps 6] [--repeats 3]
                                   [--study sample_data/study.yaml] [--json results.json]

Both runs train the same study with the same global batch (``train.batch_size`` is
split across the processes) and the same steps, so they do the same total work.
The script reports the median training time (the sum of the history's epoch
``seconds``) and the median wall time of the whole command. Speed-up is the 1-process
time over the N-process time. On a CPU-only machine the processes share the same
cores and gloo sends gradients through memory, so expect no speed-up there. On a
machine with N GPUs (nccl), the same command measures real scaling. torchrun sets
OMP_NUM_THREADS=1 in each process when N > 1; ``--single-threads 1`` gives the
1-process run the same setting, which separates the effect of DDP from that of
the thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _engine_bench import machine, median, print_machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_once(study: Path, nproc: int, overrides: list[str], threads: int | None) -> tuple[float, float]:
    """Return (training seconds, wall seconds) of one run; ``threads`` sets OMP_NUM_THREADS of a 1-process run."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "medtl", "-q", "run", str(study), "--set", f"output.dir={out}",
                   "--set", "output.name=run", *sum((["--set", o] for o in overrides), [])]
        if nproc > 1:
            command[5:5] = ["--nproc", str(nproc)]
        env = dict(os.environ)
        if nproc == 1 and threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        history = json.loads((Path(out) / "run" / "history.json").read_text())
    return sum(entry["seconds"] for entry in history), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=REPO / "sample_data" / "study.yaml")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="training steps per epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--single-threads", type=int, default=None, metavar="N",
                        help="OMP_NUM_THREADS of the 1-process run (torchrun sets 1 per process for N > 1); "
                             "default: the environment's")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    overrides = [f"train.epochs={args.epochs}", f"train.steps_per_epoch={args.steps}", "evaluation.splits=[]"]
    results: dict[int, dict[str, list[float]]] = {1: {"train_s": [], "wall_s": []},
                                                  args.nproc: {"train_s": [], "wall_s": []}}
    for repeat in range(args.repeats):
        for nproc in ((1, args.nproc) if repeat % 2 == 0 else (args.nproc, 1)):
            train_s, wall_s = run_once(args.study, nproc, overrides, args.single_threads)
            results[nproc]["train_s"].append(train_s)
            results[nproc]["wall_s"].append(wall_s)
            print(f"repeat {repeat + 1}, {nproc} process(es): training {train_s:.1f} s, wall {wall_s:.1f} s")
    info = machine()
    one, many = results[1], results[args.nproc]
    summary = {"machine": info, "study": str(args.study), "nproc": args.nproc, "epochs": args.epochs,
               "single_process_threads": args.single_threads,
               "steps": args.steps, "runs": {str(k): v for k, v in results.items()},
               "speedup_train": median(one["train_s"]) / median(many["train_s"]),
               "speedup_wall": median(one["wall_s"]) / median(many["wall_s"])}
    print_machine(info)
    print(f"median training time: 1 process {median(one['train_s']):.1f} s, {args.nproc} processes "
          f"{median(many['train_s']):.1f} s (speed-up {summary['speedup_train']:.2f})")
    print(f"median wall time: 1 process {median(one['wall_s']):.1f} s, {args.nproc} processes "
          f"{median(many['wall_s']):.1f} s (speed-up {summary['speedup_wall']:.2f})")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
