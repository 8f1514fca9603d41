"""Prediction over a loader, metrics per site, calibration and patient-level bootstrap."""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from medtl.errors import DataError

__all__ = [
    "predict_items", "site_metrics", "Predictions", "CORE_METRICS", "PredictionSet", "choose_threshold",
    "predict_classes", "sensitivity_specificity", "reliability_bins", "expected_calibration_error",
    "compute_metrics", "bootstrap_metrics", "bootstrap_difference", "roc_points", "describe_set",
    "concatenate_sets", "cross_site_evaluation", "evaluation_from_predictions", "evaluate_trained",
]

logger = logging.getLogger(__name__)


class Predictions(dict):
    """Arrays ``row``, ``site``, ``label``, ``probs`` and, when requested, ``features``."""


@torch.no_grad()
def predict_items(strategy: Any, loader: Any, device: torch.device, autocast: Any = None,
                  with_features: bool = False, tta_flip_axes: list[int] | tuple[int, ...] = ()) -> Predictions:
    """Run the strategy's predictions over a loader, in order.

    With ``tta_flip_axes``, each listed spatial axis (0 is the first one after the
    batch and channel axes) adds a prediction on the batch flipped along it, and the
    returned probabilities are the mean over the original and flipped views.
    Features, when requested, come from the original images only.
    """
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
            batch_probs = torch.softmax(logits.float(), dim=1)
            for axis in tta_flip_axes:
                flipped = strategy.predict(torch.flip(x, dims=[2 + axis]))
                batch_probs = batch_probs + torch.softmax(flipped.float(), dim=1)
        probs.append((batch_probs / (1 + len(tta_flip_axes))).cpu())
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


# ---------------------------------------------------------------------------
# Thresholds, calibration and patient-level bootstrap
# ---------------------------------------------------------------------------

#: Metrics that :func:`compute_metrics` returns and the bootstrap resamples.
CORE_METRICS = ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ece")


def positive_scores(probs: np.ndarray) -> np.ndarray:
    """Return the score of the positive class (label index 1) of binary predictions."""
    if probs.ndim != 2 or probs.shape[1] != 2:
        raise ValueError(f"expected binary probabilities of shape (n, 2), got {probs.shape}")
    return probs[:, 1]


def choose_threshold(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Choose the operating threshold on validation predictions by Youden's J.

    For two classes the threshold applies to the positive-class probability and
    maximizes sensitivity + specificity - 1 on ``labels``. For more classes the
    prediction is the arg-max class and no threshold is chosen.

    Returns a dict with ``method``, ``value`` (None for arg-max) and ``n``.
    """
    from sklearn.metrics import roc_curve

    mask = labels >= 0
    labels, probs = labels[mask], probs[mask]
    if probs.ndim != 2 or probs.shape[1] != 2:
        return {"method": "argmax", "value": None, "n": int(len(labels))}
    if len(np.unique(labels)) < 2:
        return {"method": "default", "value": 0.5, "n": int(len(labels)),
                "note": "validation data hold a single class; the threshold falls back to 0.5"}
    fpr, tpr, thresholds = roc_curve(labels, probs[:, 1])
    best = int(np.argmax(tpr - fpr))
    # roc_curve's first threshold is +inf (nothing predicted positive); keep the value finite.
    value = float(min(thresholds[best], 1.0))
    return {"method": "youden", "value": value, "n": int(len(labels)),
            "youden_j": float(tpr[best] - fpr[best])}


def predict_classes(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Turn probabilities into class indices: a threshold on class 1 for binary, else arg-max."""
    if threshold is not None and probs.ndim == 2 and probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(axis=1)


def sensitivity_specificity(labels: np.ndarray, predicted: np.ndarray,
                            num_classes: int) -> tuple[float | None, float | None]:
    """Return sensitivity and specificity of class predictions.

    Binary: class 1 is positive. More classes: one-vs-rest values macro-averaged over
    the classes present in ``labels``. A value is None when its denominator is empty.
    """
    if num_classes == 2:
        positives, negatives = labels == 1, labels == 0
        sens = float((predicted[positives] == 1).mean()) if positives.any() else None
        spec = float((predicted[negatives] == 0).mean()) if negatives.any() else None
        return sens, spec
    sens_values, spec_values = [], []
    for c in np.unique(labels):
        positives, negatives = labels == c, labels != c
        sens_values.append(float((predicted[positives] == c).mean()))
        if negatives.any():
            spec_values.append(float((predicted[negatives] != c).mean()))
    return (float(np.mean(sens_values)) if sens_values else None,
            float(np.mean(spec_values)) if spec_values else None)


def reliability_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> dict[str, list]:
    """Bin top-label confidence into equal-width bins for a reliability diagram.

    Returns lists ``lower``, ``upper``, ``confidence`` (mean per bin), ``accuracy``
    and ``count``; empty bins have ``None`` confidence and accuracy.
    """
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin i holds confidences in (edges[i], edges[i + 1]]; a confidence of exactly 0 joins bin 0.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    out: dict[str, list] = {"lower": [], "upper": [], "confidence": [], "accuracy": [], "count": []}
    for b in range(n_bins):
        sel = index == b
        out["lower"].append(float(edges[b]))
        out["upper"].append(float(edges[b + 1]))
        out["count"].append(int(sel.sum()))
        out["confidence"].append(float(confidence[sel].mean()) if sel.any() else None)
        out["accuracy"].append(float(correct[sel].mean()) if sel.any() else None)
    return out


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float | None:
    """Top-label expected calibration error with equal-width bins.

    ECE = sum over bins of (bin size / n) * |accuracy - mean confidence|, as in
    Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017).
    """
    if len(labels) == 0:
        return None
    bins = reliability_bins(labels, probs, n_bins)
    total = 0.0
    for count, conf, acc in zip(bins["count"], bins["confidence"], bins["accuracy"]):
        if count:
            total += count * abs(acc - conf)
    return float(total / len(labels))


def _auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    # Mann-Whitney form of the ROC AUC (ties count one half), one-vs-rest macro over
    # the classes present for more than two classes; it equals sklearn's roc_auc_score
    # and is much faster inside bootstrap loops.
    present = np.unique(labels)
    if len(present) < 2:
        return None
    classes = [1] if probs.shape[1] == 2 else list(present)
    values = []
    for c in classes:
        positive = labels == c
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        ranks = rankdata(probs[:, c])
        values.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(values))


