"""Tests of the contrastive losses and strategy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medtl.model import Classifier
from medtl.strategy import StrategyContext
from medtl_plugins.contrastive import Contrastive, nt_xent_loss, supcon_loss
from medtl_plugins.poolings import AvgPool

from adaptation_helpers import TinyConvNet


def reference_supcon(z: torch.Tensor, labels: torch.Tensor, tau: float) -> float:
    """L_out of Khosla et al. (2020), equation 2, written as plain loops."""
    z = F.normalize(z.double(), dim=1)
    y = torch.cat([labels, labels]).tolist()
    n = len(z)
    total = 0.0
    for i in range(n):
        positives = [p for p in range(n) if p != i and y[p] == y[i]]
        denominator = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(n) if a != i)
        total += -sum(math.log(math.exp(float(z[i] @ z[p]) / tau) / denominator) for p in positives) / len(positives)
    return total / n


def reference_nt_xent(z: torch.Tensor, tau: float) -> float:
    """NT-Xent of Chen et al. (2020), algorithm 1, written as plain loops."""
    z = F.normalize(z.double(), dim=1)
    n = len(z) // 2
    total = 0.0
    for i in range(2 * n):
        j = i + n if i < n else i - n
        denominator = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / denominator)
    return total / (2 * n)


def test_supcon_matches_reference():
    torch.manual_seed(0)
    z = torch.randn(10, 6)
    labels = torch.tensor([0, 1, 1, 2, 0])
    for tau in (0.1, 0.5):
        assert float(supcon_loss(z, labels, tau)) == pytest.approx(reference_supcon(z, labels, tau), rel=1e-5)


def test_nt_xent_matches_reference():
    torch.manual_seed(1)
    z = torch.randn(8, 5)
    for tau in (0.2, 0.5):
        assert float(nt_xent_loss(z, tau)) == pytest.approx(reference_nt_xent(z, tau), rel=1e-5)


def test_supcon_with_distinct_labels_equals_nt_xent():
    torch.manual_seed(2)
    z = torch.randn(12, 4)
    assert float(supcon_loss(z, torch.arange(6), 0.3)) == pytest.approx(float(nt_xent_loss(z, 0.3)), rel=1e-5)


def setup_contrastive(**options) -> tuple[Contrastive, Classifier]:
    torch.manual_seed(0)
    model = Classifier(TinyConvNet(), AvgPool(16), num_classes=2)
    strategy = Contrastive(projection_hidden=16, projection_dim=8, **options)
    strategy.setup(model, StrategyContext(num_classes=2, epochs=1, steps_per_epoch=1, weight_decay=0.0, lr=0.1))
    return strategy, model


def test_views_are_random_and_shaped_like_input():
    strategy, _ = setup_contrastive()
    images = torch.rand(4, 1, 12, 12)
    first, second = strategy.views(images)
    assert first.shape == second.shape == images.shape
    assert type(first) is torch.Tensor
    assert not torch.equal(first, second)


def test_step_uses_target_images_and_trains_projection():
    strategy, model = setup_contrastive()
    assert strategy.uses_target
    source = {"image": torch.rand(6, 1, 12, 12), "label": torch.tensor([0, 1, 0, 1, 0, 1])}
    target = {"image": torch.rand(6, 1, 12, 12)}
    strategy.train()
    losses = strategy.train_step(strategy.network, source, target, 0.0)
    assert set(losses) == {"loss", "supcon", "nt_xent", "probe"}
    losses["loss"].backward()
    assert model.backbone.stem[0].weight.grad is not None
    assert strategy.network.projector[0].weight.grad is not None


def test_probe_does_not_move_backbone():
    strategy, model = setup_contrastive(supcon_weight=0.0, simclr_weight=1e-12)
    source = {"image": torch.rand(6, 1, 12, 12), "label": torch.tensor([0, 1, 0, 1, 0, 1])}
    strategy.train()
    out = strategy.network(source["image"])
    F.cross_entropy(out["logits"], source["label"]).backward()
    assert model.backbone.stem[0].weight.grad is None
    assert model.head.weight.grad is not None


def test_supervised_only_needs_no_target():
    strategy, _ = setup_contrastive(simclr_weight=0.0)
    assert not strategy.uses_target


@pytest.mark.parametrize("options, message", [
    ({"supcon_weight": 0.0, "simclr_weight": 0.0}, "one of them > 0"),
    ({"temperature": 0.0}, "temperature"),
])
def test_invalid_options_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        Contrastive(**options)


def test_invalid_view_option_named():
    strategy, _ = setup_contrastive(views={"rotation": 5})
    with pytest.raises(ValueError, match="views"):
        strategy.views(torch.rand(2, 1, 8, 8))
