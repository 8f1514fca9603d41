"""Dataset shift between sites, measured in the model's feature space and in input intensities.

Two measures compare a reference sample (the training split) with another sample:

- the proxy A-distance of Ben-David et al., "Analysis of Representations for Domain
  Adaptation" (NeurIPS 2006): ``2 * (1 - 2 * err)``, where ``err`` is the
  cross-validated balanced error of a classifier that tells the two samples apart.
  0 means the samples cannot be told apart, 2 means they separate perfectly;
- the kernel maximum mean discrepancy of Gretton et al., "A Kernel Two-Sample Test"
  (JMLR 2012), with a Gaussian kernel and a permutation-test p-value.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["proxy_a_distance", "mmd_permutation_test", "embed_2d", "intensity_histogram", "measure_shift"]

logger = logging.getLogger(__name__)


def _subsample(x: np.ndarray, max_samples: int, rng: np.random.Generator) -> np.ndarray:
    if len(x) <= max_samples:
        return x
    return x[np.sort(rng.choice(len(x), size=max_samples, replace=False))]


def proxy_a_distance(a: np.ndarray, b: np.ndarray, folds: int = 5, seed: int = 0,
                     max_components: int = 32) -> dict[str, Any]:
    """Estimate the proxy A-distance between two feature samples.

    The domain classifier is standardization, PCA to at most ``max_components``
    dimensions (fitted inside each fold) and logistic regression. Its error is the
    balanced error of out-of-fold predictions, so unequal sample sizes do not bias it.

    Returns ``pad`` (clipped to [0, 2]), ``raw_pad`` (unclipped), ``error``, ``folds``
    and the sample sizes ``n_a`` and ``n_b``.

    Raises:
        ValueError: when either sample has fewer than ``folds`` rows.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if min(len(a), len(b)) < folds:
        raise ValueError(f"proxy A-distance needs at least {folds} samples per group, got {len(a)} and {len(b)}")
    x = np.concatenate([a, b])
    y = np.concatenate([np.zeros(len(a), dtype=int), np.ones(len(b), dtype=int)])
    components = int(min(max_components, x.shape[1], len(x) * (folds - 1) // folds - 1))
    steps: list[Any] = [StandardScaler()]
    if components < x.shape[1]:
        # A full SVD of these small matrices is faster than the randomized solver sklearn picks.
        steps.append(PCA(n_components=max(1, components), svd_solver="full"))
    steps.append(LogisticRegression(max_iter=2000, class_weight="balanced"))
    classifier = make_pipeline(*steps)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    predicted = cross_val_predict(classifier, x, y, cv=splitter)
    error = 0.5 * (np.mean(predicted[y == 0] != 0) + np.mean(predicted[y == 1] != 1))
    raw = 2.0 * (1.0 - 2.0 * error)
    return {"pad": float(np.clip(raw, 0.0, 2.0)), "raw_pad": float(raw), "error": float(error),
            "folds": folds, "n_a": int(len(a)), "n_b": int(len(b))}


def _gaussian_kernel(x: np.ndarray, bandwidth: float) -> np.ndarray:
    squared = np.sum(x * x, axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2.0 * x @ x.T, 0.0)
    return np.exp(-distances / (2.0 * bandwidth**2))


def _mmd2_unbiased(kernel: np.ndarray, in_a: np.ndarray) -> float:
    in_b = ~in_a
    n, m = int(in_a.sum()), int(in_b.sum())
    k_aa = kernel[np.ix_(in_a, in_a)]
    k_bb = kernel[np.ix_(in_b, in_b)]
    k_ab = kernel[np.ix_(in_a, in_b)]
    term_a = (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
    term_b = (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(term_a + term_b - 2.0 * k_ab.mean())


def mmd_permutation_test(a: np.ndarray, b: np.ndarray, permutations: int = 500, seed: int = 0,
                         max_samples: int = 500, bandwidth: float | None = None) -> dict[str, Any]:
    """Test whether two feature samples come from one distribution with the kernel MMD.

    Features are standardized on the pooled sample; the Gaussian kernel's bandwidth
    defaults to the median pairwise distance. The statistic is the unbiased MMD²
    estimate; the p-value is ``(1 + #{permuted >= observed}) / (1 + permutations)``.
    Samples larger than ``max_samples`` are subsampled to bound the kernel matrix.

    Returns ``mmd2``, ``p_value``, ``bandwidth``, ``permutations``, ``n_a`` and ``n_b``.
    """
    rng = np.random.default_rng(seed)
    a = _subsample(np.asarray(a, dtype=np.float64), max_samples, rng)
    b = _subsample(np.asarray(b, dtype=np.float64), max_samples, rng)
    if min(len(a), len(b)) < 2:
        raise ValueError(f"the MMD test needs at least 2 samples per group, got {len(a)} and {len(b)}")
    x = np.concatenate([a, b])
    scale = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
    if bandwidth is None:
        squared = np.sum(x * x, axis=1)
        distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2.0 * x @ x.T, 0.0))
        upper = distances[np.triu_indices(len(x), k=1)]
        bandwidth = float(np.median(upper[upper > 0])) if np.any(upper > 0) else 1.0
    kernel = _gaussian_kernel(x, bandwidth)
    in_a = np.zeros(len(x), dtype=bool)
    in_a[: len(a)] = True
    observed = _mmd2_unbiased(kernel, in_a)
    exceed = 0
    for _ in range(permutations):
        if _mmd2_unbiased(kernel, rng.permutation(in_a)) >= observed:
            exceed += 1
    return {"mmd2": observed, "p_value": (1 + exceed) / (1 + permutations), "bandwidth": float(bandwidth),
            "permutations": int(permutations), "n_a": int(len(a)), "n_b": int(len(b))}


def embed_2d(features: np.ndarray, seed: int = 0, max_tsne: int = 2000, tsne: bool = True) -> dict[str, Any]:
    """Project features to 2D with PCA, and with t-SNE where the sample size allows.

    t-SNE runs when ``tsne`` is true for 10 to ``max_tsne`` samples, with a perplexity
    below a third of the sample size. Otherwise ``tsne`` is None and ``tsne_note`` gives the reason.
    """
    x = StandardScaler().fit_transform(np.asarray(features, dtype=np.float64))
    n = len(x)
    pca = PCA(n_components=min(2, x.shape[1], n), random_state=seed).fit(x)
    points = pca.transform(x)
    if points.shape[1] < 2:
        points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    out: dict[str, Any] = {"pca": np.round(points, 4).tolist(),
                           "pca_explained_variance": [float(v) for v in pca.explained_variance_ratio_],
                           "tsne": None}
    if not tsne:
        out["tsne_note"] = "t-SNE not requested"
    elif n < 10:
        out["tsne_note"] = f"t-SNE skipped: {n} samples, fewer than 10"
    elif n > max_tsne:
        out["tsne_note"] = f"t-SNE skipped: {n} samples, more than {max_tsne}"
    else:
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, (n - 1) / 3.0))
        model = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        out["tsne"] = np.round(model.fit_transform(x), 4).tolist()
        out["tsne_perplexity"] = perplexity
    return out


