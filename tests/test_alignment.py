"""Tests of the coral and mmd alignment strategies."""

from __future__ import annotations

import pytest
import torch

from medtl.model import Classifier
from medtl.strategy import StrategyContext
from medtl_plugins.alignment import Coral, MultiKernelMMD, coral_loss, mk_mmd_loss
from medtl_plugins.poolings import AvgPool

from adaptation_helpers import TinyConvNet, single_thread


def test_coral_matches_reference():
    torch.manual_seed(0)
    xs, xt = torch.randn(20, 4), torch.randn(30, 4) * 2
    d = 4
    cs = (xs - xs.mean(0)).T @ (xs - xs.mean(0)) / (len(xs) - 1)
    ct = (xt - xt.mean(0)).T @ (xt - xt.mean(0)) / (len(xt) - 1)
    expected = ((cs - ct) ** 2).sum() / (4 * d * d)
    assert float(coral_loss(xs, xt)) == pytest.approx(float(expected), rel=1e-5)
    assert float(coral_loss(xs, xs)) == pytest.approx(0.0, abs=1e-7)


def test_mmd_reference_and_shift_sensitivity():
    torch.manual_seed(0)
    xs, xt = torch.randn(16, 3), torch.randn(16, 3)
    x = torch.cat([xs, xt])
    sq = torch.cdist(x, x) ** 2
    base = sq.sum() / (32 * 31)
    kernel = sum(torch.exp(-sq / (s * base)) for s in (0.5, 1.0, 2.0))
    expected = kernel[:16, :16].mean() + kernel[16:, 16:].mean() - 2 * kernel[:16, 16:].mean()
    assert float(mk_mmd_loss(xs, xt, (0.5, 1.0, 2.0))) == pytest.approx(float(expected), rel=1e-5)
    shifted = mk_mmd_loss(xs, xt + 3.0)
    assert float(shifted) > 5 * float(mk_mmd_loss(xs, xt))


def final_distance(cls, key: str, weight: float) -> float:
    """Train from a fixed start for 30 steps; return the last step's feature distance."""
    torch.manual_seed(0)
    model = Classifier(TinyConvNet(), AvgPool(16), num_classes=2)
    strategy = cls(weight=weight)
    strategy.setup(model, StrategyContext(num_classes=2, epochs=1, steps_per_epoch=1, weight_decay=0.0, lr=0.01))
    optimizer = torch.optim.Adam([p for g in strategy.parameter_groups() for p in g["params"]], lr=0.01)
    g = torch.Generator().manual_seed(1)
    source = {"image": torch.rand(16, 1, 8, 8, generator=g), "label": torch.arange(16) % 2}
    target = {"image": 3.0 * torch.rand(16, 1, 8, 8, generator=g) - 1.0}
    strategy.train()
    for _ in range(30):
        losses = strategy.train_step(strategy.network, source, target, 0.5)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    return float(strategy.train_step(strategy.network, source, target, 1.0)[key])


# CORAL distances of these features are about 1e-4 (measured: 5.4e-4 without
# alignment, 4.7e-5 at weight 100), so CORAL needs the larger weight.
@pytest.mark.parametrize("cls, key, weight", [(Coral, "coral", 100.0), (MultiKernelMMD, "mmd", 10.0)])
def test_alignment_lowers_feature_distance(cls, key, weight):
    assert cls().uses_target
    with single_thread():
        aligned = final_distance(cls, key, weight=weight)
        unaligned = final_distance(cls, key, weight=0.0)
    assert aligned < 0.5 * unaligned


def test_ramp_scales_alignment_weight():
    torch.manual_seed(0)
    model = Classifier(TinyConvNet(), AvgPool(16), num_classes=2)
    strategy = Coral(weight=1.0, ramp=True)
    strategy.setup(model, StrategyContext(num_classes=2, epochs=1, steps_per_epoch=1, weight_decay=0.0, lr=0.01))
    strategy.eval()
    source = {"image": torch.rand(8, 1, 8, 8), "label": torch.arange(8) % 2}
    target = {"image": torch.rand(8, 1, 8, 8)}
    losses = strategy.train_step(strategy.network, source, target, 0.0)
    assert float(losses["loss"].detach()) == pytest.approx(float(losses["ce"]))


def test_invalid_kernel_scales_rejected():
    with pytest.raises(ValueError, match="kernel_scales"):
        MultiKernelMMD(kernel_scales=[1.0, -2.0])
