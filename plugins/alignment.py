"""Statistic-alignment strategies: ``coral`` (Deep CORAL) and ``mmd`` (multi-kernel MMD).

Both add a distance between the source and target feature distributions to the
source cross-entropy, on the pooled features of one joint forward pass:

- Deep CORAL ("Deep CORAL: Correlation Alignment for Deep Domain Adaptation",
  Sun and Saenko, ECCV 2016 workshops, https://arxiv.org/abs/1607.01719):
  ``||C_s - C_t||_F^2 / (4 d^2)`` between the feature covariances.
- Multi-kernel MMD ("Learning Transferable Features with Deep Adaptation Networks",
  Long et al., ICML 2015, https://arxiv.org/abs/1502.02791): the squared maximum mean
  discrepancy under a sum of Gaussian kernels whose bandwidths are powers of 2
  around the mean pairwise squared distance of the batch.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import medtl
from medtl.grl import dann_lambda
from medtl.model import Classifier
from medtl.strategy import SourceTargetNetwork, Strategy, classifier_parameter_groups

__all__ = ["coral_loss", "mk_mmd_loss", "AlignmentStrategy", "Coral", "MultiKernelMMD"]


def coral_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return the CORAL distance ``||C_s - C_t||_F^2 / (4 d^2)`` of two ``(n, d)`` feature batches."""
    d = source.shape[1]
    cs = torch.cov(source.float().T)
    ct = torch.cov(target.float().T)
    return (cs - ct).pow(2).sum() / (4.0 * d * d)


def mk_mmd_loss(source: torch.Tensor, target: torch.Tensor,
                kernel_scales: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> torch.Tensor:
    """Return the biased squared MMD of two ``(n, d)`` batches under a sum of Gaussian kernels.

    Kernel k has bandwidth ``sigma_k^2 = scale_k * mean pairwise squared distance``,
    the distance computed over both batches without gradient, so the bandwidths
    follow the features as they change.
    """
    x = torch.cat([source, target]).float()
    n = len(source)
    sq_dist = torch.cdist(x, x).pow(2)
    base = sq_dist.detach().sum() / max(1, len(x) * (len(x) - 1))
    base = base.clamp(min=1e-8)
    kernel = sum(torch.exp(-sq_dist / (scale * base)) for scale in kernel_scales)
    k_ss = kernel[:n, :n].mean()
    k_tt = kernel[n:, n:].mean()
    k_st = kernel[:n, n:].mean()
    return k_ss + k_tt - 2 * k_st


class AlignmentStrategy(Strategy):
    """Source cross-entropy plus ``weight * distance(source features, target features)``.

    Args:
        weight: the trade-off of the alignment term (default 1).
        ramp: multiply ``weight`` by the DANN schedule ``2 / (1 + exp(-10 p)) - 1``,
            so alignment starts at 0 while the features are still noisy (default False).
        backbone_lr_scale: learning-rate multiplier of the backbone (default 1).
        label_smoothing: label smoothing of the source cross-entropy (default 0).
        no_bias_decay: no weight decay on biases and normalization parameters (default True).
    """

    uses_target = True
    #: the name of the alignment term in the logged losses
    loss_name = "alignment"

    def __init__(self, weight: float = 1.0, ramp: bool = False, backbone_lr_scale: float = 1.0,
                 label_smoothing: float = 0.0, no_bias_decay: bool = True, **options: Any):
        super().__init__(weight=weight, ramp=ramp, backbone_lr_scale=backbone_lr_scale,
                         label_smoothing=label_smoothing, no_bias_decay=no_bias_decay, **options)
        if weight < 0:
            raise ValueError(f"strategy option weight must be >= 0, got {weight}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"strategy option label_smoothing must be in [0, 1), got {label_smoothing}")
        self.weight = weight
        self.ramp = ramp
        self.backbone_lr_scale = backbone_lr_scale
        self.label_smoothing = label_smoothing
        self.no_bias_decay = no_bias_decay

    def build_network(self, model: Classifier) -> nn.Module:
        return SourceTargetNetwork(model)

    def parameter_groups(self) -> list[dict[str, Any]]:
        return classifier_parameter_groups(self.model, self.context.weight_decay, self.no_bias_decay,
                                           self.backbone_lr_scale)

    def distance(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement distance")

    def train_step(self, net: nn.Module, source: dict[str, Any], target: dict[str, Any] | None,
                   progress: float) -> dict[str, torch.Tensor]:
        if target is None:
            raise ValueError(f"the {self.loss_name} strategy needs a target batch; give a site role: target")
        out = net(source["image"], target["image"])
        ce = F.cross_entropy(out["logits"].float(), source["label"], label_smoothing=self.label_smoothing)
        distance = self.distance(out["features"], out["target_features"])
        weight = self.weight * (dann_lambda(progress) if self.ramp else 1.0)
        return {"loss": ce + weight * distance, "ce": ce.detach(), self.loss_name: distance.detach()}


class Coral(AlignmentStrategy):
    """Deep CORAL: align second-order statistics of source and target features."""

    loss_name = "coral"

    def distance(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return coral_loss(source, target)


class MultiKernelMMD(AlignmentStrategy):
    """DAN-style alignment with the multi-kernel maximum mean discrepancy.

    Args:
        kernel_scales: bandwidth multipliers of the Gaussian kernels (default
            0.25, 0.5, 1, 2 and 4), relative to the batch's mean squared distance.
        **options: the options of :class:`AlignmentStrategy`.
    """

    loss_name = "mmd"

    def __init__(self, kernel_scales: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0), **options: Any):
        super().__init__(kernel_scales=list(kernel_scales), **options)
        if not kernel_scales or any(s <= 0 for s in kernel_scales):
            raise ValueError(f"strategy option kernel_scales must be positive numbers, got {kernel_scales}")
        self.kernel_scales = tuple(float(s) for s in kernel_scales)

    def distance(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mk_mmd_loss(source, target, self.kernel_scales)


@medtl.hookimpl
def medtl_register_strategies() -> dict[str, Callable[..., Any]]:
    return {"coral": Coral, "mmd": MultiKernelMMD}
