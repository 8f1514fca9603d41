"""The strategy interface: how a model learns from source and target batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from medtl.model import Classifier

__all__ = ["Strategy", "StrategyContext", "SourceTargetNetwork", "split_decay_groups", "classifier_parameter_groups"]


@dataclass
class StrategyContext:
    """Run facts that a strategy receives when it is set up."""

    num_classes: int
    epochs: int
    steps_per_epoch: int
    weight_decay: float
    lr: float
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    target_sites: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Strategy:
    """Base class of adaptation strategies.

    A strategy owns the training network, builds the optimizer's parameter groups,
    turns one source batch (and one target batch, when ``uses_target`` is true)
    into named losses, and predicts. It never touches data loading.

    The engine calls, in order: ``setup(model, context)``, then per epoch
    ``on_epoch_start(epoch)`` and per step ``train_step(net, source, target,
    progress)``. ``net`` is ``self.network`` or its DistributedDataParallel wrapper,
    so ``train_step`` must call ``net`` exactly once per step and do every forward
    pass that needs gradients through that call.

    Batches are dicts with ``"image"`` (a tensor), ``"label"`` (a long tensor; absent
    from target batches) and ``"site"``. ``progress`` runs from 0 to 1 over training.
    """

    #: whether train_step wants unlabeled target-site batches
    uses_target: bool = False

    def __init__(self, **options: Any):
        self.options = options

    # -- setup ----------------------------------------------------------------

    def setup(self, model: Classifier, context: StrategyContext) -> None:
        """Store the model and build ``self.network``, the module the engine trains."""
        self.model = model
        self.context = context
        self.network = self.build_network(model)

    def build_network(self, model: Classifier) -> nn.Module:
        """Return the module trained by the engine; extra modules hang off it."""
        return model

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Return optimizer parameter groups; the default splits off no-decay parameters."""
        return split_decay_groups(self.network, self.context.weight_decay, no_decay_norm_bias=True)

    def on_epoch_start(self, epoch: int) -> None:
        """Hook for schedules that change per epoch (gradual unfreezing, say). ``epoch`` counts from 1."""

    def train(self) -> None:
        self.network.train()

    def eval(self) -> None:
        self.network.eval()

    # -- work -----------------------------------------------------------------

    def train_step(self, net: nn.Module, source: dict[str, Any], target: dict[str, Any] | None,
                   progress: float) -> dict[str, torch.Tensor]:
        """Compute the losses of one step; ``"loss"`` is the total that is back-propagated."""
        raise NotImplementedError(f"{type(self).__name__} must implement train_step")

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of images."""
        return self.model(x)

    @torch.no_grad()
    def predict_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits, pooled features)``."""
        return self.model.forward_with_features(x)

    def epoch_logs(self) -> dict[str, float]:
        """Return extra values to log at the end of an epoch (for example DANN's lambda)."""
        return {}

    # -- state ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"network": self.network.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])


def split_decay_groups(module: nn.Module, weight_decay: float, no_decay_norm_bias: bool = True,
                       lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and a group without weight decay.

    With ``no_decay_norm_bias``, biases and the affine parameters of normalization
    layers (every parameter with fewer than 2 dimensions) get no weight decay, as in
    "Bag of Tricks for Image Classification" (He et al., CVPR 2019).
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if no_decay_norm_bias and param.ndim < 2 else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale})
    return groups


def classifier_parameter_groups(model: Classifier, weight_decay: float, no_decay_norm_bias: bool = True,
                                backbone_lr_scale: float = 1.0, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """Build parameter groups with discriminative learning rates for a :class:`Classifier`.

    The pooling and head train at the base learning rate. The backbone gets
    ``backbone_lr_scale`` times that. With ``layer_decay`` below 1, each backbone stage
    is scaled once more by ``layer_decay ** k``, where k counts stages from the output
    end (the last stage has k = 1), so layers near the input move least. Parameters
    that belong to no declared stage get the smallest scale.
    """
    groups: list[dict[str, Any]] = []
    backbone = model.backbone
    stages = list(getattr(backbone, "stages", []))
    if layer_decay != 1.0 and stages:
        seen: set[int] = set()
        for depth, stage in enumerate(reversed(stages), start=1):
            modules = nn.ModuleList(backbone.stage_modules(stage))  # type: ignore[operator]
            scale = backbone_lr_scale * layer_decay**depth
            groups += split_decay_groups(modules, weight_decay, no_decay_norm_bias, scale)
            seen.update(id(p) for p in modules.parameters())
        rest = [p for p in backbone.parameters() if id(p) not in seen]
        if rest:
            holder = nn.ParameterList(rest)
            groups += split_decay_groups(holder, weight_decay, no_decay_norm_bias,
                                         backbone_lr_scale * layer_decay ** (len(stages) + 1))
    else:
        groups += split_decay_groups(backbone, weight_decay, no_decay_norm_bias, backbone_lr_scale)
    rest_modules = nn.ModuleList([model.pooling, model.head])
    return groups + split_decay_groups(rest_modules, weight_decay, no_decay_norm_bias)


class SourceTargetNetwork(nn.Module):
    """Run a classifier once over a source batch and an optional target batch.

    The two batches are concatenated, so BatchNorm layers normalize them together and
    a DistributedDataParallel wrapper sees one forward call per step. Extra modules
    (a domain discriminator, a projection head) are registered as attributes by
    subclasses so that they train and checkpoint with the classifier.

    Returns a dict with ``logits`` and ``features`` of the source batch and, when a
    target batch is given, ``target_logits`` and ``target_features``.
    """

    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, source: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        n = len(source)
        x = source if target is None else torch.cat([source, target])
        logits, features = self.model.forward_with_features(x)
        out = {"logits": logits[:n], "features": features[:n], "all_features": features}
        if target is not None:
            out["target_logits"] = logits[n:]
            out["target_features"] = features[n:]
        return out
