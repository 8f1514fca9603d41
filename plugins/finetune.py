"""The ``finetune`` strategy, with the training tricks of He et al. (CVPR 2019).

"Bag of Tricks for Image Classification with Convolutional Neural Networks"
(https://arxiv.org/abs/1812.01187). The tricks are options in different sections of
a study file:

- linear warmup then cosine decay: ``schedule: {name: cosine, warmup_epochs: N}``;
- label smoothing and mixup: this strategy's ``label_smoothing`` and ``mixup_alpha``;
- no weight decay on biases and normalization layers: ``no_bias_decay`` (default on);
- zero-initialized last BatchNorm gamma of each residual block: the ResNet backbone
  option ``zero_init_residual``;
- dropout before the classifier: ``model.head.dropout``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import medtl
from medtl.model import Classifier
from medtl.strategy import Strategy, StrategyContext, classifier_parameter_groups

__all__ = ["FineTune", "frozen_modules"]


def frozen_modules(model: Classifier, freeze: str) -> list[nn.Module]:
    """Return the modules that ``freeze`` keeps fixed.

    ``"none"`` freezes nothing, ``"backbone"`` freezes the whole backbone (a linear
    probe), and a stage name freezes that stage and every stage before it.
    """
    if freeze == "none":
        return []
    if freeze == "backbone":
        return [model.backbone]
    stages = list(getattr(model.backbone, "stages", []))
    if freeze not in stages:
        raise ValueError(
            f"strategy option freeze={freeze!r} is not a stage of this backbone; "
            f"use 'none', 'backbone' or one of {stages}"
        )
    frozen: list[nn.Module] = []
    for stage in stages[: stages.index(freeze) + 1]:
        frozen.extend(model.backbone.stage_modules(stage))
    return frozen


class FineTune(Strategy):
    """Supervised fine-tuning on the labeled source sites.

    Args:
        freeze: ``"none"`` (default: train everything), ``"backbone"`` (a linear
            probe: only the pooling and head train), or a backbone stage name such as
            ``"layer2"``: that stage and all before it stay frozen. Frozen layers stay
            in eval mode, so their BatchNorm running statistics do not move.
        unfreeze_every: gradual unfreezing. Every ``unfreeze_every`` epochs, the
            frozen backbone stage nearest the output starts training, until none is
            frozen. 0 (default) keeps the ``freeze`` setting for the whole run.
        label_smoothing: label-smoothing epsilon (default 0).
        mixup_alpha: Beta(alpha, alpha) parameter of mixup; 0 disables it (default 0).
        no_bias_decay: no weight decay on biases and normalization parameters (default True).
        backbone_lr_scale: learning-rate multiplier for the backbone relative to the
            pooling and head, a discriminative learning rate (default 1).
        layer_decay: layer-wise learning-rate decay. Backbone stage k, counted from
            the output end starting at 1, gets ``backbone_lr_scale * layer_decay ** k``
            (default 1: no decay).
    """

    def __init__(self, freeze: str = "none", unfreeze_every: int = 0, label_smoothing: float = 0.0,
                 mixup_alpha: float = 0.0, no_bias_decay: bool = True, backbone_lr_scale: float = 1.0,
                 layer_decay: float = 1.0):
        super().__init__(freeze=freeze, unfreeze_every=unfreeze_every, label_smoothing=label_smoothing,
                         mixup_alpha=mixup_alpha, no_bias_decay=no_bias_decay,
                         backbone_lr_scale=backbone_lr_scale, layer_decay=layer_decay)
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"strategy option label_smoothing must be in [0, 1), got {label_smoothing}")
        if mixup_alpha < 0:
            raise ValueError(f"strategy option mixup_alpha must be >= 0, got {mixup_alpha}")
        if unfreeze_every < 0:
            raise ValueError(f"strategy option unfreeze_every must be >= 0, got {unfreeze_every}")
        if unfreeze_every and freeze == "none":
            raise ValueError("strategy option unfreeze_every needs freeze set to 'backbone' or a stage name")
        if not 0 < layer_decay <= 1:
            raise ValueError(f"strategy option layer_decay must be in (0, 1], got {layer_decay}")
        if backbone_lr_scale < 0:
            raise ValueError(f"strategy option backbone_lr_scale must be >= 0, got {backbone_lr_scale}")
        self.freeze = freeze
        self.unfreeze_every = unfreeze_every
        self.label_smoothing = label_smoothing
        self.mixup_alpha = mixup_alpha
        self.no_bias_decay = no_bias_decay
        self.backbone_lr_scale = backbone_lr_scale
        self.layer_decay = layer_decay
        self._frozen: list[nn.Module] = []
        self._frozen_stages: list[str] = []

    def setup(self, model: Classifier, context: StrategyContext) -> None:
        super().setup(model, context)
        self._frozen = frozen_modules(model, self.freeze)
        stages = list(getattr(model.backbone, "stages", []))
        if self.freeze == "backbone":
            self._frozen_stages = stages
        elif self.freeze != "none":
            self._frozen_stages = stages[: stages.index(self.freeze) + 1]
        if self.unfreeze_every and not self._frozen_stages:
            raise ValueError("strategy option unfreeze_every needs a backbone that declares its stages")
        self._set_frozen(self._frozen)

    def _set_frozen(self, modules: list[nn.Module]) -> None:
        self._frozen = modules
        frozen_ids = {id(p) for m in modules for p in m.parameters()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) not in frozen_ids)

    def on_epoch_start(self, epoch: int) -> None:
        if not self.unfreeze_every or not self._frozen_stages:
            return
        released = (epoch - 1) // self.unfreeze_every
        keep = self._frozen_stages[: max(0, len(self._frozen_stages) - released)]
        if self.freeze == "backbone" and len(keep) == len(self._frozen_stages):
            modules = [self.model.backbone]
        else:
            modules = [m for stage in keep for m in self.model.backbone.stage_modules(stage)]
        if len(modules) != len(self._frozen) or any(a is not b for a, b in zip(modules, self._frozen)):
            self._set_frozen(modules)

    def train(self) -> None:
        super().train()
        # Frozen layers stay in eval mode so their BatchNorm running statistics do not move.
        for module in self._frozen:
            module.eval()

    def parameter_groups(self) -> list[dict[str, Any]]:
        if self.unfreeze_every:
            # Every parameter enters the optimizer now. A frozen one has no gradient,
            # and SGD, Adam and AdamW skip parameters without a gradient.
            for p in self.model.parameters():
                p.requires_grad_(True)
            groups = self._groups()
            self._set_frozen(self._frozen)
            return groups
        return self._groups()

    def _groups(self) -> list[dict[str, Any]]:
        return classifier_parameter_groups(self.model, self.context.weight_decay, self.no_bias_decay,
                                           self.backbone_lr_scale, self.layer_decay)

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

    def epoch_logs(self) -> dict[str, float]:
        if not self.unfreeze_every:
            return {}
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"trainable_parameters": float(trainable)}


@medtl.hookimpl
def medtl_register_strategies() -> dict[str, Callable[..., Any]]:
    return {"finetune": FineTune}
