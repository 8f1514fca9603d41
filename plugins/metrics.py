"""Builtin classification metrics, computed with scikit-learn."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

import medtl


def auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """ROC AUC; one-vs-rest macro average for more than two classes.

    Returns None when the labels hold a single class, where AUC is undefined.
    """
    present = np.unique(labels)
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    if len(present) < probs.shape[1]:
        # Classes absent from this sample get no one-vs-rest curve; average the rest.
        scores = [roc_auc_score(labels == c, probs[:, c]) for c in present]
        return float(np.mean(scores))
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(accuracy_score(labels, probs.argmax(axis=1)))


def balanced_accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean recall over the classes present in ``labels``."""
    return float(balanced_accuracy_score(labels, probs.argmax(axis=1)))


@medtl.hookimpl
def medtl_register_metrics() -> dict[str, Callable[..., Any]]:
    return {"auc": auc, "accuracy": accuracy, "balanced_accuracy": balanced_accuracy}
