"""Entropy minimization on the unlabeled target site."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medtl.strategy import Strategy

__all__ = ["EntropyMinimization"]


class EntropyMinimization(Strategy):
    """Cross-entropy on source images plus the entropy of target predictions.

    From "Semi-supervised Learning by Entropy Minimization" (Grandvalet and Bengio,
    NeurIPS 2004). The loss is ``CE(source) + lambda(p) * H(target)``, where
    ``H`` is the mean Shannon entropy of the softmax over the target batch, and
    ``lambda(p)`` rises linearly from 0 to ``weight`` over the first ``warmup``
    fraction of training, because confident target predictions from an untrained
    classifier would be mostly wrong.

    Args:
        weight: entropy weight after the warmup (default 0.1).
        warmup: fraction of training over which the weight rises (default 0.2).
    """

    uses_target = True

    def __init__(self, weight: float = 0.1, warmup: float = 0.2):
        super().__init__(weight=weight, warmup=warmup)
        if weight < 0:
            raise ValueError(f"strategy option weight must be >= 0, got {weight}")
        if not 0 <= warmup <= 1:
            raise ValueError(f"strategy option warmup must be in [0, 1], got {warmup}")
        self.weight = weight
        self.warmup = warmup
        self._last_weight = 0.0

    def entropy_weight(self, progress: float) -> float:
        """Return the entropy weight at ``progress`` (0 to 1 over training)."""
        if self.warmup == 0:
            return self.weight
        return self.weight * min(1.0, progress / self.warmup)

    def train_step(self, net: nn.Module, source: dict[str, Any], target: dict[str, Any] | None,
                   progress: float) -> dict[str, torch.Tensor]:
        if target is None:
            raise ValueError("example-entropy needs target batches; give a site role: target in the study")
        n = len(source["image"])
        # One call of net for both batches, as DistributedDataParallel requires.
        logits = net(torch.cat([source["image"], target["image"]])).float()
        ce = F.cross_entropy(logits[:n], source["label"])
        probs = logits[n:].softmax(dim=1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1).mean()
        self._last_weight = self.entropy_weight(progress)
        return {"loss": ce + self._last_weight * entropy, "ce": ce.detach(), "entropy": entropy.detach()}

    def epoch_logs(self) -> dict[str, float]:
        return {"entropy_weight": self._last_weight}