def intensity_histogram(images: list[np.ndarray], bins: int = 32,
                        value_range: tuple[float, float] | None = None) -> dict[str, Any]:
    """Pool the voxel intensities of images into one normalized histogram."""
    values = np.concatenate([np.asarray(im, dtype=np.float64).ravel() for im in images])
    low, high = value_range if value_range is not None else (float(values.min()), float(values.max()))
    if high <= low:
        high = low + 1.0
    density, edges = np.histogram(values, bins=bins, range=(low, high), density=True)
    return {"edges": [float(e) for e in edges], "density": [float(d) for d in density],
            "mean": float(values.mean()), "std": float(values.std()), "n_images": len(images)}


def _compare(reference: np.ndarray, other: np.ndarray, permutations: int, seed: int) -> dict[str, Any]:
    result: dict[str, Any] = {"n": int(len(other))}
    try:
        result["proxy_a_distance"] = proxy_a_distance(reference, other, folds=min(5, len(other), len(reference)),
                                                      seed=seed)
    except ValueError as exc:
        result["proxy_a_distance"] = None
        result["note"] = str(exc)
    try:
        result["mmd"] = mmd_permutation_test(reference, other, permutations=permutations, seed=seed)
    except ValueError as exc:
        result["mmd"] = None
        result["note"] = str(exc)
    return result


