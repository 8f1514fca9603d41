"""Label-free validators: score a checkpoint on a target site without target labels.

Choosing checkpoints or hyperparameters by target-site labels leaks the test
labels into the model, so a study selects with one of these instead
(``train.select``). Each validator has ``score(outputs) -> float``, higher is
better, where ``outputs`` is a :class:`medtl.selection.SelectionOutputs`.

- ``snd``: soft neighborhood density ("Tune it the Right Way: Unsupervised
  Validation of Domain Adaptation via Soft Neighborhood Density", Saito et al.,
  ICCV 2021, https://arxiv.org/abs/2108.10860).
- ``dev``: deep embedded validation ("Towards Accurate Model Selection in Deep
  Unsupervised Domain Adaptation", You et al., ICML 2019,
  http://proceedings.mlr.press/v97/you19a.html), and ``iwv``, the importance-weighted
  validation it improves on (Sugiyama et al., JMLR 2007).
- ``entropy``: the negative mean prediction entropy on the target site, a common
  baseline that rewards confident predictions.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

import medtl

__all__ = ["SoftNeighborhoodDensity", "DeepEmbeddedValidation", "PredictionEntropy"]

logger = logging.getLogger(__name__)


def _softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


class SoftNeighborhoodDensity:
    """Entropy of each target sample's softmax-weighted similarity to its neighbors.

    A good adapted model clusters target samples densely, so the similarity
    distribution of a sample over the others is spread out and its entropy is high.

    NOTE: a collapsed model that predicts the same class for every image also gets
    the maximum score, ``log(n - 1)``. On the BreastMNIST benchmark, with about 73%
    of one class, snd chose such early epochs of DANN in every seed.

    Args:
        temperature: softmax temperature over cosine similarities (default 0.05, the
            paper's value).
        space: ``"probs"`` (class probabilities, the paper's choice) or ``"features"``
            (pooled features).
    """

    def __init__(self, temperature: float = 0.05, space: str = "probs"):
        if temperature <= 0:
            raise ValueError(f"validator option temperature must be > 0, got {temperature}")
        if space not in ("probs", "features"):
            raise ValueError(f"validator option space must be 'probs' or 'features', got {space!r}")
        self.temperature = temperature
        self.space = space

    def score(self, outputs: Any) -> float:
        x = np.asarray(outputs.target_probs if self.space == "probs" else outputs.target_features, dtype=np.float64)
        if len(x) < 2:
            raise ValueError("snd needs at least 2 target images to compare")
        x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
        similarity = x @ x.T
        np.fill_diagonal(similarity, -np.inf)
        p = _softmax(similarity / self.temperature)
        entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)
        return float(entropy.mean())


class DeepEmbeddedValidation:
    """Importance-weighted source validation loss, with DEV's control variate.

    A logistic-regression domain classifier on the pooled features estimates the
    density ratio ``w(x) = p_target(x) / p_source(x)`` of each labeled source
    validation image. The weighted mean of their losses estimates the target
    risk. DEV subtracts ``eta * (mean(w) - 1)`` with ``eta = -Cov(loss*w, w)/Var(w)``,
    which lowers the variance of that estimate. The score is the negative risk.

    Args:
        control_variate: apply DEV's control variate (default True); False gives
            plain importance-weighted validation.
        folds: cross-validation folds for the domain classifier, so that no image
            gets a weight from a classifier that saw it (default 3).
    """

    def __init__(self, control_variate: bool = True, folds: int = 3):
        if folds < 2:
            raise ValueError(f"validator option folds must be >= 2, got {folds}")
        self.control_variate = control_variate
        self.folds = folds

    def score(self, outputs: Any) -> float:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import cross_val_predict
        from sklearn.preprocessing import StandardScaler

        source = np.asarray(outputs.source_features, dtype=np.float64)
        target = np.asarray(outputs.target_features, dtype=np.float64)
        labels = np.asarray(outputs.source_labels)
        if len(source) < self.folds or len(target) < self.folds:
            raise ValueError(f"dev needs at least {self.folds} source validation and target images, "
                             f"got {len(source)} and {len(target)}")

        # Domain classifier: source is 0, target is 1
        x = StandardScaler().fit_transform(np.concatenate([source, target]))
        d = np.concatenate([np.zeros(len(source)), np.ones(len(target))])
        classifier = LogisticRegression(C=1.0, max_iter=1000)
        p_target = cross_val_predict(classifier, x, d, cv=self.folds, method="predict_proba")[: len(source), 1]
        p_target = np.clip(p_target, 1e-6, 1 - 1e-6)
        weights = p_target / (1 - p_target) * (len(source) / len(target))

        # Importance-weighted loss, with the control variate of DEV
        probs = np.asarray(outputs.source_probs, dtype=np.float64)
        losses = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
        weighted = losses * weights
        risk = float(weighted.mean())
        if self.control_variate and weights.var() > 0:
            eta = -np.cov(weighted, weights)[0, 1] / np.var(weights, ddof=1)
            risk = float(weighted.mean() + eta * weights.mean() - eta)
        return -risk


class PredictionEntropy:
    """Negative mean entropy of the target predictions; higher means more confident."""

    def score(self, outputs: Any) -> float:
        p = np.clip(np.asarray(outputs.target_probs, dtype=np.float64), 1e-12, None)
        return float((p * np.log(p)).sum(axis=1).mean())


def _iwv(folds: int = 3) -> DeepEmbeddedValidation:
    return DeepEmbeddedValidation(control_variate=False, folds=folds)


@medtl.hookimpl
def medtl_register_validators() -> dict[str, Callable[..., Any]]:
    return {"snd": SoftNeighborhoodDensity, "dev": DeepEmbeddedValidation, "iwv": _iwv,
            "entropy": PredictionEntropy}
