"""Tests of the finetune strategy: freezing, gradual unfreezing, learning rates and tricks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medtl.model import Classifier
from medtl.strategy import StrategyContext, classifier_parameter_groups
from medtl_plugins.finetune import FineTune
from medtl_plugins.poolings import AvgPool

from adaptation_helpers import TinyConvNet


def build(strategy: FineTune, lr: float = 0.1) -> tuple[Classifier, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Classifier(TinyConvNet(), AvgPool(16), num_classes=2)
    strategy.setup(model, StrategyContext(num_classes=2, epochs=3, steps_per_epoch=2, weight_decay=1e-4, lr=lr))
    groups = strategy.parameter_groups()
    for group in groups:
        group["lr"] = lr * group.pop("lr_scale", 1.0)
    return model, torch.optim.SGD(groups, lr=lr, momentum=0.9)


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(8, 1, 12, 12, generator=g) * 2 + 1, "label": torch.arange(8) % 2}


def train_steps(strategy: FineTune, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    strategy.train()
    for step in range(steps):
        losses = strategy.train_step(strategy.network, batch(step), None, step / steps)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_linear_probe_changes_only_head():
    strategy = FineTune(freeze="backbone")
    model, optimizer = build(strategy)
    before = snapshot(model)
    train_steps(strategy, optimizer)
    moved = changed(before, snapshot(model))
    assert moved == {"head.weight", "head.bias"}


def test_frozen_batchnorm_statistics_stay_fixed():
    strategy = FineTune(freeze="stem")
    model, optimizer = build(strategy)
    stem_bn = model.backbone.stem[1]
    block_bn = model.backbone.block[1]
    mean, var, count = stem_bn.running_mean.clone(), stem_bn.running_var.clone(), int(stem_bn.num_batches_tracked)
    block_mean = block_bn.running_mean.clone()
    train_steps(strategy, optimizer)
    assert not stem_bn.training
    assert torch.equal(stem_bn.running_mean, mean)
    assert torch.equal(stem_bn.running_var, var)
    assert int(stem_bn.num_batches_tracked) == count
    # The trainable stage after it does update its statistics.
    assert block_bn.training
    assert not torch.equal(block_bn.running_mean, block_mean)


def test_freeze_unknown_stage_names_valid_stages():
    with pytest.raises(ValueError, match=r"freeze='layer9'.*'stem', 'block'"):
        build(FineTune(freeze="layer9"))


def test_gradual_unfreezing_releases_stages_from_output_end():
    strategy = FineTune(freeze="backbone", unfreeze_every=1)
    model, optimizer = build(strategy)
    trainable = lambda m: all(p.requires_grad for p in m.parameters())  # noqa: E731
    frozen = lambda m: not any(p.requires_grad for p in m.parameters())  # noqa: E731

    strategy.on_epoch_start(1)
    assert frozen(model.backbone.stem)
    assert frozen(model.backbone.block)
    stem_before = snapshot(model.backbone.stem)
    train_steps(strategy, optimizer, steps=2)
    assert not changed(stem_before, snapshot(model.backbone.stem))

    strategy.on_epoch_start(2)
    assert frozen(model.backbone.stem)
    assert trainable(model.backbone.block)
    block_before = snapshot(model.backbone.block)
    train_steps(strategy, optimizer, steps=2)
    assert changed(block_before, snapshot(model.backbone.block))
    assert not changed(stem_before, snapshot(model.backbone.stem))

    strategy.on_epoch_start(3)
    assert trainable(model.backbone)
    train_steps(strategy, optimizer, steps=2)
    assert changed(stem_before, snapshot(model.backbone.stem))


def test_layer_decay_scales_learning_rates_per_stage():
    model = Classifier(TinyConvNet(), AvgPool(16), num_classes=2)
    groups = classifier_parameter_groups(model, 1e-4, True, backbone_lr_scale=0.5, layer_decay=0.5)
    scale_of = {}
    for group in groups:
        for p in group["params"]:
            scale_of[id(p)] = group["lr_scale"]
    assert scale_of[id(model.head.weight)] == 1.0
    assert scale_of[id(model.backbone.block[0].weight)] == 0.25
    assert scale_of[id(model.backbone.stem[0].weight)] == 0.125
    assert len(scale_of) == sum(1 for _ in model.parameters())


def test_no_bias_decay_groups():
    model = Classifier(TinyConvNet(), AvgPool(16), num_classes=2)
    groups = classifier_parameter_groups(model, 0.05, no_decay_norm_bias=True)
    for group in groups:
        for p in group["params"]:
            assert group["weight_decay"] == (0.05 if p.ndim >= 2 else 0.0)
    groups = classifier_parameter_groups(model, 0.05, no_decay_norm_bias=False)
    assert all(g["weight_decay"] == 0.05 for g in groups)


def test_mixup_and_label_smoothing_loss():
    strategy = FineTune(label_smoothing=0.2, mixup_alpha=0.4)
    model, optimizer = build(strategy)
    strategy.train()
    losses = strategy.train_step(strategy.network, batch(), None, 0.0)
    assert losses["loss"].requires_grad
    assert torch.isfinite(losses["loss"])
    # With uniform logits the smoothed cross-entropy is log(2) whatever the mixing.
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    losses = strategy.train_step(strategy.network, batch(), None, 0.0)
    assert float(losses["ce"]) == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-6)


@pytest.mark.parametrize("options, message", [
    ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"mixup_alpha": -1}, "mixup_alpha"),
    ({"unfreeze_every": 1}, "unfreeze_every needs freeze"),
    ({"layer_decay": 0.0}, "layer_decay"),
])
def test_invalid_options_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        FineTune(**options)
