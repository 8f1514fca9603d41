"""Time iSQRT-COV against eigendecomposition and SVD square roots, forward and backward.

Each method maps features ``X`` of shape ``(batch, d, positions)`` to the square root of
their covariance, and a backward pass takes a random upstream gradient:

* ``isqrt``: medtl's iSQRT-COV with the closed-form backward;
* ``isqrt-autograd``: the same N coupled Newton-Schulz iterations written directly,
  with autograd differentiating through the loop;
* ``eigh``: ``torch.linalg.eigh`` (the ``mpn-cov-eig`` pooling);
* ``svd``: ``torch.linalg.svd`` of the covariance, root ``U·diag(√s)·Uᵀ``.

It also times one batched ``d×d`` product and the two covariance products, counts the
products that iSQRT-COV performs, and reports the measured time over that count times
the measured product time (the matmul bound). Run from the repository root::

    python benchmarks/bench_isqrt_cov.py --dims 64 128 256 --batch 32 --positions 196

Each time is the minimum over ``--repeats`` runs after one warm-up run, because other
work on the machine can only add time. ``--clock wall`` (the default) measures elapsed
time. On a shared machine, ``--clock cpu --threads 1`` measures the CPU time of this
process instead, which other processes change far less. With one thread that is the
work done, without the time spent waiting for a core.

``--keep-freed-memory`` stops glibc from returning freed memory to the system
(``mallopt``), so that repeated passes reuse pages instead of faulting in new ones.
The forward pass keeps about 3N intermediate ``(batch, d, d)`` tensors for the
backward pass, and with glibc's defaults every pass faults them in afresh; this flag
shows how much of the time that costs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import time
from typing import Callable

import torch

from medtl_plugins.isqrt_cov import covariance, newton_schulz_matmul_count, sqrtm_eig, sqrtm_newton_schulz


def sqrtm_svd(sigma: torch.Tensor) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(sigma)
    return (u * s.clamp_min(0).sqrt().unsqueeze(-2)) @ u.transpose(-1, -2)


def sqrtm_newton_schulz_autograd(sigma: torch.Tensor, iterations: int) -> torch.Tensor:
    trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1).view(-1, 1, 1)
    a = sigma / trace
    eye = torch.eye(a.shape[-1], dtype=a.dtype).expand_as(a)
    y, z = a, eye
    for _ in range(iterations):
        t = 0.5 * (3 * eye - z @ y)
        y, z = y @ t, t @ z
    return y * trace.sqrt()


CLOCK = time.perf_counter
#: distinct operand sets when timing single products
RING = 6


def min_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return min(times)


def keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse: no trimming, no mmap for chunks under 32 MiB."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    if not (libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 32 << 20)):
        raise RuntimeError("mallopt failed; --keep-freed-memory needs glibc")


def time_method(sqrtm: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor,
                repeats: int) -> tuple[float, float]:
    """Return the minimum (forward, forward + backward) seconds."""
    def forward() -> torch.Tensor:
        with torch.no_grad():
            return sqrtm(covariance(x))

    def forward_backward() -> None:
        leaf = x.detach().requires_grad_(True)
        out = sqrtm(covariance(leaf))
        out.backward(grad)

    return min_time(forward, repeats), min_time(forward_backward, repeats)


def run(dims: list[int], batch: int, positions: int, iterations: int, repeats: int) -> list[dict]:
    rows = []
    n_forward, n_backward = newton_schulz_matmul_count(iterations)
    for d in dims:
        gen = torch.Generator().manual_seed(d)
        x = torch.randn(batch, d, positions, generator=gen)
        grad = torch.randn(batch, d, d, generator=gen)
        # The products that bound iSQRT-COV, each timed over a ring of distinct operands,
        # because the chain of iterations never multiplies operands still in cache.
        squares = [torch.randn(batch, d, d, generator=gen) for _ in range(RING)]
        talls = [torch.randn(batch, d, positions, generator=gen) for _ in range(RING)]
        t_square = min_time(lambda: [torch.bmm(a, b) for a, b in zip(squares, squares[1:])], repeats) / (RING - 1)
        t_cov_forward = min_time(lambda: [torch.bmm(t, t.transpose(-1, -2)) for t in talls], repeats) / RING
        t_cov_backward = min_time(lambda: [torch.bmm(a, t) for a, t in zip(squares, talls)], repeats) / RING

        methods = {
            "isqrt": lambda s: sqrtm_newton_schulz(s, iterations),
            "isqrt-autograd": lambda s: sqrtm_newton_schulz_autograd(s, iterations),
            "eigh": sqrtm_eig,
            "svd": sqrtm_svd,
        }
        timings = {name: time_method(fn, x, grad, repeats) for name, fn in methods.items()}

        bound_forward = n_forward * t_square + t_cov_forward
        bound_total = (n_forward + n_backward) * t_square + t_cov_forward + t_cov_backward
        fwd, total = timings["isqrt"]
        row = {
            "d": d, "batch": batch, "positions": positions, "iterations": iterations,
            "matmul_s": t_square, "cov_forward_matmul_s": t_cov_forward, "cov_backward_matmul_s": t_cov_backward,
            "matmuls_forward": n_forward, "matmuls_backward": n_backward,
            "bound_forward_s": bound_forward, "bound_total_s": bound_total,
            "ratio_to_bound_forward": fwd / bound_forward, "ratio_to_bound_total": total / bound_total,
        }
        for name, (f, t) in timings.items():
            row[f"{name}_forward_s"] = f
            row[f"{name}_total_s"] = t
        row["isqrt_over_eigh_total"] = total / timings["eigh"][1]
        row["isqrt_over_svd_total"] = total / timings["svd"][1]
        row["isqrt_over_autograd_total"] = total / timings["isqrt-autograd"][1]
        rows.append(row)
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| d | matmul (ms) | products fwd+bwd | bound (ms) | isqrt fwd / fwd+bwd (ms) | ratio to bound "
        "| isqrt-autograd (ms) | eigh fwd / fwd+bwd (ms) | svd fwd / fwd+bwd (ms) | isqrt / eigh | isqrt / svd |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = 1000.0
        lines.append(
            f"| {r['d']} | {r['matmul_s'] * ms:.2f} | {r['matmuls_forward']}+{r['matmuls_backward']} "
            f"| {r['bound_total_s'] * ms:.1f} "
            f"| {r['isqrt_forward_s'] * ms:.1f} / {r['isqrt_total_s'] * ms:.1f} "
            f"| {r['ratio_to_bound_total']:.2f} "
            f"| {r['isqrt-autograd_total_s'] * ms:.1f} "
            f"| {r['eigh_forward_s'] * ms:.1f} / {r['eigh_total_s'] * ms:.1f} "
            f"| {r['svd_forward_s'] * ms:.1f} / {r['svd_total_s'] * ms:.1f} "
            f"| {r['isqrt_over_eigh_total']:.2f} | {r['isqrt_over_svd_total']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256], help="covariance sizes d")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    parser.add_argument("--positions", type=int, default=196, help="spatial positions M (196 = 14x14)")
    parser.add_argument("--iterations", type=int, default=5, help="Newton-Schulz iterations N")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time; cpu: CPU time of this process (use with --threads 1)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="tell glibc to keep freed memory for reuse (Linux only)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    rows = run(args.dims, args.batch, args.positions, args.iterations, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"keep freed memory: {args.keep_freed_memory}, {platform.processor() or platform.machine()}")
    print(to_markdown(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