def measure_shift(trained: Any, data: str | None = None, permutations: int = 500, seed: int = 0,
                  max_embedding: int = 2000, tsne: bool = True) -> dict[str, Any]:
    """Measure shift between the training split and each evaluated group of a loaded run.

    The reference is the training split of the training sites. It is compared with
    the internal test split of those sites (the shift that the internal test measures)
    and with every image of each external site: the run's target sites, or every site
    of ``data`` when a manifest is given. Features are the model's pooled features;
    intensity histograms use the preprocessed model input. ``tsne`` false skips the
    t-SNE embedding, the slowest step.

    Returns ``reference`` (size), ``comparisons`` (per group: ``proxy_a_distance``
    and ``mmd``), ``embedding`` (2D points with their group, site and label) and
    ``histograms`` (per group).
    """
    m = trained.manifest
    groups: dict[str, tuple[list[dict[str, Any]], str]] = {}
    groups["train"] = (trained.load_items([r for s in trained.source_sites for r in m.select(s, "train")]),
                       "reference")
    groups["internal test"] = (trained.load_items([r for s in trained.source_sites for r in m.select(s, "test")]),
                               "internal")
    if data is None:
        for site in trained.target_sites:
            groups[f"site {site}"] = (trained.load_items(m.select(site)), "external")
    else:
        external = trained.load_manifest(data)
        for site in external.sites:
            groups[f"site {site}"] = (trained.load_items(external.select(site), external), "external")

    features: dict[str, np.ndarray] = {}
    predictions: dict[str, Any] = {}
    for name, (items, _role) in groups.items():
        if not items:
            logger.warning("shift: group %s has no images and is left out", name)
            continue
        predictions[name] = trained.predict(items, with_features=True)
        features[name] = predictions[name]["features"]
    if "train" not in features:
        raise ValueError("shift: the training split has no images, so there is no reference sample")

    comparisons: dict[str, Any] = {}
    for offset, name in enumerate(n for n in features if n != "train"):
        comparisons[name] = {"role": groups[name][1], **_compare(features["train"], features[name],
                                                                   permutations, seed + offset)}
        pad = comparisons[name]["proxy_a_distance"]
        mmd = comparisons[name]["mmd"]
        logger.info("shift train vs %s: proxy A-distance %s, MMD² %s (p = %s)", name,
                    "n/a" if pad is None else f"{pad['pad']:.3f}", "n/a" if mmd is None else f"{mmd['mmd2']:.4f}",
                    "n/a" if mmd is None else f"{mmd['p_value']:.3f}")

    # The embedding plots every group; large groups are subsampled evenly to bound t-SNE's cost.
    rng = np.random.default_rng(seed)
    names = list(features)
    per_group = max(1, max_embedding // max(1, len(names)))
    chosen = {n: np.sort(rng.choice(len(features[n]), size=min(per_group, len(features[n])), replace=False))
              for n in names}
    stacked = np.concatenate([features[n][chosen[n]] for n in names])
    embedding = embed_2d(stacked, seed=seed, max_tsne=max_embedding, tsne=tsne)
    labels = trained.labels
    embedding["group"] = [n for n in names for _ in chosen[n]]
    embedding["site"] = [str(s) for n in names for s in predictions[n]["site"][chosen[n]]]
    embedding["label"] = [labels[int(v)] if v >= 0 else "unlabeled"
                          for n in names for v in predictions[n]["label"][chosen[n]]]

    histograms = {}
    for name, (items, _role) in groups.items():
        if items:
            histograms[name] = intensity_histogram([it["image"].numpy() for it in items])
    return {
        "reference": {"group": "train", "n": int(len(features["train"]))},
        "comparisons": comparisons,
        "embedding": embedding,
        "histograms": histograms,
        "settings": {"permutations": int(permutations), "seed": int(seed), "feature_dim": int(stacked.shape[1])},
    }
