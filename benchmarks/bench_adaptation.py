"""Benchmark the adaptation strategies on BreastMNIST with a simulated acquisition shift.

BreastMNIST (780 breast-ultrasound images, 28x28, malignant vs normal or benign) is
split into two sites of 390 images, stratified by label. The target site's images
pass through a fixed acquisition shift built from MONAI transforms. The shift
models a lower-resolution transducer (Gaussian blur), speckle (Rician noise
relative to the intensity range), a different gain (a global factor and a smooth
multiplicative bias field, like a time-gain-compensation setting) and a flatter
contrast curve (gamma). Each site is
split 60/15/25 into train, validation and test by a fixed seed, so seeds only
change training.

Methods, each a study file run for every seed through ``medtl run``'s series path:

- ``source_only``: ``finetune`` on the source site.
- ``dann``, ``coral``: adaptation with the unlabeled target training images.
- ``contrastive_finetune``: a ``contrastive`` pretraining stage (supervised
  contrastive on the source, NT-Xent on both sites), then ``finetune`` from its backbone.
- ``target_oracle``: ``finetune`` on the labeled target training images only, the
  upper reference that adaptation tries to reach.
- ``all_labels_oracle``: ``finetune`` on the labeled training images of both sites,
  a second upper reference with twice the labeled data.
- ``dann_snd``, ``dann_dev``: ``dann`` whose checkpoint is chosen by the label-free
  ``snd`` or ``dev`` validator on the target validation images, reported next to
  the epochs that an oracle with target labels and source validation would choose.

The report gives the target-site test AUC (mean and sample standard deviation over
seeds) and the fraction of the source-to-oracle gap that each method closes,
``(AUC_method - AUC_source_only) / (AUC_oracle - AUC_source_only)``, for each oracle.

Usage::

    python benchmarks/bench_adaptation.py --out /tmp/medtl-bench --epochs 15 --seeds 0 1 2

BreastMNIST is read from ``../shared/data/breastmnist/breastmnist.npz`` next to the
repository unless ``--data`` names the file.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "breastmnist" / "breastmnist.npz"
METHODS = ("source_only", "dann", "coral", "contrastive_finetune", "target_oracle", "all_labels_oracle",
           "dann_snd", "dann_dev")


def acquisition_shift(seed: int = 1234) -> Any:
    """Build the fixed target-site shift as MONAI array transforms on ``(1, H, W)`` images in [0, 1]."""
    from monai.transforms import (AdjustContrast, Compose, GaussianSmooth, RandBiasField, RandRicianNoise,
                                  ScaleIntensity, ScaleIntensityRange)

    shift = Compose([
        GaussianSmooth(sigma=0.8),                                   # coarser transducer resolution
        RandRicianNoise(prob=1.0, std=0.08, relative=True, channel_wise=True, sample_std=False),  # speckle
        RandBiasField(prob=1.0, coeff_range=(0.2, 0.3), degree=2),   # depth-dependent gain
        ScaleIntensity(minv=None, maxv=None, factor=0.35),           # global gain: x * 1.35
        ScaleIntensityRange(a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        AdjustContrast(gamma=0.6),                                   # flatter contrast curve
    ])
    shift.set_random_state(seed=seed)
    return shift


def build_sites(folder: Path, data_path: Path, split_seed: int = 0) -> Path:
    """Write both sites as NIfTI files plus a CSV manifest under ``folder``; return the manifest."""
    import nibabel as nib

    data = np.load(data_path)
    images = np.concatenate([data[f"{s}_images"] for s in ("train", "val", "test")]).astype(np.float32) / 255.0
    labels = np.concatenate([np.asarray(data[f"{s}_labels"]).reshape(-1) for s in ("train", "val", "test")])
    rng = np.random.default_rng(split_seed)
    shift = acquisition_shift()

    rows = []
    site_of = np.empty(len(labels), dtype=object)
    split_of = np.empty(len(labels), dtype=object)
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        halves = {"source": idx[: len(idx) // 2], "target": idx[len(idx) // 2:]}
        for site, members in halves.items():
            site_of[members] = site
            n = len(members)
            n_train, n_val = int(round(0.6 * n)), int(round(0.15 * n))
            split_of[members[:n_train]] = "train"
            split_of[members[n_train:n_train + n_val]] = "val"
            split_of[members[n_train + n_val:]] = "test"
    for site in ("source", "target"):
        (folder / site).mkdir(parents=True, exist_ok=True)
    for i in range(len(labels)):
        image = images[i][None]
        if site_of[i] == "target":
            image = np.asarray(shift(image), dtype=np.float32)
        name = f"{site_of[i]}/img{i:04d}.nii.gz"
        nib.save(nib.Nifti1Image(image[0], np.eye(4)), str(folder / name))
        rows.append([name, int(labels[i]), site_of[i], f"p{i:04d}", split_of[i]])
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "site", "patient_id", "split"])
        writer.writerows(rows)
    return manifest


def base_study(manifest: Path, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "data": {"manifest": str(manifest.resolve()), "image_size": [28, 28], "intensity": "none", "cache": False},
        "sites": {"source": {"role": "source"}, "target": {"role": "target"}},
        "transforms": {"preset": "default", "options": {"rotate_degrees": 10, "noise_std": 0.0}},
        "model": {"backbone": {"name": "resnet10", "options": {"stem": "small", "widen_factor": args.width}},
                  "head": {"dropout": 0.2}},
        "optimizer": {"name": "adamw", "lr": args.lr, "weight_decay": 1e-4},
        "schedule": {"name": "cosine", "warmup_epochs": 1},
        "train": {"epochs": args.epochs, "batch_size": 32, "device": "cpu"},
        "seeds": list(args.seeds),
        "output": {"dir": str(args.out / "runs")},
    }


def method_study(method: str, manifest: Path, args: argparse.Namespace) -> dict[str, Any]:
    study = base_study(manifest, args)
    study["name"] = method
    study["output"]["name"] = method
    if method == "source_only":
        study["strategy"] = {"name": "finetune", "options": {"label_smoothing": 0.1}}
    elif method == "target_oracle":
        study["sites"] = {"source": {"role": "target"}, "target": {"role": "source"}}
        study["strategy"] = {"name": "finetune", "options": {"label_smoothing": 0.1}}
    elif method == "all_labels_oracle":
        study["sites"] = {"source": {"role": "source"}, "target": {"role": "source"}}
        study["strategy"] = {"name": "finetune", "options": {"label_smoothing": 0.1}}
    elif method in ("dann", "dann_snd", "dann_dev"):
        study["strategy"] = {"name": "dann", "options": {"discriminator_width": 256, "label_smoothing": 0.1}}
        if method != "dann":
            study["train"]["select"] = method.split("_")[1]
    elif method == "coral":
        study["strategy"] = {"name": "coral", "options": {"weight": args.coral_weight, "label_smoothing": 0.1}}
    elif method == "contrastive_finetune":
        study["strategy"] = {"name": "finetune", "options": {"label_smoothing": 0.1}}
        study["stages"] = [
            {"name": "pretrain", "strategy": {"name": "contrastive", "options": {"projection_dim": 64}},
             "train": {"epochs": args.pretrain_epochs}},
            {"name": "finetune"},
        ]
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return study


def target_auc(summary: dict[str, Any]) -> dict[str, Any]:
    """Return the target-site test AUC statistics of a series' last stage."""
    last = summary["stage_order"][-1]
    return summary["stages"][last]["test"]["target"]["auc"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder for data, study files and runs")
    parser.add_argument("--data", type=Path, default=DATA, help=f"breastmnist.npz (default: {DATA})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of each run")
    parser.add_argument("--pretrain-epochs", type=int, default=10, help="epochs of the contrastive stage")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--width", type=float, default=0.25, help="ResNet-10 widen_factor")
    parser.add_argument("--coral-weight", type=float, default=1.0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)

    import torch

    from medtl.config import load_study
    from medtl.stages import run_series

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if not args.data.is_file():
        print(f"BreastMNIST not found at {args.data}; pass --data PATH/breastmnist.npz", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = args.out / "data" / "manifest.csv"
    if not manifest.is_file():
        build_sites(args.out / "data", args.data)

    # Results of earlier invocations with the same --out are kept, so that a method
    # can be added or rerun without repeating the others.
    results_path = args.out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for method in args.methods:
        path = args.out / "studies" / f"{method}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(method_study(method, manifest, args), sort_keys=False))
        start = time.perf_counter()
        series = run_series(load_study(path))
        auc = target_auc(series.summary)
        results[method] = {"target_auc": auc, "seconds": time.perf_counter() - start, "study": str(path),
                           "summary": str(series.root / "summary.json"), "argv": sys.argv[1:]}
        last = series.summary["stages"][series.summary["stage_order"][-1]]
        if "selection" in last:
            results[method]["selection"] = last["selection"]
        results_path.write_text(json.dumps(results, indent=2))
        print(f"{method:<22} target AUC {auc['mean']:.4f} ± {auc['std'] or 0:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)

    print(format_table(results))
    return 0


def format_table(results: dict[str, Any]) -> str:
    """Format the results as a Markdown table with the fraction of the gap closed toward each oracle."""
    mean = {m: r["target_auc"]["mean"] for m, r in results.items()}
    oracles = [m for m in ("target_oracle", "all_labels_oracle") if m in mean]
    references = {"source_only", *oracles}
    lines = ["| method | target test AUC (mean ± std) | seeds | "
             + " | ".join(f"gap closed toward {o}" for o in oracles) + " |",
             "|---|---|---|" + "---|" * len(oracles)]
    for method in [m for m in METHODS if m in results]:
        auc = results[method]["target_auc"]
        std = "n/a" if auc["std"] is None else f"{auc['std']:.3f}"
        gaps = []
        for oracle in oracles:
            gap = "n/a"
            if "source_only" in mean and method not in references and mean[oracle] != mean["source_only"]:
                gap = f"{(auc['mean'] - mean['source_only']) / (mean[oracle] - mean['source_only']):.0%}"
            gaps.append(gap)
        lines.append(f"| {method} | {auc['mean']:.3f} ± {std} | {auc['n']} | " + " | ".join(gaps) + " |")
    for method, result in results.items():
        if "selection" not in result:
            continue
        at = result["selection"]["target_val_auc_at"]
        lines.append("")
        lines.append(f"{method}: target validation AUC of the checkpoint chosen by each rule (mean ± std)")
        lines.append("")
        lines.append("| chosen by | target validation AUC |")
        lines.append("|---|---|")
        choices = (("validator", result["selection"]["validator"] + " (no labels)"),
                   ("source_val", "source validation AUC"), ("oracle", "oracle (target labels)"))
        for choice, label in choices:
            stats = at[choice]
            std = "n/a" if stats["std"] is None else f"{stats['std']:.3f}"
            lines.append(f"| {label} | {stats['mean']:.3f} ± {std} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
