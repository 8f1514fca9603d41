"""Global covariance pooling with a matrix square root: iSQRT-COV and MPN-COV.

iSQRT-COV is from "Towards Faster Training of Global Covariance Pooling Networks by
Iterative Matrix Square Root Normalization" (Li, Xie, Wang and Gao, CVPR 2018,
https://arxiv.org/abs/1712.01034). For a feature map reshaped to ``X`` of shape
``(d, M)`` over M spatial positions it computes

* the covariance ``Σ = (1/M)·X·(I − 11ᵀ/M)·Xᵀ``,
* pre-normalization ``A = Σ / tr(Σ)``,
* N coupled Newton-Schulz iterations ``T = ½(3I − Z·Y)``, ``Y ← Y·T``, ``Z ← T·Z``
  from ``Y = A`` and ``Z = I``, so that ``Y`` tends to ``A^½``,
* post-compensation ``C = √tr(Σ) · Y``,
* the upper triangle of ``C``, ``d(d+1)/2`` features.

The backward pass is written out instead of differentiated through the loop. Because
``Y``, ``Z`` and ``T`` are symmetric polynomials in ``A``, the gradients of one
iteration with respect to its inputs are

* ``∂Y = G_Y·T + T·G_Y − 1.5·G_Y − ½·Z·G_Z·Z``,
* ``∂Z = G_Z·T + T·G_Z − 1.5·G_Z − ½·Y·G_Y·Y``,

by the chain rule through ``Y·T``, ``T·Z`` and ``T``, using ``Z·Y = 3I − 2T``. Each of
these maps commutes with transposition, and the backward pass of the covariance keeps
only the symmetric part of its gradient. So the incoming gradient is symmetrized once,
every gradient above then stays symmetric, and ``G·T + T·G`` costs one matrix product,
as the sum of a product and its transpose.

Matrix products (``d×d`` by ``d×d``) per pass, for N iterations (N ≥ 2):

* forward: ``3N − 3``, because the first iteration starts from ``Z = I`` and the last
  one does not update ``Z``;
* backward: ``6N − 8``, for the same two reasons.

For the default N = 5 that is 12 forward and 22 backward, plus one ``d×M`` by ``M×d``
product each way for the covariance. ``benchmarks/bench_isqrt_cov.py`` times them.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "covariance",
    "sqrtm_newton_schulz",
    "sqrtm_eig",
    "upper_triangle",
    "newton_schulz_matmul_count",
    "ISqrtCovPool",
    "MPNCovEigPool",
]

#: Traces below this are treated as zero, so that an all-constant feature map gives
#: zero features instead of a division by zero.
_TRACE_EPS = 1e-12


def newton_schulz_matmul_count(iterations: int) -> tuple[int, int]:
    """Return the ``d×d`` matrix products of :func:`sqrtm_newton_schulz` as ``(forward, backward)``."""
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if iterations == 1:
        return 1, 1
    return 3 * iterations - 3, 6 * iterations - 8


def _add_transpose(r: torch.Tensor) -> torch.Tensor:
    """Return ``r + rᵀ`` for a batch of square matrices."""
    return r + r.transpose(-1, -2)


def _frobenius_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return ``⟨a, b⟩`` per matrix as ``(B, 1, 1)``, without an ``a * b`` temporary."""
    batch = a.shape[0]
    return torch.bmm(a.reshape(batch, 1, -1), b.reshape(batch, -1, 1))


# On a CPU, each elementwise pass over a (B, d, d) batch costs a sizeable fraction of a
# product. The code below therefore folds scaling and sums into the products, using
# in-place ``baddbmm_`` (which, unlike out-of-place ``baddbmm`` with nonzero ``beta``,
# does not first copy its input), and changes only diagonals in place.


