"""One conformance check over every registered strategy on a tiny synthetic batch."""

from __future__ import annotations

import pytest
import torch

import medtl
from medtl.model import Classifier
from medtl.strategy import Strategy, StrategyContext
from medtl_plugins.poolings import AvgPool

from adaptation_helpers import TinyConvNet, single_thread

#: small options so that each strategy builds quickly
SMALL_OPTIONS = {
    "dann": {"discriminator_width": 8},
    "contrastive": {"projection_hidden": 8, "projection_dim": 4},
}


def context() -> StrategyContext:
    return StrategyContext(num_classes=2, epochs=1, steps_per_epoch=2, weight_decay=1e-4, lr=0.01)


@pytest.mark.parametrize("name", medtl.components("strategy"))
def test_strategy_conformance(name):
    torch.manual_seed(0)
    strategy = medtl.create("strategy", name, **SMALL_OPTIONS.get(name, {}))
    assert isinstance(strategy, Strategy)
    model = Classifier(TinyConvNet(), AvgPool(16), num_classes=2)
    strategy.setup(model, context())
    params = [p for group in strategy.parameter_groups() for p in group["params"]]
    assert params
    optimizer = torch.optim.SGD(params, lr=0.01)
    source = {"image": torch.rand(6, 1, 8, 8), "label": torch.tensor([0, 1, 0, 1, 0, 1])}
    target = {"image": torch.rand(6, 1, 8, 8)} if strategy.uses_target else None

    with single_thread():
        for epoch in (1, 2):
            strategy.on_epoch_start(epoch)
            strategy.train()
            losses = strategy.train_step(strategy.network, source, target, (epoch - 1) / 2)
            assert losses["loss"].ndim == 0
            assert all(torch.isfinite(v) for v in losses.values())
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
        logs = strategy.epoch_logs()
        assert all(isinstance(v, float) for v in logs.values())

        strategy.eval()
        x = torch.rand(3, 1, 8, 8)
        assert strategy.predict(x).shape == (3, 2)
        logits, features = strategy.predict_with_features(x)
        assert features.shape == (3, 16)

        again = medtl.create("strategy", name, **SMALL_OPTIONS.get(name, {}))
        again.setup(Classifier(TinyConvNet(), AvgPool(16), num_classes=2), context())
        again.load_state_dict(strategy.state_dict())
        again.eval()
        assert torch.equal(again.predict(x), strategy.predict(x))
