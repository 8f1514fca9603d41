"""A small ConvNet backbone and attention pooling, for 2D and 3D images."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallConvNet", "AttentionPooling"]


class SmallConvNet(nn.Module):
    """A plain ConvNet: ``depth`` stages of 3x3 convolution, BatchNorm and ReLU.

    Every stage after the first halves the resolution and doubles the width, so the
    feature map has ``width * 2 ** (depth - 1)`` channels.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        width: channels of the first stage (default 16).
        depth: number of stages (default 3).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, width: int = 16, depth: int = 3):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if width < 1 or depth < 1:
            raise ValueError(f"backbone options width and depth must be at least 1, got {width} and {depth}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        channels = in_channels
        self.stages: list[str] = []
        for index in range(depth):
            out = width * 2**index
            stride = 1 if index == 0 else 2
            stage = nn.Sequential(conv(channels, out, 3, stride=stride, padding=1, bias=False), norm(out), nn.ReLU())
            self.add_module(f"stage{index + 1}", stage)
            self.stages.append(f"stage{index + 1}")
            channels = out
        self.out_channels = channels

    def stage_modules(self, stage: str) -> list[nn.Module]:
        if stage not in self.stages:
            raise ValueError(f"unknown stage {stage!r}; the stages are {self.stages}")
        return [getattr(self, stage)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = getattr(self, stage)(x)
        return x


class AttentionPooling(nn.Module):
    """Attention pooling: a weighted mean of the positions, with learned weights.

    From "Attention-based Deep Multiple Instance Learning" (Ilse, Tomczak and
    Welling, ICML 2018, https://arxiv.org/abs/1802.04712). Each spatial position's
    feature vector ``h_k`` gets the score ``w^T tanh(V h_k)``; the softmax of the
    scores over all positions weights the mean. The output has ``in_channels``
    features.

    Args:
        in_channels: channels of the feature map.
        hidden: size of the attention layer (default 32).
    """

    def __init__(self, in_channels: int, hidden: int = 32):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"pooling option hidden must be at least 1, got {hidden}")
        self.in_channels = self.out_features = in_channels
        self.score = nn.Sequential(nn.Linear(in_channels, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = x.flatten(2).transpose(1, 2)  # (B, positions, C)
        weights = torch.softmax(self.score(positions).squeeze(-1), dim=1)
        return torch.einsum("bp,bpc->bc", weights, positions)