class _Covariance(torch.autograd.Function):
    """``Σ = (1/M)·X_c·X_cᵀ`` for ``X`` of shape ``(B, d, M)``, ``X_c`` centered over M."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[-1]
        xc = x - x.mean(dim=-1, keepdim=True)
        ctx.save_for_backward(xc)
        out = xc.new_empty((x.shape[0], x.shape[1], x.shape[1]))
        return torch.baddbmm(out, xc, xc.transpose(-1, -2), beta=0, alpha=1.0 / m)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (xc,) = ctx.saved_tensors
        # d/dX of tr(Gᵀ·X_c·X_cᵀ)/M is (G + Gᵀ)·X_c/M. It needs no centering of its own,
        # since the rows of X_c already have zero mean.
        out = xc.new_empty(xc.shape)
        return torch.baddbmm(out, _add_transpose(grad), xc, beta=0, alpha=1.0 / xc.shape[-1])


def covariance(x: torch.Tensor) -> torch.Tensor:
    """Return the covariance ``(B, d, d)`` of ``x`` ``(B, d, M)`` over its M positions."""
    return _Covariance.apply(x)


def _scaled_bmm(left: torch.Tensor, right: torch.Tensor, alpha: float) -> torch.Tensor:
    """Return ``alpha·left·right`` with the scaling folded into the product."""
    return torch.baddbmm(left.new_empty((left.shape[0], left.shape[1], right.shape[2])), left, right,
                         beta=0, alpha=alpha)


class _NewtonSchulzSqrt(torch.autograd.Function):
    """Square root of a symmetric positive semi-definite batch ``(B, d, d)``."""

    @staticmethod
    def forward(ctx: Any, sigma: torch.Tensor, iterations: int) -> torch.Tensor:
        batch = sigma.shape[0]

        # pre-normalization by the trace
        trace_raw = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)
        trace = trace_raw.clamp_min(_TRACE_EPS).view(batch, 1, 1)
        a = sigma / trace

        # Newton-Schulz. ys[k-1] is Y_{k-1} and zs[k-2] is Z_{k-1} (Z_0 = I is never formed).
        # shifted[k-2] is T_k − ¾I for k ≥ 2, the form that the backward pass multiplies by;
        # the first iteration does not need it, because its T_1 = ½(3I − A) = Z_1.
        ys, zs, shifted = [a], [], []
        y = torch.baddbmm(a, a, a, beta=1.5, alpha=-0.5)
        z = None
        if iterations > 1:
            z = a.mul(-0.5)
            z.diagonal(dim1=-2, dim2=-1).add_(1.5)
        for k in range(2, iterations + 1):
            t = _scaled_bmm(z, y, -0.5)
            t.diagonal(dim1=-2, dim2=-1).add_(1.5)
            ys.append(y)
            zs.append(z)
            y_next = torch.bmm(y, t)
            if k < iterations:
                z = torch.bmm(t, z)
            y = y_next
            t.diagonal(dim1=-2, dim2=-1).sub_(0.75)
            shifted.append(t)

        # post-compensation by the square root of the trace
        trace_used = (trace_raw > _TRACE_EPS).to(sigma.dtype).view(batch, 1, 1)
        ctx.save_for_backward(sigma, y, trace, trace_used, *ys, *zs, *shifted)
        return y * trace.sqrt()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        sigma, y_last, trace, trace_used, *saved = ctx.saved_tensors
        n = (len(saved) + 2) // 3
        ys, zs, shifted = saved[:n], saved[n:2 * n - 1], saved[2 * n - 1:]
        root_trace = trace.sqrt()

        # through C = √tr · Y_N, with the incoming gradient symmetrized
        g_y = _add_transpose(grad).mul_(0.5 * root_trace)
        g_trace = _frobenius_dot(g_y, y_last).div_(2 * trace)
        g_z: torch.Tensor | None = None

        # through iterations N..2. With R = G_Y·(T − ¾I) − ¼Z·G_Z·Z, ∂Y = R + Rᵀ, and
        # likewise ∂Z with the roles of Y and Z swapped.
        for y, z, t_shifted in zip(reversed(ys[1:]), reversed(zs), reversed(shifted)):
            r = torch.bmm(g_y, t_shifted)
            if g_z is not None:
                r.baddbmm_(torch.bmm(z, g_z), z, alpha=-0.25)
            q = _scaled_bmm(torch.bmm(y, g_y), y, -0.25)
            if g_z is not None:
                q.baddbmm_(g_z, t_shifted)
            g_y, g_z = _add_transpose(r), _add_transpose(q)

        # through iteration 1, where Y_1 = 1.5A − ½A² and Z_1 = 1.5I − ½A:
        # R = ¾G_Y − ¼G_Z − ½G_Y·A
        a = ys[0]
        r = g_y.mul(0.75) if g_z is None else torch.add(g_y, g_z, alpha=-1.0 / 3.0).mul_(0.75)
        r.baddbmm_(g_y, a, alpha=-0.5)
        g_a = _add_transpose(r)

        # through A = Σ / tr(Σ)
        g_trace = g_trace - _frobenius_dot(g_a, sigma) / trace.square()
        g_sigma = g_a.div_(trace)
        g_sigma.diagonal(dim1=-2, dim2=-1).add_((g_trace * trace_used).view(-1, 1))
        return g_sigma, None


def sqrtm_newton_schulz(sigma: torch.Tensor, iterations: int = 5) -> torch.Tensor:
    """Approximate the square root of symmetric PSD matrices ``(B, d, d)`` as iSQRT-COV does.

    The backward pass is the closed form in the module docstring. Its gradient is
    exact for the N-step polynomial that the forward pass computes, which approaches
    the true square root as N grows. It is the symmetric part of the gradient, which
    is all that reaches the input when ``sigma`` is a covariance.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    return _NewtonSchulzSqrt.apply(sigma, iterations)


