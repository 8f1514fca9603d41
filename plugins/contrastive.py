"""The ``contrastive`` strategy: supervised contrastive and SimCLR representation learning.

- Supervised contrastive loss, the L_out form of "Supervised Contrastive Learning"
  (Khosla et al., NeurIPS 2020, https://arxiv.org/abs/2004.11362), over the
  labeled source images: the views of images with the same label are pulled together.
- NT-Xent loss of "A Simple Framework for Contrastive Learning of Visual
  Representations" (Chen et al., ICML 2020, https://arxiv.org/abs/2002.05709) over
  all images of a step with their labels ignored, so unlabeled target-site images
  shape the features too.

Both losses compare two augmented views of every image, made inside the strategy
from the batch tensor with MONAI array transforms, after a projection head and
with a temperature. The classifier head trains at the same time on detached
features, an online linear probe that makes checkpoint selection and evaluation
meaningful without changing the representation. The usual use is a pretraining
stage whose backbone weights a later ``finetune`` or ``dann`` stage starts from.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import medtl
from medtl.distributed import all_gather_with_grad
from medtl.model import Classifier
from medtl.strategy import Strategy, StrategyContext, split_decay_groups

__all__ = ["supcon_loss", "nt_xent_loss", "ProjectionHead", "ContrastiveNetwork", "Contrastive", "view_transforms"]


def supcon_loss(projections: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Return the supervised contrastive loss (L_out) of L2-normalized projections.

    Args:
        projections: ``(2N, d)``, view 1 of all N images followed by view 2.
        labels: ``(N,)`` integer labels of the images.
        temperature: softmax temperature tau.

    Every view is an anchor. Its positives are all other views with the same label,
    including the other view of its own image. Its denominator runs over all views
    but itself. Anchors are averaged.
    """
    z = F.normalize(projections.float(), dim=1)
    y = torch.cat([labels, labels])
    n = len(z)
    logits = z @ z.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, -math.inf)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (y[:, None] == y[None, :]) & ~self_mask
    # Every anchor has at least its own second view as a positive.
    mean_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1) / positives.sum(1)
    return -mean_log_prob.mean()


