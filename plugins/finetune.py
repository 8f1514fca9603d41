"""The ``finetune`` strategy, with the training tricks of He et al. (CVPR 2019).

"Bag of Tricks for Image Classification with Convolutional Neural Networks"
(https://arxiv.org/abs/1812.01187). Warmup and cosine decay are set by the study's
``schedule`` section; zero-initialized residual gammas are a backbone option
(``zero_init_residual``); dropout before the classifier is ``model.head.dropout``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import medtl
from medtl.model import Classifier
from medtl.strategy import Strategy, StrategyContext, split_decay_groups

__all__ = ["FineTune"]


class FineTune(Strategy):
    """Supervised fine-tuning on the labeled source sites.

    Args:
        freeze: ``"none"`` (train everything), ``"backbone"`` (a linear probe: only the
            pooling and head train), or a backbone stage name such as ``"layer2"``:
            that stage and all before it stay frozen.
        label_smoothing: label-smoothing epsilon (default 0).
        mixup_alpha: Beta(alpha, alpha) parameter of mixup; 0 disables it (default 0).
        no_bias_decay: no weight decay on biases and normalization parameters (default True).
        backbone_lr_scale: learning-rate multiplier for the backbone relative to the head,
            a simple discriminative learning rate (default 1).
    """

    def __init__(self, freeze: str = "none", label_smoothing: float = 0.0, mixup_alpha: float = 0.0,
                 no_bias_decay: bool = True, backbone_lr_scale: float = 1.0):
        super().__init__(freeze=freeze, label_smoothing=label_smoothing, mixup_alpha=mixup_alpha,
                         no_bias_decay=no_bias_decay, backbone_lr_scale=backbone_lr_scale)
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"strategy option label_smoothing must be in [0, 1), got {label_smoothing}")
        if mixup_alpha < 0:
            raise ValueError(f"strategy option mixup_alpha must be >= 0, got {mixup_alpha}")
        self.freeze = freeze
        self.label_smoothing = label_smoothing
        self.mixup_alpha = mixup_alpha
        self.no_bias_decay = no_bias_decay
        self.backbone_lr_scale = backbone_lr_scale
        self._frozen: list[nn.Module] = []

    def setup(self, model: Classifier, context: StrategyContext) -> None:
        super().setup(model, context)
        self._frozen = self._frozen_modules(model)
        for module in self._frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def _frozen_modules(self, model: Classifier) -> list[nn.Module]:
        if self.freeze == "none":
            return []
        if self.freeze == "backbone":
            return [model.backbone]
        stages = list(getattr(model.backbone, "stages", []))
        if self.freeze not in stages:
            raise ValueError(
                f"strategy option freeze={self.freeze!r} is not a stage of this backbone; "
                f"use 'none', 'backbone' or one of {stages}"
            )
        frozen: list[nn.Module] = []
        for stage in stages[: stages.index(self.freeze) + 1]:
            frozen.extend(model.backbone.stage_modules(stage))
        return frozen

    def train(self) -> None:
        super().train()
        # Frozen layers stay in eval mode so their BatchNorm running statistics do not move.
        for module in self._frozen:
            module.eval()

    def parameter_groups(self) -> list[dict[str, Any]]:
        wd = self.context.weight_decay
        groups = split_decay_groups(self.model.backbone, wd, self.no_bias_decay, self.backbone_lr_scale)
        rest = nn.ModuleList([self.model.pooling, self.model.head])
        return groups + split_decay_groups(rest, wd, self.no_bias_decay)

    def train_step(self, net: nn.Module, source: dict[str, Any], target: dict[str, Any] | None,
                   progress: float) -> dict[str, torch.Tensor]:
        x, y = source["image"], source["label"]
        if self.mixup_alpha > 0 and len(x) > 1:
            lam = float(np.random.beta(self.mixup_alpha, self.mixup_alpha))
            perm = torch.randperm(len(x), device=x.device)
            logits = net(lam * x + (1 - lam) * x[perm])
            loss = lam * self._ce(logits, y) + (1 - lam) * self._ce(logits, y[perm])
        else:
            logits = net(x)
            loss = self._ce(logits, y)
        return {"loss": loss, "ce": loss.detach()}

    def _ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)


@medtl.hookimpl
def medtl_register_strategies() -> dict[str, Callable[..., Any]]:
    return {"finetune": FineTune}