def sqrtm_eig(sigma: torch.Tensor) -> torch.Tensor:
    """Return the square root of symmetric PSD matrices by eigendecomposition.

    Note:
        PyTorch documents that gradients through ``torch.linalg.eigh`` are finite
        only for distinct eigenvalues and unstable when two are close. A covariance
        with more channels than spatial positions has a repeated zero eigenvalue.
        In a check with 16 channels over 4 positions the gradients of this square
        root stayed finite, but iSQRT-COV is the pooling to train with.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma)
    root = eigenvalues.clamp_min(0).sqrt()
    return (eigenvectors * root.unsqueeze(-2)) @ eigenvectors.transpose(-1, -2)


def upper_triangle(c: torch.Tensor) -> torch.Tensor:
    """Vectorize the upper triangle, diagonal included, of ``(B, d, d)`` into ``(B, d(d+1)/2)``."""
    d = c.shape[-1]
    rows, cols = torch.triu_indices(d, d, device=c.device)
    return c[:, rows, cols]


class _CovariancePoolBase(nn.Module):
    """Optional channel reduction, then a covariance square root, vectorized."""

    def __init__(self, in_channels: int, dim: int | None, sqrtm: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self._sqrtm = sqrtm
        if dim is not None and dim < 1:
            raise ValueError(f"pooling option dim must be a positive channel count or null, got {dim}")
        self.in_channels = in_channels
        self.dim = int(dim) if dim is not None else in_channels
        if dim is None:
            self.reduce = nn.Identity()
        else:
            # A 1x1 convolution on the flattened map (B, C, M) is the same for 2D and 3D
            # maps, and batch norm over (B, d, M) uses the same statistics as BatchNorm2d/3d.
            self.reduce = nn.Sequential(
                nn.Conv1d(in_channels, self.dim, kernel_size=1, bias=False),
                nn.BatchNorm1d(self.dim),
                nn.ReLU(inplace=True),
            )
        self.out_features = self.dim * (self.dim + 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x.flatten(2))
        # Square roots of covariances lose too much in half precision, so this part
        # always runs in float32 (or float64 when given float64), even under autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
            return upper_triangle(self._sqrtm(covariance(x)))


class ISqrtCovPool(_CovariancePoolBase):
    """iSQRT-COV: covariance pooling with an iterative matrix square root.

    Li, Xie, Wang and Gao, "Towards Faster Training of Global Covariance Pooling
    Networks by Iterative Matrix Square Root Normalization", CVPR 2018.

    Args:
        in_channels: channels of the feature map.
        dim: channels after a 1x1 convolution with batch norm and ReLU (default 256),
            or None for no reduction. The output has ``dim·(dim+1)/2`` features.
        iterations: Newton-Schulz iterations N (default 5).

    Shape:
        input ``(B, in_channels, *spatial)`` with 2 or 3 spatial axes; output
        ``(B, out_features)`` in float32.
    """

    def __init__(self, in_channels: int, dim: int | None = 256, iterations: int = 5):
        if iterations < 1:
            raise ValueError(f"pooling option iterations must be at least 1, got {iterations}")
        super().__init__(in_channels, dim, partial(sqrtm_newton_schulz, iterations=int(iterations)))
        self.iterations = int(iterations)


class MPNCovEigPool(_CovariancePoolBase):
    """MPN-COV reference: covariance pooling with an eigendecomposition square root.

    The exact square root that iSQRT-COV approximates, for comparison. Its gradient
    can be unstable when eigenvalues are close (see :func:`sqrtm_eig`).

    Args:
        in_channels: channels of the feature map.
        dim: channels after a 1x1 convolution with batch norm and ReLU (default 256),
            or None for no reduction.
    """

    def __init__(self, in_channels: int, dim: int | None = 256):
        super().__init__(in_channels, dim, sqrtm_eig)