def nt_xent_loss(projections: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Return SimCLR's NT-Xent loss of ``(2N, d)`` projections, view 1 of all images then view 2.

    The positive of view i is the other view of the same image; the other 2N - 2
    views are its negatives.
    """
    z = F.normalize(projections.float(), dim=1)
    n = len(z) // 2
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -math.inf)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, partner)


class ProjectionHead(nn.Sequential):
    """The MLP projection head g(.): Linear, BatchNorm, ReLU, Linear."""

    def __init__(self, in_features: int, hidden: int = 512, out_features: int = 128):
        super().__init__(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out_features))


class ContrastiveNetwork(nn.Module):
    """The classifier plus a projection head, run once over all views of a step.

    Returns ``projections`` of the features and ``logits`` of the classifier head on
    detached features, so the head learns as a linear probe.
    """

    def __init__(self, model: Classifier, projector: nn.Module):
        super().__init__()
        self.model = model
        self.projector = projector

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.model.features(x)
        logits = self.model.head(self.model.dropout(features.detach()))
        return {"features": features, "projections": self.projector(features), "logits": logits}


def view_transforms(spatial_shape: tuple[int, ...], rotate_degrees: float = 15.0, scale: float = 0.15,
                    translate: float = 0.1, flip: bool = True, contrast_gamma: tuple[float, float] = (0.7, 1.5),
                    noise_std: float = 0.05, blur_prob: float = 0.3) -> Any:
    """Build the MONAI array transforms that turn one ``(C, *spatial_shape)`` image into a random view.

    ``translate`` is a fraction of the image size, ``noise_std`` is in the units of
    the preprocessed intensities, and ``contrast_gamma`` is the range of the gamma
    of a random contrast change.
    """
    from monai.transforms import (Compose, RandAdjustContrast, RandAffine, RandFlip, RandGaussianNoise,
                                  RandGaussianSmooth)

    dims = len(spatial_shape)
    angle = math.radians(rotate_degrees)
    transforms: list[Any] = [
        RandAffine(prob=1.0, rotate_range=(angle,) if dims == 2 else (angle,) * 3,
                   scale_range=(scale,) * dims, translate_range=[translate * s for s in spatial_shape],
                   padding_mode="border"),
    ]
    if flip:
        transforms.append(RandFlip(prob=0.5, spatial_axis=dims - 1))
    if contrast_gamma:
        transforms.append(RandAdjustContrast(prob=0.8, gamma=tuple(contrast_gamma)))
    if blur_prob > 0:
        transforms.append(RandGaussianSmooth(prob=blur_prob, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0),
                                             sigma_z=(0.25, 1.0)))
    if noise_std > 0:
        transforms.append(RandGaussianNoise(prob=0.5, std=noise_std))
    return Compose(transforms)


def _plain(image: Any) -> torch.Tensor:
    """Return a transform's output as a plain tensor, without MONAI's metadata."""
    from monai.utils import convert_to_tensor

    return convert_to_tensor(image, track_meta=False)


class Contrastive(Strategy):
    """Contrastive representation learning with an online linear probe.

    Args:
        supcon_weight: weight of the supervised contrastive loss over labeled
            source images (default 1).
        simclr_weight: weight of the NT-Xent loss over all images of a step, target
            images included (default 1). With a positive weight the strategy requests
            target batches from the engine.
        temperature: temperature of the supervised contrastive loss (default 0.1).
        simclr_temperature: temperature of NT-Xent (default 0.5).
        projection_dim: output size of the projection head (default 128).
        projection_hidden: hidden size of the projection head (default 512).
        views: options of :func:`view_transforms` for the two views (rotate_degrees,
            scale, translate, flip, contrast_gamma, noise_std, blur_prob).
        probe_weight: weight of the linear-probe cross-entropy on detached
            features (default 1); it does not change the backbone.
    """

    def __init__(self, supcon_weight: float = 1.0, simclr_weight: float = 1.0, temperature: float = 0.1,
                 simclr_temperature: float = 0.5, projection_dim: int = 128, projection_hidden: int = 512,
                 views: dict[str, Any] | None = None, probe_weight: float = 1.0):
        super().__init__(supcon_weight=supcon_weight, simclr_weight=simclr_weight, temperature=temperature,
                         simclr_temperature=simclr_temperature, projection_dim=projection_dim,
                         projection_hidden=projection_hidden, views=views or {}, probe_weight=probe_weight)
        if supcon_weight < 0 or simclr_weight < 0 or supcon_weight + simclr_weight == 0:
            raise ValueError("strategy options supcon_weight and simclr_weight must be >= 0, and one of them > 0; "
                             f"got {supcon_weight} and {simclr_weight}")
        for key, value in (("temperature", temperature), ("simclr_temperature", simclr_temperature)):
            if value <= 0:
                raise ValueError(f"strategy option {key} must be > 0, got {value}")
        self.supcon_weight = supcon_weight
        self.simclr_weight = simclr_weight
        self.temperature = temperature
        self.simclr_temperature = simclr_temperature
        self.projection_dim = projection_dim
        self.projection_hidden = projection_hidden
        self.view_options = dict(views or {})
        self.probe_weight = probe_weight
        self.uses_target = simclr_weight > 0

    def setup(self, model: Classifier, context: StrategyContext) -> None:
        super().setup(model, context)
        # The view transforms are built on the first batch, when the image size is
        # known, and seeded from NumPy's global generator, which the engine seeds.
        self._seed = int(np.random.randint(0, 2**31 - 1))
        self._views: Any = None
        self._views_shape: tuple[int, ...] = ()

    def build_network(self, model: Classifier) -> nn.Module:
        return ContrastiveNetwork(model, ProjectionHead(model.feature_dim, self.projection_hidden,
                                                        self.projection_dim))

    def parameter_groups(self) -> list[dict[str, Any]]:
        return split_decay_groups(self.network, self.context.weight_decay, True)

    @torch.no_grad()
    def views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return two independently augmented views of a ``(B, C, *spatial)`` batch."""
        shape = tuple(images.shape[2:])
        if self._views is None or shape != self._views_shape:
            try:
                self._views = view_transforms(shape, **self.view_options)
            except TypeError as exc:
                raise ValueError(f"invalid strategy option views: {exc}") from None
            self._views.set_random_state(seed=self._seed)
            self._views_shape = shape
        first = torch.stack([_plain(self._views(img)) for img in images])
        second = torch.stack([_plain(self._views(img)) for img in images])
        return first.to(images), second.to(images)

    def train_step(self, net: nn.Module, source: dict[str, Any], target: dict[str, Any] | None,
                   progress: float) -> dict[str, torch.Tensor]:
        images = source["image"]
        n_source = len(images)
        if target is not None:
            images = torch.cat([images, target["image"]])
        first, second = self.views(images)
        n = len(images)
        out = net(torch.cat([first, second]))
        projections = out["projections"]
        losses: dict[str, torch.Tensor] = {}
        total = projections.new_zeros(())

        # Under DDP the views of every process are gathered, so that negatives come
        # from the global batch; in a single process the gathers return their input.
        # Supervised contrastive loss over the labeled source views
        if self.supcon_weight > 0:
            labeled = torch.cat([all_gather_with_grad(projections[:n_source]),
                                 all_gather_with_grad(projections[n:n + n_source])])
            supcon = supcon_loss(labeled, all_gather_with_grad(source["label"]), self.temperature)
            total = total + self.supcon_weight * supcon
            losses["supcon"] = supcon.detach()

        # NT-Xent over every image of the step, labels ignored
        if self.simclr_weight > 0:
            gathered = torch.cat([all_gather_with_grad(projections[:n]), all_gather_with_grad(projections[n:])])
            simclr = nt_xent_loss(gathered, self.simclr_temperature)
            total = total + self.simclr_weight * simclr
            losses["nt_xent"] = simclr.detach()

        # Online linear probe on the first view of the labeled images
        if self.probe_weight > 0:
            probe = F.cross_entropy(out["logits"][:n_source].float(), source["label"])
            total = total + self.probe_weight * probe
            losses["probe"] = probe.detach()
        return {"loss": total, **losses}


@medtl.hookimpl
def medtl_register_strategies() -> dict[str, Callable[..., Any]]:
    return {"contrastive": Contrastive}
