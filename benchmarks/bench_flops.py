"""Benchmark compute efficiency: achieved FLOP/s of a training step against a large matmul.

Usage:
    python benchmarks/bench_flops.py [--batch 16] [--size 64] [--repeats 5] [--json results.json]

The FLOPs of one training step (forward, loss and backward of the default study's
network: ResNet-10, average pooling, linear head, 2D, one channel) are counted with
``torch.utils.flop_counter.FlopCounterMode``. The step is then timed without the
counter, and the achieved FLOP/s is the count over the median step time. The
reference is the FLOP/s of a square float32 matmul (2 n^3 FLOPs), the best case of
the same machine. The ratio shows how far the step is from the hardware's limit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _engine_bench import machine, median, print_machine  # noqa: E402


def build_network(device: torch.device) -> torch.nn.Module:
    import medtl
    from medtl.model import Classifier

    backbone = medtl.create("backbone", "resnet10", spatial_dims=2, in_channels=1)
    pooling = medtl.create("pooling", "avg", in_channels=backbone.out_channels)
    return Classifier(backbone, pooling, num_classes=2).to(device)


def training_step(network, optimizer, images, labels) -> None:
    loss = torch.nn.functional.cross_entropy(network(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device, repeats: int) -> list[float]:
    function()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--matmul", type=int, default=2048, help="side of the reference matmul")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = build_network(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    images = torch.randn(args.batch, 1, args.size, args.size, device=device)
    labels = torch.randint(0, 2, (args.batch,), device=device)

    counter = FlopCounterMode(display=False)
    with counter:
        loss = torch.nn.functional.cross_entropy(network(images), labels)
        loss.backward()
    step_flops = counter.get_total_flops()
    step_times = timed(lambda: training_step(network, optimizer, images, labels), device, args.repeats)

    a = torch.randn(args.matmul, args.matmul, device=device)
    b = torch.randn(args.matmul, args.matmul, device=device)
    matmul_times = timed(lambda: a @ b, device, args.repeats)
    matmul_flops = 2 * args.matmul ** 3

    step_rate = step_flops / median(step_times)
    matmul_rate = matmul_flops / median(matmul_times)
    info = machine()
    result = {"machine": info, "device": str(device), "batch": args.batch, "size": args.size,
              "step_flops": step_flops, "step_s": step_times, "step_flop_per_s": step_rate,
              "matmul_n": args.matmul, "matmul_s": matmul_times, "matmul_flop_per_s": matmul_rate,
              "fraction_of_matmul": step_rate / matmul_rate}
    print_machine(info)
    print(f"training step (batch {args.batch}, {args.size}x{args.size}): {step_flops / 1e9:.2f} GFLOP in "
          f"{median(step_times) * 1e3:.0f} ms = {step_rate / 1e9:.1f} GFLOP/s")
    print(f"float32 matmul {args.matmul}^2: {matmul_rate / 1e9:.1f} GFLOP/s; the step reaches "
          f"{100 * step_rate / matmul_rate:.0f}% of it")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
