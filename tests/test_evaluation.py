"""Tests of thresholds, calibration, patient bootstrap and cross-site evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from medtl.evaluation import (
    PredictionSet,
    bootstrap_metrics,
    choose_threshold,
    compute_metrics,
    cross_site_evaluation,
    expected_calibration_error,
    reliability_bins,
    sensitivity_specificity,
)


def _binary(p: np.ndarray) -> np.ndarray:
    return np.stack([1 - p, p], axis=1)


def _binormal(rng: np.random.Generator, patients: int, images: int, separation: float):
    """Scores N(0, 1) for negatives and N(separation, 1) for positives; label per patient."""
    patient_labels = rng.integers(0, 2, size=patients)
    labels = np.repeat(patient_labels, images)
    scores = rng.normal(loc=labels * separation, scale=1.0)
    probs = _binary(1 / (1 + np.exp(-scores)))
    return labels, probs, np.repeat(np.arange(patients), images)


def test_bootstrap_covers_known_auc():
    separation = 1.0
    true_auc = norm.cdf(separation / math.sqrt(2))
    rng = np.random.default_rng(1)
    trials, covered = 60, 0
    for trial in range(trials):
        labels, probs, patients = _binormal(rng, patients=60, images=2, separation=separation)
        ci = bootstrap_metrics(labels, probs, patients, 0.5, resamples=150, seed=trial)["auc"]
        covered += ci[0] <= true_auc <= ci[1]
    coverage = covered / trials
    # Nominal 95%; with 60 trials a correct interval lands in [0.85, 1] with probability > 0.99.
    assert 0.85 <= coverage <= 1.0, f"coverage {coverage:.2f} of the true AUC {true_auc:.3f}"


def test_bootstrap_resamples_patients_not_images():
    rng = np.random.default_rng(0)
    labels, probs, patients = _binormal(rng, patients=40, images=1, separation=1.0)
    # Ten identical images per patient: resampling patients gives the same replicates as
    # the one-image data, while resampling images would narrow the interval.
    repeated = bootstrap_metrics(np.repeat(labels, 10), np.repeat(probs, 10, axis=0), np.repeat(patients, 10),
                                 0.5, resamples=100, seed=3)
    single = bootstrap_metrics(labels, probs, patients, 0.5, resamples=100, seed=3)
    for name in ("auc", "accuracy", "sensitivity", "specificity"):
        assert repeated[name] == pytest.approx(single[name]), name


def test_auc_matches_sklearn_binary_and_multiclass():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=200)
    probs = _binary(np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1))
    assert compute_metrics(labels, probs, 0.5)["auc"] == pytest.approx(roc_auc_score(labels, probs[:, 1]))

    labels3 = rng.integers(0, 3, size=300)
    logits = rng.normal(size=(300, 3)) + np.eye(3)[labels3]
    probs3 = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = roc_auc_score(labels3, probs3, multi_class="ovr", average="macro")
    assert compute_metrics(labels3, probs3, None)["auc"] == pytest.approx(expected)


def test_ece_zero_when_perfectly_calibrated():
    labels, confidences = [], []
    # In each bin, the fraction of correct predictions equals the confidence exactly.
    for confidence, correct in ((0.6, 6), (0.7, 7), (0.8, 8), (0.9, 9), (1.0, 10)):
        confidences += [confidence] * 10
        labels += [1] * correct + [0] * (10 - correct)
    probs = _binary(np.array(confidences))
    assert expected_calibration_error(np.array(labels), probs) == pytest.approx(0.0, abs=1e-12)


def test_ece_measures_overconfidence():
    labels = np.array([1] * 50 + [0] * 50)
    probs = _binary(np.full(100, 0.9))
    # Every prediction is class 1 with confidence 0.9, and half of them are right.
    assert expected_calibration_error(labels, probs) == pytest.approx(0.4)


def test_reliability_bins_count_every_prediction():
    rng = np.random.default_rng(4)
    probs = _binary(rng.random(77))
    labels = rng.integers(0, 2, size=77)
    bins = reliability_bins(labels, probs, n_bins=10)
    assert sum(bins["count"]) == 77
    assert len(bins["lower"]) == 10


def test_threshold_from_validation_separates_classes():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    probs = _binary(np.array([0.05, 0.1, 0.2, 0.25, 0.3, 0.6, 0.7, 0.9]))
    threshold = choose_threshold(labels, probs)
    assert threshold["method"] == "youden"
    assert 0.25 < threshold["value"] <= 0.3
    assert threshold["youden_j"] == pytest.approx(1.0)


def test_threshold_is_argmax_for_multiclass():
    probs = np.full((6, 3), 1 / 3)
    assert choose_threshold(np.array([0, 1, 2, 0, 1, 2]), probs)["value"] is None


def test_sensitivity_specificity_binary():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    predicted = np.array([1, 1, 1, 0, 0, 0, 0, 1, 1])
    sens, spec = sensitivity_specificity(labels, predicted, num_classes=2)
    assert sens == pytest.approx(0.75)
    assert spec == pytest.approx(0.6)


def test_sensitivity_undefined_without_positives():
    sens, spec = sensitivity_specificity(np.array([0, 0]), np.array([0, 1]), num_classes=2)
    assert sens is None
    assert spec == pytest.approx(0.5)


def test_cross_site_reports_drop_with_interval():
    rng = np.random.default_rng(5)
    internal = PredictionSet("A", "internal", *_binormal(rng, 50, 2, 2.0))
    external = PredictionSet("B", "external", *_binormal(rng, 50, 2, 0.3))
    validation = PredictionSet("val", "internal", *_binormal(rng, 30, 1, 2.0), split="val")
    result = cross_site_evaluation(validation, [internal, external], resamples=100, seed=0)

    assert result["threshold"]["method"] == "youden"
    assert set(result["sites"]) == {"A", "B"}
    assert result["sites"]["A"]["n_patients"] == 50
    assert result["sites"]["A"]["n_images"] == 100
    drop = result["drops"]["B"]["auc"]
    assert drop["value"] == pytest.approx(result["sites"]["A"]["auc"] - result["sites"]["B"]["auc"])
    assert drop["ci"][0] > 0, "a clear AUC drop should have an interval above 0"
    assert result["internal"]["auc"] == pytest.approx(result["sites"]["A"]["auc"])


def test_pooled_sites_keep_patients_apart():
    rng = np.random.default_rng(6)
    a = PredictionSet("A", "internal", *_binormal(rng, 20, 1, 1.0))
    b = PredictionSet("B", "internal", *_binormal(rng, 20, 1, 1.0))
    result = cross_site_evaluation(None, [a, b], resamples=0)
    # Both sites number their patients 0..19; pooled, they are 40 patients.
    assert result["internal"]["n_patients"] == 40
    assert result["threshold"]["value"] == 0.5


class _RowReader:
    """A strategy whose class-1 logit is the image's first row minus its last, so flips change it."""

    def eval(self) -> None:
        pass

    def predict(self, x):
        import torch

        score = x[:, 0, 0, :].sum(dim=1) - x[:, 0, -1, :].sum(dim=1)
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_tta_averages_original_and_flipped_views():
    import torch

    from medtl.evaluation import predict_items

    images = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4) / 10
    batch = {"image": images, "row": torch.tensor([0, 1]), "label": torch.tensor([0, 1]), "site": ["A", "A"]}
    plain = predict_items(_RowReader(), [batch], torch.device("cpu"))
    rows_flipped = predict_items(_RowReader(), [batch], torch.device("cpu"), tta_flip_axes=[0])
    columns_flipped = predict_items(_RowReader(), [batch], torch.device("cpu"), tta_flip_axes=[1])

    def softmax(score):
        return torch.softmax(torch.stack([torch.zeros_like(score), score], dim=1), dim=1).numpy()

    score = images[:, 0, 0, :].sum(dim=1) - images[:, 0, -1, :].sum(dim=1)
    np.testing.assert_allclose(plain["probs"], softmax(score), rtol=1e-6)
    # Flipping the rows negates the score, so the average of both views is 0.5 each.
    np.testing.assert_allclose(rows_flipped["probs"], (softmax(score) + softmax(-score)) / 2, rtol=1e-6)
    np.testing.assert_allclose(rows_flipped["probs"], 0.5, rtol=1e-6)
    # Flipping the columns leaves row sums alone, so the average equals the plain prediction.
    np.testing.assert_allclose(columns_flipped["probs"], plain["probs"], rtol=1e-6)
