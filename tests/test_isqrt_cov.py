"""iSQRT-COV: accuracy against eigendecomposition, gradients, rank deficiency, cost."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import medtl
from medtl_plugins.isqrt_cov import (
    ISqrtCovPool,
    MPNCovEigPool,
    covariance,
    newton_schulz_matmul_count,
    sqrtm_eig,
    sqrtm_newton_schulz,
    upper_triangle,
)


def random_spd(batch: int, d: int, low: float = 0.1, high: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Random symmetric positive definite matrices with eigenvalues in [low, high]."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, d, d, generator=gen, dtype=torch.float64))
    eigenvalues = low + (high - low) * torch.rand(batch, d, generator=gen, dtype=torch.float64)
    return (q * eigenvalues.unsqueeze(-2)) @ q.transpose(-1, -2)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((approx - exact).norm(dim=(-2, -1)) / exact.norm(dim=(-2, -1))).max())


def newton_schulz_through_autograd(sigma: torch.Tensor, iterations: int) -> torch.Tensor:
    """The coupled iterations written directly, for autograd to differentiate."""
    trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1).view(-1, 1, 1)
    a = sigma / trace
    eye = torch.eye(a.shape[-1], dtype=a.dtype).expand_as(a)
    y, z = a, eye
    for _ in range(iterations):
        t = 0.5 * (3 * eye - z @ y)
        y, z = y @ t, t @ z
    return y * trace.sqrt()


def test_default_iterations_close_to_eigh():
    # d = 16, eigenvalues in [0.1, 1]: 5 iterations leave about 6% relative error
    sigma = random_spd(8, 16)
    assert relative_error(sqrtm_newton_schulz(sigma, 5), sqrtm_eig(sigma)) < 0.1


def test_error_shrinks_with_iterations():
    sigma = random_spd(8, 16)
    exact = sqrtm_eig(sigma)
    errors = [relative_error(sqrtm_newton_schulz(sigma, n), exact) for n in range(1, 11)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-8


@pytest.mark.parametrize("iterations", [1, 2, 5])
def test_gradcheck_float64(iterations: int):
    x = torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: upper_triangle(sqrtm_newton_schulz(covariance(t), iterations)), (x,))


def test_closed_form_backward_matches_autograd():
    x = torch.randn(3, 8, 12, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 8, 8, dtype=torch.float64)
    ours = sqrtm_newton_schulz(covariance(x), 5)
    (g_ours,) = torch.autograd.grad(ours, x, grad)
    reference = newton_schulz_through_autograd(covariance(x), 5)
    (g_reference,) = torch.autograd.grad(reference, x, grad)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(g_ours, g_reference)


def test_pooling_gradcheck_with_reduction():
    pool = ISqrtCovPool(4, dim=3, iterations=3).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pool, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_stays_finite(dtype: torch.dtype):
    # 64 channels over 2x2 = 4 positions: the covariance has rank 3
    pool = ISqrtCovPool(64, dim=None).to(dtype)
    x = torch.randn(2, 64, 2, 2, dtype=dtype, requires_grad=True)
    out = pool(x)
    out.square().sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(x.grad).all()


def test_constant_map_gives_zeros():
    pool = ISqrtCovPool(8, dim=None)
    x = torch.ones(2, 8, 3, 3, requires_grad=True)
    out = pool(x)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isfinite(x.grad).all()


def test_float32_under_autocast():
    pool = ISqrtCovPool(16, dim=8)
    x = torch.randn(2, 16, 4, 4)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = pool(x.bfloat16())
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(2, 12, 5, 6), (1, 12, 3, 4, 2)])
def test_agrees_with_mpn_cov_eig(shape: tuple[int, ...]):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    isqrt = ISqrtCovPool(12, dim=None, iterations=30)
    eig = MPNCovEigPool(12, dim=None)
    torch.testing.assert_close(isqrt(x), eig(x), rtol=1e-6, atol=1e-8)


def test_create_by_name():
    pool = medtl.create("pooling", "isqrt-cov", in_channels=512, dim=64, iterations=5)
    assert pool.out_features == 64 * 65 // 2
    assert pool(torch.randn(2, 512, 3, 3)).shape == (2, 2080)


@pytest.mark.parametrize("options", [{"dim": 0}, {"iterations": 0}])
def test_invalid_options_rejected(options: dict):
    with pytest.raises(ValueError, match="dim|iterations"):
        ISqrtCovPool(8, **options)


class _CountSquareProducts(TorchDispatchMode):
    """Count batched d×d by d×d products (bmm and baddbmm, in place or not)."""

    def __init__(self, d: int):
        super().__init__()
        self.d = d
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("bmm", "baddbmm", "baddbmm_"):
            left, right = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
            if left.shape[-2:] == (self.d, self.d) and right.shape[-2:] == (self.d, self.d):
                self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("iterations", [1, 2, 5])
def test_matmul_count_as_documented(iterations: int):
    d = 7  # unlike the 11 positions, so covariance products are not counted
    sigma = covariance(torch.randn(2, d, 11)).detach().requires_grad_(True)
    expected_forward, expected_backward = newton_schulz_matmul_count(iterations)
    with _CountSquareProducts(d) as counter:
        out = sqrtm_newton_schulz(sigma, iterations)
    assert counter.count == expected_forward
    with _CountSquareProducts(d) as counter:
        out.backward(torch.randn_like(out))
    assert counter.count == expected_backward


def test_monai_metatensor_input():
    # the engine's data pipeline hands MONAI MetaTensors to the network
    from monai.data import MetaTensor

    pool = ISqrtCovPool(6, dim=4)
    x = MetaTensor(torch.randn(2, 6, 3, 3)).requires_grad_()
    out = pool(x)
    out.sum().backward()
    assert out.shape == (2, 10)
    assert torch.isfinite(x.grad).all()
