"""Label-free checkpoint selection on the target sites, and the oracle it is compared with.

With ``train.select: NAME``, the engine scores every epoch's model with the
validator plugin NAME on the target sites' validation images, labels ignored,
and keeps the best-scoring checkpoint as ``best.pt``. The target labels of the
same images serve only to report which epoch an oracle with target labels would
have chosen. They never influence training or selection.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from medtl.errors import ConfigError
from medtl.evaluation import predict_items

__all__ = ["SelectionOutputs", "TargetSelection"]

logger = logging.getLogger(__name__)


@dataclass
class SelectionOutputs:
    """The predictions and pooled features of one checkpoint that a validator scores.

    ``target_*`` come from unlabeled target-site images and ``source_*`` from the
    labeled source validation images.
    """

    target_probs: np.ndarray
    target_features: np.ndarray
    source_probs: np.ndarray
    source_features: np.ndarray
    source_labels: np.ndarray


class TargetSelection:
    """Score each epoch with a validator and record the target-label oracle next to it.

    Args:
        validator: an object with ``score(outputs) -> float``, higher is better.
        name: the validator's name, for logs and metrics.
        target_loader: loader over target-site validation images.
        source_loader: loader over labeled source validation images.
        auc: the metric function ``auc(labels, probs)`` for the oracle.
    """

    def __init__(self, validator: Any, name: str, target_loader: Any, source_loader: Any, auc: Any):
        self.validator = validator
        self.name = name
        self.target_loader = target_loader
        self.source_loader = source_loader
        self.auc = auc
        self.scores: dict[int, float] = {}
        self.oracle: dict[int, float | None] = {}

    def score_epoch(self, epoch: int, strategy: Any, device: Any, autocast: Any = None) -> float:
        """Score the strategy's current model; return the validator's score."""
        target = predict_items(strategy, self.target_loader, device, autocast, with_features=True)
        source = predict_items(strategy, self.source_loader, device, autocast, with_features=True)
        outputs = SelectionOutputs(target["probs"], target["features"], source["probs"], source["features"],
                                   source["label"])
        score = float(self.validator.score(outputs))
        if not math.isfinite(score):
            logger.warning("validator %s returned %s at epoch %d; this epoch cannot be selected",
                           self.name, score, epoch)
            score = -math.inf
        self.scores[epoch] = score

        # Oracle: the same images with their labels, recorded for the report only
        labels = target["label"]
        known = labels >= 0
        value = None
        if known.any() and len(set(labels[known].tolist())) > 1:
            value = self.auc(labels[known], target["probs"][known])
        self.oracle[epoch] = None if value is None else float(value)
        return score

    def summary(self, selected_epoch: int, source_val_epoch: int) -> dict[str, Any]:
        """Return the validator's choice next to the oracle's and the source-validation choice."""
        known = {e: v for e, v in self.oracle.items() if v is not None}
        oracle_epoch = max(known, key=lambda e: known[e]) if known else None
        return {
            "validator": self.name,
            "scores": {str(e): s for e, s in self.scores.items()},
            "target_val_auc": {str(e): v for e, v in self.oracle.items()},
            "epochs": {"validator": selected_epoch, "oracle": oracle_epoch, "source_val": source_val_epoch},
            "target_val_auc_at": {
                "validator": self.oracle.get(selected_epoch),
                "oracle": known.get(oracle_epoch) if oracle_epoch is not None else None,
                "source_val": self.oracle.get(source_val_epoch),
            },
        }


def make_selection(study: Any, host: Any, target_items: list[dict[str, Any]], source_loader: Any,
                   make_loader: Any) -> TargetSelection | None:
    """Build the selection of ``train.select``, or return None when the study sets none."""
    name = study.train.select
    if not name:
        return None
    if not target_items:
        raise ConfigError(f"train.select is {name!r}, which scores target-site images, but no site with "
                          "role: target has validation images; add a target site or remove train.select")
    validator = host.create("validator", name, **study.train.select_options)
    loader = make_loader(target_items, [], study.train.batch_size, False, 0, study.seed)
    return TargetSelection(validator, name, loader, source_loader, host.factory("metric", "auc"))
