"""Prediction over a loader and metrics per site."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

__all__ = ["predict_items", "site_metrics", "Predictions"]


class Predictions(dict):
    """Arrays ``row``, ``site``, ``label``, ``probs`` and, when requested, ``features``."""


@torch.no_grad()
def predict_items(strategy: Any, loader: Any, device: torch.device, autocast: Any = None,
                  with_features: bool = False) -> Predictions:
    """Run the strategy's predictions over a loader, in order."""
    strategy.eval()
    rows, sites, labels, probs, feats = [], [], [], [], []
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        with autocast() if autocast is not None else nullcontext():
            if with_features:
                logits, f = strategy.predict_with_features(x)
                feats.append(f.float().cpu())
            else:
                logits = strategy.predict(x)
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        rows.append(batch["row"])
        labels.append(batch["label"])
        sites.extend(batch["site"])
    out = Predictions(
        row=torch.cat(rows).numpy() if rows else np.zeros(0, dtype=np.int64),
        site=np.array(sites, dtype=object),
        label=torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64),
        probs=torch.cat(probs).numpy().astype(np.float64) if probs else np.zeros((0, 0)),
    )
    if with_features:
        out["features"] = torch.cat(feats).numpy() if feats else np.zeros((0, 0))
    return out


def site_metrics(labels: np.ndarray, probs: np.ndarray, metric_fns: dict[str, Any]) -> dict[str, Any]:
    """Compute each metric on one site's labeled predictions.

    Returns the metric values plus ``n``; a metric that is undefined on this data
    (AUC with a single class present) is ``None`` and its reason is under ``notes``.
    """
    mask = labels >= 0
    labels, probs = labels[mask], probs[mask]
    result: dict[str, Any] = {"n": int(len(labels))}
    notes: dict[str, str] = {}
    for name, fn in metric_fns.items():
        if len(labels) == 0:
            result[name] = None
            notes[name] = "no labeled images"
            continue
        value = fn(labels, probs)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            result[name] = None
            present = sorted(set(int(v) for v in labels))
            notes[name] = f"undefined: only class {present} present" if len(present) < 2 else "undefined"
        else:
            result[name] = float(value)
    if notes:
        result["notes"] = notes
    return result
