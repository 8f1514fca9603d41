"""Benchmark training throughput (images per second) and peak memory of whole runs.

Usage:
    python benchmarks/bench_throughput.py [--steps 6] [--epochs 3] [--repeats 3]
                                          [--skip-3d] [--json results.json]

Two studies run through ``medtl run`` in a child process each, so that the child's
peak resident set size (``wait4``'s ``ru_maxrss``) is the run's own:

1. the default study, ``sample_data/study.yaml`` (2D, 64 x 64, ResNet-10, batch 16);
2. a 3D study at 64^3: synthetic NIfTI volumes, 3D ResNet-10, batch 4.

Images per second is the median, over the epochs after the first and over the
repeats, of the ``images_per_s`` entries in the run's history (training steps only).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _engine_bench import machine, median, print_machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def write_3d_study(folder: Path, count: int = 24, size: int = 64) -> Path:
    """Write ``count`` 3D NIfTI volumes of two classes and a study file; return the study file."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        volume = rng.normal(0, 1, (size, size, size)).astype(np.float32)
        if i % 2:
            volume[8:24, 8:24, 8:24] += 2.0
        path = folder / f"vol{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
        rows.append({"path": path.name, "label": "pos" if i % 2 else "neg", "site": "A", "patient_id": f"p{i}"})
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "site", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    study = folder / "study3d.yaml"
    study.write_text(
        "name: volumes-64\n"
        "data: {manifest: manifest.csv, image_size: [64, 64, 64], spatial_dims: 3, split: {val: 0.2, test: 0.2}}\n"
        "model: {backbone: {name: resnet10}, pooling: {name: avg}}\n"
        "train: {batch_size: 4}\n"
    )
    return study


def run_once(study: Path, overrides: list[str], out: Path) -> tuple[list[float], float]:
    """Run a study in a child process; return images/s of each epoch after the first and peak RSS in MiB."""
    command = [sys.executable, "-m", "medtl", "-q", "run", str(study), "--set", f"output.dir={out}",
               "--set", "evaluation.splits=[]", "--set", "train.device=cpu", *sum((["--set", o] for o in overrides), [])]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    stderr = child.stderr.read() if child.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr}")
    run_dir = sorted(out.iterdir(), key=lambda p: p.stat().st_mtime)[-1]
    history = json.loads((run_dir / "history.json").read_text())
    return [entry["images_per_s"] for entry in history[1:]], usage.ru_maxrss / 1024


def measure(name: str, study: Path, overrides: list[str], repeats: int) -> dict:
    rates: list[float] = []
    peaks: list[float] = []
    for repeat in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            epoch_rates, peak = run_once(study, overrides, Path(out))
        rates.extend(epoch_rates)
        peaks.append(peak)
        print(f"{name}, repeat {repeat + 1}: " + ", ".join(f"{r:.1f}" for r in epoch_rates)
              + f" images/s, peak RSS {peak:.0f} MiB")
    return {"study": name, "overrides": overrides, "images_per_s": rates, "median_images_per_s": median(rates),
            "peak_rss_mib": peaks, "median_peak_rss_mib": median(peaks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is a warm-up")
    parser.add_argument("--steps", type=int, default=6, help="training steps per epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-3d", action="store_true", help="measure only the default 2D study")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    info = machine()
    common = [f"train.epochs={args.epochs}", f"train.steps_per_epoch={args.steps}"]
    results = [measure("default study (2D 64x64, batch 16)", REPO / "sample_data" / "study.yaml", common,
                       args.repeats)]
    if not args.skip_3d:
        with tempfile.TemporaryDirectory() as folder:
            study = write_3d_study(Path(folder))
            results.append(measure("3D study (64^3, batch 4)", study, common, args.repeats))
    print_machine(info)
    for result in results:
        print(f"{result['study']}: {result['median_images_per_s']:.1f} images/s, "
              f"peak RSS {result['median_peak_rss_mib']:.0f} MiB (medians)")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
