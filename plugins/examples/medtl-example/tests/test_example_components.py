"""Conformance of the example plugin's components, with medtl's kit."""

import pytest
import torch

from medtl.testing import check_backbone, check_pooling, check_strategy
from medtl_example import plugin
from medtl_example.entropy import EntropyMinimization
from medtl_example.networks import AttentionPooling, SmallConvNet


def test_backbone_conforms():
    check_backbone(SmallConvNet, options={"width": 4, "depth": 3}, image_size=16)


def test_pooling_conforms():
    check_pooling(AttentionPooling, options={"hidden": 8})


def test_strategy_conforms():
    check_strategy(EntropyMinimization, options={"weight": 0.5, "warmup": 0.5})


def test_hooks_register_components():
    assert set(plugin.medtl_register_backbones()) == {"example-convnet"}
    assert set(plugin.medtl_register_poolings()) == {"example-attention"}
    assert set(plugin.medtl_register_strategies()) == {"example-entropy"}


def test_attention_pooling_weights_sum_to_one():
    pooling = AttentionPooling(in_channels=3)
    constant = torch.ones(2, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    # On a constant map any convex combination of positions is the map's value.
    assert torch.allclose(pooling(constant), torch.tensor([[1.0, 2.0, 3.0]] * 2), atol=1e-6)


def test_entropy_weight_warms_up():
    strategy = EntropyMinimization(weight=1.0, warmup=0.5)
    assert strategy.entropy_weight(0.0) == 0.0
    assert strategy.entropy_weight(0.25) == pytest.approx(0.5)
    assert strategy.entropy_weight(0.9) == 1.0


def test_strategy_rejects_negative_weight():
    with pytest.raises(ValueError, match="weight"):
        EntropyMinimization(weight=-1.0)
