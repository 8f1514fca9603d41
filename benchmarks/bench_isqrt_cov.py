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

Times are medians over ``--repeats`` runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
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


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_method(sqrtm: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor,
                repeats: int) -> tuple[float, float]:
    """Return median (forward, forward + backward) seconds."""
    def forward() -> torch.Tensor:
        with torch.no_grad():
            return sqrtm(covariance(x))

    def forward_backward() -> None:
        leaf = x.detach().requires_grad_(True)
        out = sqrtm(covariance(leaf))
        out.backward(grad)

    return median_time(forward, repeats), median_time(forward_backward, repeats)


def run(dims: list[int], batch: int, positions: int, iterations: int, repeats: int) -> list[dict]:
    rows = []
    n_forward, n_backward = newton_schulz_matmul_count(iterations)
    for d in dims:
        gen = torch.Generator().manual_seed(d)
        x = torch.randn(batch, d, positions, generator=gen)
        grad = torch.randn(batch, d, d, generator=gen)
        square = torch.randn(batch, d, d, generator=gen)
        tall = torch.randn(batch, d, positions, generator=gen)

        # the products that bound iSQRT-COV
        t_square = median_time(lambda: torch.bmm(square, square), repeats)
        t_cov_forward = median_time(lambda: torch.bmm(tall, tall.transpose(-1, -2)), repeats)
        t_cov_backward = median_time(lambda: torch.bmm(square, tall), repeats)

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
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = run(args.dims, args.batch, args.positions, args.iterations, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(to_markdown(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
