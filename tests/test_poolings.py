"""Every builtin pooling on 2D and 3D maps, batch size 1 included."""

from __future__ import annotations

import pytest
import torch

import medtl

POOLINGS = {
    "avg": {},
    "max": {},
    "gem": {},
    "isqrt-cov": {"dim": 6},
    "mpn-cov-eig": {"dim": 6},
}


def test_all_builtins_registered():
    assert set(POOLINGS) <= set(medtl.components("pooling"))


@pytest.mark.parametrize("name", sorted(POOLINGS))
@pytest.mark.parametrize("spatial", [(5, 4), (3, 4, 2)], ids=["2d", "3d"])
@pytest.mark.parametrize("batch", [1, 3])
def test_output_size_declared(name: str, spatial: tuple[int, ...], batch: int):
    pool = medtl.create("pooling", name, in_channels=10, **POOLINGS[name])
    out = pool(torch.randn(batch, 10, *spatial))
    assert out.shape == (batch, pool.out_features)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["avg", "max", "gem"])
def test_first_order_keep_channels(name: str):
    assert medtl.create("pooling", name, in_channels=10).out_features == 10


def test_covariance_no_reduction_size():
    pool = medtl.create("pooling", "isqrt-cov", in_channels=10, dim=None)
    assert pool.out_features == 55


def test_gem_between_avg_and_max():
    x = torch.rand(2, 4, 6, 6) + 0.1
    gem = medtl.create("pooling", "gem", in_channels=4, p=3.0)
    avg = x.flatten(2).mean(2)
    high = x.flatten(2).amax(2)
    out = gem(x)
    assert (out >= avg - 1e-6).all()
    assert (out <= high + 1e-6).all()


def test_gem_exponent_learns():
    gem = medtl.create("pooling", "gem", in_channels=4)
    gem(torch.rand(2, 4, 3, 3)).sum().backward()
    assert gem.p.grad is not None
