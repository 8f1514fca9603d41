"""Tests of the label-free validators and of checkpoint selection with them."""

from __future__ import annotations

import json

import numpy as np
import pytest

import medtl
from medtl.engine import run_study
from medtl.errors import ConfigError
from medtl.selection import SelectionOutputs
from medtl_plugins.validators import DeepEmbeddedValidation, PredictionEntropy, SoftNeighborhoodDensity

from adaptation_helpers import make_host, make_study


def outputs(target_probs, target_features=None, source_probs=None, source_features=None, source_labels=None):
    target_probs = np.asarray(target_probs, dtype=float)
    n = len(target_probs)
    return SelectionOutputs(
        target_probs=target_probs,
        target_features=np.zeros((n, 2)) if target_features is None else np.asarray(target_features),
        source_probs=np.zeros((0, 2)) if source_probs is None else np.asarray(source_probs),
        source_features=np.zeros((0, 2)) if source_features is None else np.asarray(source_features),
        source_labels=np.zeros(0, dtype=int) if source_labels is None else np.asarray(source_labels),
    )


def test_builtin_validators_registered():
    assert {"snd", "dev", "iwv", "entropy"} <= set(medtl.components("validator"))


def test_snd_prefers_dense_clusters():
    rng = np.random.default_rng(0)
    # Confident, clustered predictions: two tight groups of 20.
    clustered = np.concatenate([np.tile([0.95, 0.05], (20, 1)), np.tile([0.05, 0.95], (20, 1))])
    clustered += rng.normal(0, 0.01, clustered.shape)
    # Predictions spread evenly between the classes.
    p = np.linspace(0.02, 0.98, 40)
    spread = np.stack([p, 1 - p], axis=1)
    snd = SoftNeighborhoodDensity()
    assert snd.score(outputs(clustered)) > snd.score(outputs(spread))


def test_snd_reference_value():
    probs = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # Each row's similarities to the others are {0, 1}, {0, 0} and {1, 0}, divided by 0.05.
    e = np.exp(20.0)
    p_peak = np.array([e, 1.0]) / (e + 1.0)
    peak_entropy = -(p_peak * np.log(p_peak)).sum()
    expected = (peak_entropy + np.log(2) + peak_entropy) / 3
    assert SoftNeighborhoodDensity().score(outputs(probs)) == pytest.approx(expected, rel=1e-6)


def test_entropy_prefers_confident_predictions():
    confident = np.tile([0.99, 0.01], (10, 1))
    unsure = np.tile([0.6, 0.4], (10, 1))
    validator = PredictionEntropy()
    assert validator.score(outputs(confident)) > validator.score(outputs(unsure))


def dev_case(rng: np.random.Generator, accurate_where_target_is: bool) -> SelectionOutputs:
    """Source samples on a line; the target lives at x > 0. The model is right on one half only."""
    source_x = rng.uniform(-2, 2, size=(200, 1))
    target_x = rng.uniform(0, 2, size=(100, 1))
    labels = rng.integers(0, 2, size=200)
    right = (source_x[:, 0] > 0) == accurate_where_target_is
    p_true = np.where(right, 0.95, 0.3)
    probs = np.zeros((200, 2))
    probs[np.arange(200), labels] = p_true
    probs[np.arange(200), 1 - labels] = 1 - p_true
    return SelectionOutputs(np.full((100, 2), 0.5), target_x, probs, source_x, labels)


@pytest.mark.parametrize("control_variate", [True, False])
def test_dev_weights_source_losses_toward_target(control_variate):
    rng = np.random.default_rng(0)
    validator = DeepEmbeddedValidation(control_variate=control_variate)
    good = validator.score(dev_case(rng, accurate_where_target_is=True))
    bad = validator.score(dev_case(rng, accurate_where_target_is=False))
    # Both models have the same unweighted source loss; only the weighting separates them.
    assert good > bad


def test_dev_needs_enough_samples():
    case = outputs(np.full((2, 2), 0.5), np.zeros((2, 1)), np.full((2, 2), 0.5), np.zeros((2, 1)), np.zeros(2, int))
    with pytest.raises(ValueError, match="at least 3"):
        DeepEmbeddedValidation().score(case)


@pytest.mark.parametrize("validator", ["snd", "dev"])
def test_select_reports_validator_and_oracle(tmp_path, validator):
    study = make_study(tmp_path, strategy={"name": "coral"},
                       train={"epochs": 3, "batch_size": 8, "device": "cpu", "select": validator})
    result = run_study(study, make_host())
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    selection = metrics["selection"]
    assert selection["validator"] == validator
    scores = {int(e): s for e, s in selection["scores"].items()}
    assert sorted(scores) == [1, 2, 3]
    # The checkpoint kept as best.pt is the validator's choice, not the oracle's.
    assert metrics["best_epoch"] == max(scores, key=scores.get) == selection["epochs"]["validator"]
    oracle = {int(e): v for e, v in selection["target_val_auc"].items()}
    assert selection["epochs"]["oracle"] == max(oracle, key=oracle.get)
    assert selection["target_val_auc_at"]["oracle"] == max(oracle.values())
    assert selection["target_val_auc_at"]["validator"] == oracle[metrics["best_epoch"]]
    history = json.loads((result.run_dir / "history.json").read_text())
    assert all(f"select_{validator}" in entry for entry in history)


def test_select_without_target_site_is_config_error(tmp_path):
    study = make_study(tmp_path, sites={"A": {"role": "source"}, "B": {"role": "source"}},
                       train={"epochs": 1, "batch_size": 8, "device": "cpu", "select": "snd"})
    with pytest.raises(ConfigError, match="train.select"):
        run_study(study, make_host())
