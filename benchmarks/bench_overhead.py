"""Benchmark medtl's training epoch against a hand-written PyTorch and MONAI loop.

Usage:
    python benchmarks/bench_overhead.py [--study sample_data/study.yaml] [--epochs 3]
                                        [--steps 8] [--repeats 3] [--json results.json]

Both sides train the same network (MONAI's ResNet-10 with average pooling and a
linear head) on the same preprocessed images, with the same MONAI augmentation,
batch size, AdamW optimizer, label smoothing and cosine schedule, for ``--steps``
steps per epoch. medtl's epoch time is the ``seconds`` (wall) and ``cpu_seconds``
(process CPU time) entries of its history, which cover the training steps only,
without validation. The hand-written loop is timed the same way over the same
steps. The first epoch of each run is a warm-up and is left out. The figure is the
median medtl epoch time over the median hand-written epoch time, for wall and for
CPU time; the target is at most 1.05. The minimum epoch times are printed too: on a
machine shared with other work, where a virtual CPU's stolen time can count as
process CPU time, the fastest epoch of each side is the least disturbed one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _engine_bench import machine, median, print_machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _load_study(path: Path, epochs: int, steps: int, out: str):
    from medtl.config import load_study

    return load_study(path, [f"train.epochs={epochs}", f"train.steps_per_epoch={steps}", f"output.dir={out}",
                             "train.device=cpu", "evaluation.splits=[]", "data.cache=false"])


def medtl_epochs(study) -> list[tuple[float, float]]:
    """Run the study with medtl; return (wall, CPU) training seconds of each epoch after the first."""
    from medtl.engine import run_study

    result = run_study(study)
    return [(entry["seconds"], entry["cpu_seconds"]) for entry in result.metrics["history"][1:]]


def hand_written_epochs(study) -> list[tuple[float, float]]:
    """Train with a plain loop on medtl's preprocessed items; return (wall, CPU) seconds per epoch after the first."""
    from monai.data import Dataset
    from monai.networks.nets import ResNet
    from monai.transforms import Compose
    from torch.utils.data import DataLoader

    from medtl.engine import _Study, build_host, seed_everything
    from medtl.run import RunContext

    # Only medtl's deterministic reading and preprocessing is reused, so that both
    # sides train on identical tensors; the loop itself is plain PyTorch and MONAI.
    host = build_host(study)
    seed_everything(study.seed)
    with tempfile.TemporaryDirectory() as folder:
        runner = _Study(study, host, RunContext(study=study, run_dir=Path(folder), host=host),
                        torch.device("cpu"))
        runner.load_data()
    items = [{"image": item["image"], "label": item["label"]} for item in runner.train_items]
    augment = host.create("transform", study.transforms.preset, data=study.data, **study.transforms.options)

    def collate(batch):
        images = torch.stack([b["image"].as_tensor() if hasattr(b["image"], "as_tensor") else b["image"]
                              for b in batch])
        return images, torch.tensor([b["label"] for b in batch])

    loader = DataLoader(Dataset(items, transform=Compose(augment)), batch_size=study.train.batch_size,
                        shuffle=True, drop_last=True, collate_fn=collate, num_workers=study.train.num_workers)
    # The stem matches medtl's resnet10 backbone (7x7 convolution with stride 2, then max pooling).
    model = ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[64, 128, 256, 512], spatial_dims=2,
                   n_input_channels=study.data.channels, conv1_t_size=7, conv1_t_stride=2,
                   num_classes=len(runner.manifest.labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=study.optimizer.lr,
                                  weight_decay=study.optimizer.weight_decay)
    steps, epochs = study.train.steps_per_epoch, study.train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / (steps * epochs))))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    times = []
    batches = iter(loader)
    for _ in range(epochs):
        model.train()
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            try:
                images, labels = next(batches)
            except StopIteration:
                batches = iter(loader)
                images, labels = next(batches)
            loss = criterion(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss.item()
        times.append((time.perf_counter() - start, time.process_time() - cpu_start))
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=REPO / "sample_data" / "study.yaml")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is a warm-up")
    parser.add_argument("--steps", type=int, default=8, help="training steps per epoch")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()

    import logging

    logging.getLogger("medtl").setLevel(logging.WARNING)
    info = machine()
    medtl_times: list[tuple[float, float]] = []
    plain_times: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as out:
        study = _load_study(args.study, args.epochs, args.steps, out)
        for repeat in range(args.repeats):
            # Alternate which side goes first, so that a load change on a shared machine hits both.
            order = (medtl_epochs, hand_written_epochs) if repeat % 2 == 0 else (hand_written_epochs, medtl_epochs)
            for function in order:
                times = function(study)
                (medtl_times if function is medtl_epochs else plain_times).extend(times)
                print(f"repeat {repeat + 1}: {function.__name__}: "
                      + ", ".join(f"{wall:.2f} s wall / {cpu:.2f} s CPU" for wall, cpu in times))

    result = {"machine": info, "study": str(args.study), "epochs": args.epochs, "steps": args.steps,
              "batch_size": study.train.batch_size, "repeats": args.repeats,
              "medtl_epoch_s": medtl_times, "hand_written_epoch_s": plain_times}
    print_machine(info)
    for index, clock in enumerate(("wall", "CPU")):
        for statistic, reduce in (("median", median), ("minimum", min)):
            medtl_value = reduce([t[index] for t in medtl_times])
            plain_value = reduce([t[index] for t in plain_times])
            result[f"ratio_{clock.lower()}_{statistic}"] = medtl_value / plain_value
            print(f"{statistic} epoch of {args.steps} steps, batch {study.train.batch_size}, {clock} time: medtl "
                  f"{medtl_value:.2f} s, hand-written {plain_value:.2f} s, ratio {medtl_value / plain_value:.3f} "
                  "(target <= 1.05)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