def compute_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float | None) -> dict[str, float | None]:
    """Compute every metric of :data:`CORE_METRICS` on labeled predictions.

    AUC is one-vs-rest macro for more than two classes; accuracy and balanced accuracy
    use the arg-max class; sensitivity and specificity use ``threshold`` (binary).
    """
    if len(labels) == 0:
        return {name: None for name in CORE_METRICS}
    argmax = probs.argmax(axis=1)
    recalls = [float((argmax[labels == c] == c).mean()) for c in np.unique(labels)]
    sens, spec = sensitivity_specificity(labels, predict_classes(probs, threshold), probs.shape[1])
    return {
        "auc": _auc(labels, probs),
        "accuracy": float((argmax == labels).mean()),
        "balanced_accuracy": float(np.mean(recalls)),
        "sensitivity": sens,
        "specificity": spec,
        "ece": expected_calibration_error(labels, probs),
    }


def _patient_groups(patients: np.ndarray) -> list[np.ndarray]:
    _, inverse = np.unique(patients, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    return np.split(order, bounds)


def _resample(groups: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    chosen = rng.integers(0, len(groups), size=len(groups))
    return np.concatenate([groups[i] for i in chosen])


def _percentile_interval(values: list[float], level: float) -> list[float] | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    # Too few defined replicates (single-class resamples, say) give no usable interval.
    if len(finite) < max(10, 0.5 * len(values)):
        return None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return [float(low), float(high)]


def bootstrap_metrics(labels: np.ndarray, probs: np.ndarray, patients: np.ndarray, threshold: float | None,
                      resamples: int, seed: int = 0, level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals that resample patients, not images.

    Each replicate draws as many patients as there are, with replacement, and takes
    all images of each drawn patient, so images of one patient stay together as they
    are correlated. Returns ``{metric: [low, high]}`` for :data:`CORE_METRICS`; an
    interval is None when fewer than half the replicates define the metric.
    """
    if resamples <= 0 or len(labels) == 0:
        return {name: None for name in CORE_METRICS}
    rng = np.random.default_rng(seed)
    groups = _patient_groups(patients)
    samples: dict[str, list] = {name: [] for name in CORE_METRICS}
    for _ in range(resamples):
        index = _resample(groups, rng)
        values = compute_metrics(labels[index], probs[index], threshold)
        for name in CORE_METRICS:
            samples[name].append(values[name])
    return {name: _percentile_interval(samples[name], level) for name in CORE_METRICS}


def bootstrap_difference(reference: tuple[np.ndarray, np.ndarray, np.ndarray],
                         other: tuple[np.ndarray, np.ndarray, np.ndarray], threshold: float | None,
                         resamples: int, seed: int = 0, level: float = 0.95) -> dict[str, dict[str, Any]]:
    """Estimate ``metric(reference) - metric(other)`` with a patient bootstrap interval.

    ``reference`` and ``other`` are ``(labels, probs, patients)`` of independent patient
    groups (internal test and one external site), so each is resampled on its own.
    Returns ``{metric: {"value": drop, "ci": [low, high] or None}}``.
    """
    ref_values = compute_metrics(reference[0], reference[1], threshold)
    other_values = compute_metrics(other[0], other[1], threshold)
    rng = np.random.default_rng(seed)
    ref_groups, other_groups = _patient_groups(reference[2]), _patient_groups(other[2])
    samples: dict[str, list] = {name: [] for name in CORE_METRICS}
    for _ in range(resamples):
        i = _resample(ref_groups, rng)
        j = _resample(other_groups, rng)
        a = compute_metrics(reference[0][i], reference[1][i], threshold)
        b = compute_metrics(other[0][j], other[1][j], threshold)
        for name in CORE_METRICS:
            value_a, value_b = a[name], b[name]
            samples[name].append(None if value_a is None or value_b is None else value_a - value_b)
    out = {}
    for name in CORE_METRICS:
        ref, other_value = ref_values[name], other_values[name]
        out[name] = {"value": None if ref is None or other_value is None else float(ref - other_value),
                     "ci": _percentile_interval(samples[name], level) if resamples > 0 else None}
    return out


def roc_points(labels: np.ndarray, probs: np.ndarray, max_points: int = 200) -> dict[str, list[float]] | None:
    """Return the ROC curve (binary) or the micro-averaged one-vs-rest curve, thinned for plotting."""
    from sklearn.metrics import roc_curve

    if len(np.unique(labels)) < 2:
        return None
    if probs.shape[1] == 2:
        fpr, tpr, _ = roc_curve(labels, probs[:, 1])
    else:
        onehot = np.eye(probs.shape[1])[labels]
        fpr, tpr, _ = roc_curve(onehot.ravel(), probs.ravel())
    if len(fpr) > max_points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": [round(float(v), 5) for v in fpr], "tpr": [round(float(v), 5) for v in tpr]}


# ---------------------------------------------------------------------------
# Cross-site evaluation
# ---------------------------------------------------------------------------


@dataclass
class PredictionSet:
    """Labeled predictions of one site: class probabilities and the patient of each image.

    ``role`` is ``"internal"`` for a held-out split of a training site and
    ``"external"`` for a site the model never saw labels of.
    """

    site: str
    role: str
    labels: np.ndarray
    probs: np.ndarray
    patients: np.ndarray
    split: str = "test"

    def labeled(self) -> "PredictionSet":
        mask = self.labels >= 0
        return PredictionSet(self.site, self.role, self.labels[mask], self.probs[mask], self.patients[mask],
                             self.split)


def concatenate_sets(sets: list[PredictionSet], site: str, role: str) -> PredictionSet:
    """Pool several prediction sets into one (the internal test set of several sites, say)."""
    return PredictionSet(
        site=site, role=role,
        labels=np.concatenate([s.labels for s in sets]),
        probs=np.concatenate([s.probs for s in sets]),
        # Prefix patients with their site so equal IDs at two sites stay two patients.
        patients=np.concatenate([np.array([f"{s.site}\x1f{p}" for p in s.patients], dtype=object) for s in sets]),
        split=sets[0].split if sets else "test",
    )


def describe_set(data: PredictionSet, threshold: float | None, resamples: int, seed: int,
                 level: float = 0.95) -> dict[str, Any]:
    """Compute metrics, bootstrap intervals, the ROC curve and reliability bins of one set."""
    data = data.labeled()
    result: dict[str, Any] = {
        "site": data.site, "split": data.split, "role": data.role,
        "n_images": int(len(data.labels)), "n_patients": int(len(np.unique(data.patients))),
    }
    result.update(compute_metrics(data.labels, data.probs, threshold))
    result["ci"] = bootstrap_metrics(data.labels, data.probs, data.patients, threshold, resamples, seed, level)
    if len(data.labels):
        result["roc"] = roc_points(data.labels, data.probs)
        result["reliability"] = reliability_bins(data.labels, data.probs)
    return result


def cross_site_evaluation(validation: PredictionSet | None, sets: list[PredictionSet], resamples: int,
                          seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Evaluate a model per site, with patient-bootstrap intervals and drops to external sites.

    Args:
        validation: predictions on the validation split, which choose the threshold
            for sensitivity and specificity (None: 0.5 for binary, arg-max otherwise).
        sets: one prediction set per evaluated site.
        resamples: bootstrap replicates; 0 computes point estimates only.
        seed: seed of the bootstrap.
        level: coverage of the intervals.

    Returns:
        ``threshold``, ``bootstrap`` (settings), ``sites`` (per site), ``internal``
        (internal sites pooled, when there are any) and ``drops`` (internal minus each
        external site, per metric, with an interval).
    """
    if validation is not None and len(validation.labeled().labels):
        val = validation.labeled()
        threshold = choose_threshold(val.labels, val.probs)
    elif sets and sets[0].probs.ndim == 2 and sets[0].probs.shape[1] == 2:
        threshold = {"method": "default", "value": 0.5, "n": 0, "note": "no validation predictions"}
    else:
        threshold = {"method": "argmax", "value": None, "n": 0}
    cut = threshold["value"]

    out: dict[str, Any] = {
        "threshold": threshold,
        "bootstrap": {"resamples": int(resamples), "unit": "patient", "level": level, "seed": int(seed)},
        "sites": {},
        "drops": {},
    }
    for offset, data in enumerate(sets):
        out["sites"][data.site] = describe_set(data, cut, resamples, seed + offset, level)
        logger.info("site %s (%s): AUC %s over %d images of %d patients", data.site, data.role,
                    _fmt(out["sites"][data.site]["auc"]), out["sites"][data.site]["n_images"],
                    out["sites"][data.site]["n_patients"])

    internal_sets = [s.labeled() for s in sets if s.role == "internal"]
    if internal_sets:
        internal = concatenate_sets(internal_sets, "+".join(s.site for s in internal_sets), "internal")
        out["internal"] = describe_set(internal, cut, resamples, seed + len(sets), level)
        for offset, data in enumerate(s for s in sets if s.role == "external"):
            external = data.labeled()
            if not len(external.labels):
                continue
            out["drops"][data.site] = bootstrap_difference(
                (internal.labels, internal.probs, internal.patients),
                (external.labels, external.probs, external.patients),
                cut, resamples, seed + 1000 + offset, level)
    return out


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def evaluation_from_predictions(validation: Predictions | None, test_predictions: list[Predictions],
                                patient_of_row: dict[int, str], internal_sites: list[str], resamples: int,
                                seed: int = 0) -> dict[str, Any]:
    """Run :func:`cross_site_evaluation` on the engine's per-site test predictions.

    ``test_predictions`` holds one :class:`Predictions` per site (all from one split);
    sites in ``internal_sites`` count as internal, the others as external.
    """

    def as_set(preds: Predictions, site: str, role: str, split: str) -> PredictionSet:
        patients = np.array([patient_of_row[int(i)] for i in preds["row"]], dtype=object)
        return PredictionSet(site=site, role=role, labels=preds["label"], probs=preds["probs"],
                             patients=patients, split=split)

    val_set = None
    if validation is not None and len(validation["label"]):
        val_set = as_set(validation, "validation", "internal", "val")
    sets = []
    for preds in test_predictions:
        if not len(preds["row"]):
            continue
        site = str(preds["site"][0])
        role = "internal" if site in internal_sites else "external"
        sets.append(as_set(preds, site, role, str(preds.get("split", "test"))))
    return cross_site_evaluation(val_set, sets, resamples, seed)


def evaluate_trained(trained: Any, data: str | None = None, resamples: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """Evaluate a loaded run (:class:`medtl.trained.TrainedRun`) per site.

    Without ``data``, each site's test split of the run's own manifest is evaluated:
    the training sites as internal, the others as external. With ``data``, every row
    of that manifest is external test data. The threshold always comes from the
    run's validation split.
    """
    m = trained.manifest
    val_rows = [r for s in trained.source_sites for r in m.select(s, "val") if r.label is not None]
    val_preds = trained.predict(trained.load_items(val_rows))
    validation = trained.prediction_set(val_preds, m, "validation", "internal", "val") if val_rows else None

    sets = []
    if data is None:
        for site in m.sites:
            rows = [r for r in m.select(site, "test") if r.label is not None]
            if not rows:
                continue
            role = "internal" if site in trained.source_sites else "external"
            preds = trained.predict(trained.load_items(rows))
            sets.append(trained.prediction_set(preds, m, site, role))
    else:
        external = trained.load_manifest(data)
        for site in external.sites:
            rows = [r for r in external.select(site) if r.label is not None]
            if not rows:
                continue
            preds = trained.predict(trained.load_items(rows, external))
            sets.append(trained.prediction_set(preds, external, site, "external"))
        # The run's own internal test split is the reference for the drop to each new site.
        for site in trained.source_sites:
            rows = [r for r in m.select(site, "test") if r.label is not None]
            if rows and site not in external.sites:
                preds = trained.predict(trained.load_items(rows))
                sets.append(trained.prediction_set(preds, m, site, "internal"))
    if not sets:
        raise DataError("no labeled test images to evaluate; check the manifest's label and split columns")
    return cross_site_evaluation(validation, sets, resamples, seed)
