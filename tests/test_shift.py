"""Tests of the proxy A-distance, the MMD permutation test, embeddings and histograms."""

from __future__ import annotations

import numpy as np
import pytest

from medtl.shift import embed_2d, intensity_histogram, mmd_permutation_test, proxy_a_distance


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_same_distribution_shows_no_shift(rng):
    a = rng.normal(size=(120, 16))
    b = rng.normal(size=(100, 16))
    pad = proxy_a_distance(a, b, seed=0)
    mmd = mmd_permutation_test(a, b, permutations=200, seed=0)
    assert pad["pad"] < 0.4, pad
    assert abs(mmd["mmd2"]) < 0.01, mmd
    assert mmd["p_value"] > 0.05, mmd


def test_shifted_samples_show_large_significant_shift(rng):
    a = rng.normal(size=(120, 16))
    b = rng.normal(size=(100, 16)) + 1.0
    pad = proxy_a_distance(a, b, seed=0)
    mmd = mmd_permutation_test(a, b, permutations=200, seed=0)
    assert pad["pad"] > 1.5, pad
    assert mmd["mmd2"] > 0.05, mmd
    assert mmd["p_value"] < 0.01, mmd


def test_mmd_p_value_bounds(rng):
    a = rng.normal(size=(30, 4))
    result = mmd_permutation_test(a, a + 5.0, permutations=99, seed=1)
    # The smallest p-value of a permutation test with 99 permutations is 1/100.
    assert result["p_value"] == pytest.approx(0.01)


def test_proxy_a_distance_rejects_tiny_samples(rng):
    with pytest.raises(ValueError, match="at least 5 samples"):
        proxy_a_distance(rng.normal(size=(3, 4)), rng.normal(size=(20, 4)))


def test_embedding_has_pca_and_tsne(rng):
    features = np.concatenate([rng.normal(size=(20, 8)), rng.normal(size=(20, 8)) + 3])
    result = embed_2d(features, seed=0)
    assert np.asarray(result["pca"]).shape == (40, 2)
    assert np.asarray(result["tsne"]).shape == (40, 2)
    # The first principal component carries the 3-unit offset between the two clusters.
    assert result["pca_explained_variance"][0] > 0.3


def test_embedding_skips_tsne_for_few_samples(rng):
    result = embed_2d(rng.normal(size=(6, 4)))
    assert result["tsne"] is None
    assert "fewer than 10" in result["tsne_note"]


def test_intensity_histogram_is_a_density(rng):
    images = [rng.random((1, 8, 8)) for _ in range(3)]
    hist = intensity_histogram(images, bins=16, value_range=(0.0, 1.0))
    widths = np.diff(hist["edges"])
    assert float(np.sum(np.asarray(hist["density"]) * widths)) == pytest.approx(1.0)
    assert hist["n_images"] == 3
    assert 0.4 < hist["mean"] < 0.6
