"""Every builtin backbone with every pooling, in 2D and 3D, batch size 1 included."""

from __future__ import annotations

import pytest
import torch

import medtl
from medtl.model import Classifier

BACKBONES = {
    "resnet10": {},
    "resnet18": {},
    "resnet34": {},
    "resnet50": {},
    "densenet121": {},
    "efficientnet-b0": {},
    "efficientnet-lite0": {"pretrained": False},
}
POOLINGS = {"avg": {}, "max": {}, "gem": {}, "isqrt-cov": {"dim": 8}, "mpn-cov-eig": {"dim": 8}}
# Stride-32 backbones leave a 1x1 (1x1x1) map, enough for shapes and cheap on a CPU.
INPUT_SIZE = {2: (32, 32), 3: (32, 32, 32)}


@pytest.fixture(scope="module")
def feature_maps() -> dict[tuple[str, int], tuple[int, torch.Tensor]]:
    """Each backbone's declared channels and its map of one 2-channel image, in eval mode."""
    torch.manual_seed(0)
    maps = {}
    for name, options in BACKBONES.items():
        for dims, size in INPUT_SIZE.items():
            backbone = medtl.create("backbone", name, spatial_dims=dims, in_channels=2, **options).eval()
            with torch.no_grad():
                maps[name, dims] = (int(backbone.out_channels), backbone(torch.randn(1, 2, *size)))
    return maps


def test_all_builtins_registered():
    assert set(BACKBONES) <= set(medtl.components("backbone"))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_feature_map_has_declared_channels(feature_maps, name: str, dims: int):
    channels, fmap = feature_maps[name, dims]
    assert fmap.shape[:2] == (1, channels)
    assert fmap.dim() == dims + 2


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("pooling", sorted(POOLINGS))
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_pooling_on_backbone(feature_maps, name: str, pooling: str, dims: int):
    channels, fmap = feature_maps[name, dims]
    pool = medtl.create("pooling", pooling, in_channels=channels, **POOLINGS[pooling]).eval()
    with torch.no_grad():
        out = pool(fmap)
    assert out.shape == (1, pool.out_features)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet10", "efficientnet-lite0"])
def test_classifier_trains_one_step(name: str):
    backbone = medtl.create("backbone", name, spatial_dims=2, in_channels=1, **BACKBONES[name])
    pool = medtl.create("pooling", "isqrt-cov", in_channels=backbone.out_channels, dim=8)
    model = Classifier(backbone, pool, num_classes=3, dropout=0.2)
    logits = model(torch.randn(2, 1, 64, 64))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    assert logits.shape == (2, 3)
    assert all(p.grad is not None for p in model.head.parameters())


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_stages_cover_modules(name: str):
    backbone = medtl.create("backbone", name, spatial_dims=2, in_channels=1, **BACKBONES[name])
    for stage in backbone.stages:
        modules = backbone.stage_modules(stage)
        assert modules, stage
        assert all(isinstance(m, torch.nn.Module) for m in modules)


def test_resnet_shortcut_type_a_has_no_shortcut_weights():
    backbone = medtl.create("backbone", "resnet18", spatial_dims=3, in_channels=1, shortcut_type="A")
    assert not any("downsample" in key for key in backbone.state_dict())


def test_lite0_pretrained_rejects_3d():
    with pytest.raises(ValueError, match="2D"):
        medtl.create("backbone", "efficientnet-lite0", spatial_dims=3, in_channels=1, pretrained=True)
