"""Tests of the gradient reversal layer, the DANN schedule and the dann strategy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import medtl
from medtl.engine import run_study
from medtl.grl import GradientReversal, GradientReverseLayer, dann_lambda
from medtl.model import Classifier
from medtl.strategy import StrategyContext
from medtl_plugins.dann import DANN, DomainDiscriminator
from medtl_plugins.finetune import FineTune
from medtl_plugins.poolings import AvgPool

from adaptation_helpers import make_host, make_study, single_thread


def test_grl_reverses_and_scales_gradient():
    x = torch.randn(5, 3, requires_grad=True)
    upstream = torch.randn(5, 3)
    y = GradientReversal.apply(x, 0.37)
    assert torch.equal(y, x)
    y.backward(upstream)
    assert torch.equal(x.grad, -0.37 * upstream)


def test_grl_layer_coefficient_override():
    layer = GradientReverseLayer(coeff=2.0)
    x = torch.ones(4, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(x.grad, torch.full((4,), -2.0))
    x.grad = None
    layer(x, coeff=0.5).sum().backward()
    assert torch.equal(x.grad, torch.full((4,), -0.5))


def test_dann_lambda_schedule():
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert dann_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert dann_lambda(2.0) == dann_lambda(1.0)
    assert dann_lambda(1.0, max_value=0.1) == pytest.approx(0.1 * dann_lambda(1.0))


def test_discriminator_width_and_output():
    disc = DomainDiscriminator(16, hidden=24, layers=2)
    widths = [m.out_features for m in disc if isinstance(m, nn.Linear)]
    assert widths == [24, 24, 1]
    assert disc(torch.randn(6, 16)).shape == (6, 1)


# ---------------------------------------------------------------------------
# Two moons (Ganin et al., JMLR 2016, section 5.1): 300 labeled source points,
# 300 unlabeled target points rotated by 35 degrees.
# ---------------------------------------------------------------------------


class MoonsMLP(nn.Module):
    """A two-layer MLP "backbone" returning a (B, width, 1) feature map for the pooling."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.out_channels = width
        self.stages = ["net"]

    def stage_modules(self, stage: str) -> list[nn.Module]:
        return [self.net]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, :, None]


def two_moons(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import make_moons

    xs, ys = make_moons(300, noise=0.1, random_state=seed)
    xt, yt = make_moons(300, noise=0.1, random_state=seed + 1000)
    angle = math.radians(35)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    center = xt.mean(axis=0)
    xt = (xt - center) @ rotation.T + center
    as_float = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_float(xs), as_float(xt), torch.tensor(ys), torch.tensor(yt)


def train_moons(strategy, seed: int, steps: int = 300, lr: float = 0.01) -> float:
    """Train through the strategy interface as the engine does; return target accuracy."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    xs, xt, ys, yt = two_moons(seed)
    model = Classifier(MoonsMLP(), AvgPool(32), num_classes=2)
    strategy.setup(model, StrategyContext(num_classes=2, epochs=1, steps_per_epoch=steps, weight_decay=0.0, lr=lr))
    groups = strategy.parameter_groups()
    for group in groups:
        group["lr"] = lr * group.pop("lr_scale", 1.0)
    optimizer = torch.optim.Adam(groups, lr=lr)
    strategy.train()
    for step in range(steps):
        i, j = torch.randint(0, 300, (64,)), torch.randint(0, 300, (64,))
        losses = strategy.train_step(strategy.network, {"image": xs[i], "label": ys[i]}, {"image": xt[j]},
                                     step / steps)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    strategy.eval()
    return float((strategy.predict(xt).argmax(1) == yt).float().mean())


def test_dann_beats_source_only_on_two_moons():
    seeds = range(5)
    with single_thread():
        source_only = [train_moons(FineTune(), s) for s in seeds]
        dann = [train_moons(DANN(discriminator_width=32, discriminator_dropout=0.0), s) for s in seeds]
    # Measured on CPU (torch 2.13): source-only 0.707 0.670 0.677 0.667 0.690 (mean 0.682);
    # DANN 0.863 0.967 0.777 0.890 0.617 (mean 0.823). DANN lost on one seed of five,
    # so the thresholds leave room for that and for small numeric differences.
    assert np.mean(dann) - np.mean(source_only) >= 0.07, (source_only, dann)
    assert sum(d > s for d, s in zip(dann, source_only)) >= 3, (source_only, dann)
    assert np.mean(dann) >= 0.75, dann


# ---------------------------------------------------------------------------
# Through the engine
# ---------------------------------------------------------------------------


class LabelSpyDANN(DANN):
    """DANN that records whether a target batch ever carried labels."""

    seen_target_keys: set = set()

    def train_step(self, net, source, target, progress):
        LabelSpyDANN.seen_target_keys.update(target)
        return super().train_step(net, source, target, progress)


class SpyPlugin:
    @medtl.hookimpl
    def medtl_register_strategies(self):
        return {"dann-spy": LabelSpyDANN}


def test_dann_run_logs_domain_accuracy_without_target_labels(tmp_path):
    host = make_host()
    host.register(SpyPlugin(), "dann-spy")
    study = make_study(tmp_path, strategy={"name": "dann-spy", "options": {"discriminator_width": 16}},
                       schedule={"name": "dann"})
    result = run_study(study, host)
    history = json.loads((result.run_dir / "history.json").read_text())
    assert len(history) == 2
    for entry in history:
        assert 0.0 <= entry["domain_accuracy"] <= 1.0
        assert 0.0 < entry["lambda"] <= 1.0
    assert history[1]["lambda"] > history[0]["lambda"]
    assert "image" in LabelSpyDANN.seen_target_keys
    assert "label" not in LabelSpyDANN.seen_target_keys
    # Annealing of Ganin et al.: lr = lr0 / (1 + 10 p) ** 0.75. After epoch 1 of 2
    # (3 steps each) p is 0.5; the default schedule would be cosine instead.
    assert history[0]["lr"] == pytest.approx(0.01 / 6**0.75)


def test_dann_state_round_trip():
    model = Classifier(MoonsMLP(), AvgPool(32), num_classes=2)
    strategy = DANN(discriminator_width=8)
    strategy.setup(model, StrategyContext(num_classes=2, epochs=1, steps_per_epoch=1, weight_decay=0.0, lr=0.1))
    state = strategy.state_dict()
    assert any(k.startswith("discriminator.") for k in state["network"])
    other = DANN(discriminator_width=8)
    other.setup(Classifier(MoonsMLP(), AvgPool(32), num_classes=2),
                StrategyContext(num_classes=2, epochs=1, steps_per_epoch=1, weight_decay=0.0, lr=0.1))
    other.load_state_dict(state)
    x = torch.randn(4, 2)
    strategy.eval()
    other.eval()
    assert torch.equal(strategy.predict(x), other.predict(x))


def test_dann_rejects_missing_target_batch():
    strategy = DANN(discriminator_width=8)
    strategy.setup(Classifier(MoonsMLP(), AvgPool(32), num_classes=2),
                   StrategyContext(num_classes=2, epochs=1, steps_per_epoch=1, weight_decay=0.0, lr=0.1))
    with pytest.raises(ValueError, match="target batch"):
        strategy.train_step(strategy.network, {"image": torch.randn(4, 2), "label": torch.zeros(4, dtype=torch.long)},
                            None, 0.0)
