"""The classifier: backbone plugin, pooling plugin, dropout and a linear head."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Classifier"]


class Classifier(nn.Module):
    """Backbone feature map -> pooling -> dropout -> linear classifier.

    Args:
        backbone: a module returning ``(B, backbone.out_channels, *spatial)``.
        pooling: a module returning ``(B, pooling.out_features)``.
        num_classes: number of output logits.
        dropout: dropout probability before the classifier.
    """

    def __init__(self, backbone: nn.Module, pooling: nn.Module, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # getattr, because nn.Module's typing says every unknown attribute is a Tensor or Module.
        self.head = nn.Linear(int(getattr(pooling, "out_features")), num_classes)
        self.num_classes = num_classes

    @property
    def feature_dim(self) -> int:
        return int(getattr(self.pooling, "out_features"))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return pooled features ``(B, feature_dim)``."""
        return self.pooling(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits, features)`` from one pass."""
        feats = self.features(x)
        return self.head(self.dropout(feats)), feats
