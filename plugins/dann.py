"""The ``dann`` strategy: domain-adversarial training of the feature extractor.

"Domain-Adversarial Training of Neural Networks" (Ganin et al., JMLR 2016,
https://jmlr.org/papers/v17/15-239.html). A domain discriminator learns to tell
source from target features, and a gradient reversal layer makes the feature
extractor learn features that it cannot tell apart:

    min over features and classifier, max over discriminator:
    CE(source labels) - lambda_p * BCE(domain labels)

with ``lambda_p = 2 / (1 + exp(-gamma * p)) - 1`` rising from 0 to 1 as training
progress p goes from 0 to 1. The paper's learning-rate annealing
``mu_p = mu_0 / (1 + alpha * p) ** beta`` is the study's ``schedule: {name: dann}``.
Target labels are never read: the engine builds target batches without labels.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import medtl
from medtl.grl import GradientReverseLayer, dann_lambda
from medtl.model import Classifier
from medtl.strategy import SourceTargetNetwork, Strategy, classifier_parameter_groups, split_decay_groups

__all__ = ["DANN", "DomainDiscriminator", "DannNetwork"]

logger = logging.getLogger(__name__)


class DomainDiscriminator(nn.Sequential):
    """An MLP that maps pooled features ``(B, in_features)`` to one domain logit ``(B, 1)``.

    Args:
        in_features: feature dimension.
        hidden: width of each hidden layer (default 1024, as in the paper's
            image experiments).
        layers: number of hidden layers (default 2).
        dropout: dropout after each hidden layer (default 0.5).
    """

    def __init__(self, in_features: int, hidden: int = 1024, layers: int = 2, dropout: float = 0.5):
        if layers < 1:
            raise ValueError(f"strategy option discriminator_layers must be >= 1, got {layers}")
        blocks: list[nn.Module] = []
        width = in_features
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
            if dropout > 0:
                blocks.append(nn.Dropout(dropout))
            width = hidden
        blocks.append(nn.Linear(width, 1))
        super().__init__(*blocks)


class DannNetwork(SourceTargetNetwork):
    """The classifier plus a domain discriminator behind a gradient reversal layer.

    ``forward(source, target, coeff)`` adds ``domain_logits`` for the concatenated
    source and target features to the outputs of :class:`SourceTargetNetwork`.
    """

    def __init__(self, model: Classifier, discriminator: nn.Module):
        super().__init__(model)
        self.grl = GradientReverseLayer()
        self.discriminator = discriminator

    def forward(self, source: torch.Tensor, target: torch.Tensor | None = None,
                coeff: float = 1.0) -> dict[str, torch.Tensor]:
        out = super().forward(source, target)
        if target is not None:
            out["domain_logits"] = self.discriminator(self.grl(out["all_features"], coeff)).squeeze(1)
        return out


class DANN(Strategy):
    """Domain-adversarial training with source labels and unlabeled target images.

    Args:
        gamma: steepness of the lambda schedule (default 10, as in the paper).
        max_lambda: the value lambda approaches at the end of training (default 1).
        discriminator_width: hidden width of the domain discriminator (default 1024).
        discriminator_layers: hidden layers of the domain discriminator (default 2).
        discriminator_dropout: dropout in the discriminator (default 0.5).
        discriminator_lr_scale: learning-rate multiplier of the discriminator (default 1).
        backbone_lr_scale: learning-rate multiplier of the backbone relative to the
            head; the paper trains pretrained layers 10 times slower (default 1).
        label_smoothing: label smoothing of the source cross-entropy (default 0).
        no_bias_decay: no weight decay on biases and normalization parameters (default True).
    """

    uses_target = True

    def __init__(self, gamma: float = 10.0, max_lambda: float = 1.0, discriminator_width: int = 1024,
                 discriminator_layers: int = 2, discriminator_dropout: float = 0.5,
                 discriminator_lr_scale: float = 1.0, backbone_lr_scale: float = 1.0,
                 label_smoothing: float = 0.0, no_bias_decay: bool = True):
        super().__init__(gamma=gamma, max_lambda=max_lambda, discriminator_width=discriminator_width,
                         discriminator_layers=discriminator_layers, discriminator_dropout=discriminator_dropout,
                         discriminator_lr_scale=discriminator_lr_scale, backbone_lr_scale=backbone_lr_scale,
                         label_smoothing=label_smoothing, no_bias_decay=no_bias_decay)
        if gamma < 0:
            raise ValueError(f"strategy option gamma must be >= 0, got {gamma}")
        if max_lambda < 0:
            raise ValueError(f"strategy option max_lambda must be >= 0, got {max_lambda}")
        if discriminator_width < 1:
            raise ValueError(f"strategy option discriminator_width must be >= 1, got {discriminator_width}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"strategy option label_smoothing must be in [0, 1), got {label_smoothing}")
        self.gamma = gamma
        self.max_lambda = max_lambda
        self.discriminator_width = discriminator_width
        self.discriminator_layers = discriminator_layers
        self.discriminator_dropout = discriminator_dropout
        self.discriminator_lr_scale = discriminator_lr_scale
        self.backbone_lr_scale = backbone_lr_scale
        self.label_smoothing = label_smoothing
        self.no_bias_decay = no_bias_decay
        self._reset_epoch()

    def build_network(self, model: Classifier) -> nn.Module:
        discriminator = DomainDiscriminator(model.feature_dim, self.discriminator_width,
                                            self.discriminator_layers, self.discriminator_dropout)
        return DannNetwork(model, discriminator)

    def parameter_groups(self) -> list[dict[str, Any]]:
        wd = self.context.weight_decay
        groups = classifier_parameter_groups(self.model, wd, self.no_bias_decay, self.backbone_lr_scale)
        return groups + split_decay_groups(self.network.discriminator, wd, self.no_bias_decay,
                                           self.discriminator_lr_scale)

    def on_epoch_start(self, epoch: int) -> None:
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self._correct = 0
        self._total = 0
        self._lambda = 0.0

    def train_step(self, net: nn.Module, source: dict[str, Any], target: dict[str, Any] | None,
                   progress: float) -> dict[str, torch.Tensor]:
        if target is None:
            raise ValueError("the dann strategy needs a target batch at every step; give a site role: target")
        coeff = dann_lambda(progress, self.gamma, self.max_lambda)
        out = net(source["image"], target["image"], coeff)

        # Label classifier on source images only
        ce = F.cross_entropy(out["logits"].float(), source["label"], label_smoothing=self.label_smoothing)

        # Domain classifier: source is 1, target is 0
        domain_logits = out["domain_logits"].float()
        n_source = len(source["image"])
        domain = torch.zeros_like(domain_logits)
        domain[:n_source] = 1.0
        domain_loss = F.binary_cross_entropy_with_logits(domain_logits, domain)

        with torch.no_grad():
            self._correct += int(((domain_logits > 0).float() == domain).sum())
            self._total += len(domain)
            self._lambda = coeff
        # The reversal layer already flips and scales the discriminator's gradient in
        # the features, so the losses are simply added.
        return {"loss": ce + domain_loss, "ce": ce.detach(), "domain": domain_loss.detach()}

    def epoch_logs(self) -> dict[str, float]:
        """Return the domain-classifier accuracy and lambda of the epoch.

        An accuracy near 0.5 means the features no longer tell the domains apart;
        an accuracy stuck near 1 means the discriminator won and alignment failed.
        """
        if not self._total:
            return {}
        accuracy = self._correct / self._total
        logger.info("dann: domain accuracy %.3f, lambda %.3f", accuracy, self._lambda)
        return {"domain_accuracy": accuracy, "lambda": self._lambda}


@medtl.hookimpl
def medtl_register_strategies() -> dict[str, Callable[..., Any]]:
    return {"dann": DANN}
