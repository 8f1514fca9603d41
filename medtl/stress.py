"""A site-shift simulator: scanner-like changes at five severities, built from MONAI transforms.

Each named shift changes an image the way a different scanner, protocol or
reconstruction could: a smooth bias field, a gamma curve, a narrower intensity
window, Gaussian or Rician noise, blur, a lower acquired resolution, or k-space
spikes (an MR artifact). A shift applies to the image as its source plugin reads
it, before the run's preprocessing, so resizing and intensity scaling then act
on it as they would on a real scan from another site. Severity 0 is the unshifted
image; severities 1 to 5 strengthen the change step by step.

Running a trained model on shifted copies of its internal test set and plotting
AUC against severity shows which scanner differences would hurt it before any
external data exists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["SHIFTS", "DEFAULT_SHIFTS", "SEVERITIES", "SiteShift", "apply_shift", "stress_test"]

logger = logging.getLogger(__name__)

#: Number of severity levels after the unshifted level 0.
SEVERITIES = 5


@dataclass(frozen=True)
class SiteShift:
    """A named shift: its parameter per severity 1..5 and what the parameter means."""

    name: str
    parameter: str
    levels: tuple[float, ...]
    description: str
    mr_only: bool = False


SHIFTS: dict[str, SiteShift] = {s.name: s for s in (
    SiteShift("bias_field", "polynomial coefficient", (0.05, 0.1, 0.2, 0.3, 0.4),
              "smooth multiplicative intensity inhomogeneity (MONAI RandBiasField, degree 3)"),
    SiteShift("gamma", "gamma", (1.25, 1.5, 2.0, 2.5, 3.0),
              "non-linear intensity curve (MONAI AdjustContrast)"),
    SiteShift("contrast", "percentile clipped at each end", (1.0, 2.5, 5.0, 10.0, 15.0),
              "narrower intensity window that saturates both tails (MONAI ScaleIntensityRangePercentiles)"),
    SiteShift("gaussian_noise", "noise std / intensity range", (0.01, 0.025, 0.05, 0.1, 0.2),
              "additive Gaussian noise (MONAI RandGaussianNoise)"),
    SiteShift("rician_noise", "noise std / intensity range", (0.01, 0.025, 0.05, 0.1, 0.2),
              "Rician noise of magnitude MR images (MONAI RandRicianNoise)"),
    SiteShift("blur", "Gaussian sigma in model-input pixels", (0.5, 1.0, 1.5, 2.0, 3.0),
              "blur of a softer reconstruction kernel (MONAI GaussianSmooth)"),
    SiteShift("downsample", "resolution reduction factor", (1.5, 2.0, 3.0, 4.0, 6.0),
              "lower acquired resolution, resized back by the run's preprocessing (MONAI Resize)"),
    SiteShift("kspace_spikes", "spike log-magnitude / mean log-magnitude", (1.2, 1.3, 1.4, 1.5, 1.6),
              "herringbone artifact from k-space spikes (MONAI RandKSpaceSpikeNoise)", mr_only=True),
)}

#: Shifts that ``medtl shift`` runs by default. K-space spikes are MR-only, so they are not in this list.
DEFAULT_SHIFTS: tuple[str, ...] = tuple(n for n, s in SHIFTS.items() if not s.mr_only)


def _range(image: np.ndarray) -> tuple[float, float]:
    return float(image.min()), float(image.max())


def _with_random(transform: Any, seed: int) -> Any:
    transform.set_random_state(seed=seed)
    return transform


def _build(name: str, value: float, image: np.ndarray, target_size: tuple[int, ...], seed: int) -> Callable:
    from monai import transforms as T

    low, high = _range(image)
    span = max(high - low, 1e-6)
    spatial = image.shape[1:]
    # Sizes are given relative to the model input, so one severity means the same on any scan size.
    zoom = float(np.mean([s / t for s, t in zip(spatial, target_size)]))

    if name == "bias_field":
        field = _with_random(T.RandBiasField(degree=3, coeff_range=(value, value), prob=1.0), seed)
        # The field multiplies intensities, so it acts on a non-negative copy of the image.
        return lambda x: field(x - low) + low
    if name == "gamma":
        return T.AdjustContrast(gamma=value)
    if name == "contrast":
        return T.ScaleIntensityRangePercentiles(lower=value, upper=100.0 - value, b_min=low, b_max=high, clip=True)
    if name == "gaussian_noise":
        return _with_random(T.RandGaussianNoise(prob=1.0, std=value * span, sample_std=False), seed)
    if name == "rician_noise":
        rician = _with_random(T.RandRicianNoise(prob=1.0, std=value * span, sample_std=False), seed)
        return lambda x: rician(x - low) + low
    if name == "blur":
        return T.GaussianSmooth(sigma=value * zoom)
    if name == "downsample":
        size = tuple(max(4, int(round(s / value))) for s in target_size)
        return T.Resize(spatial_size=size, mode="area" if len(size) == 2 else "trilinear")
    if name == "kspace_spikes":
        spectrum = np.abs(np.fft.fftshift(np.fft.fftn(image[0])))
        mean_log = float(np.log(spectrum[spectrum > 0]).mean())
        return _with_random(T.RandKSpaceSpikeNoise(prob=1.0, intensity_range=(value * mean_log, value * mean_log)),
                            seed)
    raise ValueError(f"unknown shift {name!r}; valid shifts: {', '.join(SHIFTS)}")


def apply_shift(image: np.ndarray, name: str, severity: int, target_size: tuple[int, ...],
                seed: int = 0) -> np.ndarray:
    """Apply shift ``name`` at ``severity`` (0 to 5) to a channel-first image.

    Args:
        image: the image as its source read it, channel axis first.
        name: a key of :data:`SHIFTS`.
        severity: 0 returns the image unchanged; 1 to 5 use the shift's levels.
        target_size: the model's input size (``data.image_size``), which sizes blur
            and down-sampling.
        seed: seed of the random transforms, so a severity sweep is reproducible.
    """
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; valid shifts: {', '.join(SHIFTS)}")
    if not 0 <= severity <= SEVERITIES:
        raise ValueError(f"severity must be between 0 and {SEVERITIES}, got {severity}")
    if severity == 0:
        return image
    transform = _build(name, SHIFTS[name].levels[severity - 1], image, target_size, seed)
    out = transform(torch.as_tensor(image, dtype=torch.float32))
    return np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out, dtype=np.float32)


def stress_test(trained: Any, shifts: list[str] | tuple[str, ...] = DEFAULT_SHIFTS, data: str | None = None,
                seed: int = 0) -> dict[str, Any]:
    """Evaluate a loaded run on shifted copies of its test images at every severity.

    The images are the internal test split of the training sites, or every labeled
    row of ``data`` when a manifest is given. Returns, per shift, the severities, the
    parameter values, AUC, accuracy and balanced accuracy at each severity.
    """
    from medtl.evaluation import compute_metrics

    unknown = [s for s in shifts if s not in SHIFTS]
    if unknown:
        raise ValueError(f"unknown shift(s) {unknown}; valid shifts: {', '.join(SHIFTS)}")
    if data is None:
        manifest = trained.manifest
        rows = [r for s in trained.source_sites for r in manifest.select(s, "test") if r.label is not None]
        described = "internal test split of " + ", ".join(trained.source_sites)
    else:
        manifest = trained.load_manifest(data)
        rows = [r for r in manifest.rows if r.label is not None]
        described = f"labeled rows of {data}"
    if not rows:
        raise ValueError(f"stress test: no labeled images in the {described}")

    from medtl.errors import BadFileError

    raw: list[tuple[Any, np.ndarray]] = []
    for row in rows:
        try:
            raw.append((row, trained.read_raw(row)))
        except BadFileError as exc:
            logger.warning("stress test: left out manifest row %d: %s", row.index + 2, exc.reason)
    target_size = tuple(trained.study.data.image_size)
    labels = np.array([manifest.label_index(r.label) for r, _ in raw])

    def evaluate(name: str | None, severity: int) -> dict[str, float | None]:
        items = []
        for i, (row, image) in enumerate(raw):
            shifted = image if name is None else apply_shift(image, name, severity, target_size, seed + i)
            tensor = trained.preprocessor(shifted, row.path)
            items.append({"image": tensor, "label": int(labels[i]), "row": row.index, "site": row.site})
        preds = trained.predict(items)
        return compute_metrics(preds["label"], preds["probs"], None)

    baseline = evaluate(None, 0)
    results: dict[str, Any] = {}
    for name in shifts:
        spec = SHIFTS[name]
        curve: dict[str, Any] = {"severity": list(range(SEVERITIES + 1)), "parameter_name": spec.parameter,
                 "parameter": [0.0, *spec.levels], "description": spec.description,
                 "auc": [baseline["auc"]], "accuracy": [baseline["accuracy"]],
                 "balanced_accuracy": [baseline["balanced_accuracy"]]}
        for severity in range(1, SEVERITIES + 1):
            values = evaluate(name, severity)
            for key in ("auc", "accuracy", "balanced_accuracy"):
                curve[key].append(values[key])
        results[name] = curve
        logger.info("stress %s: AUC %s", name,
                    " ".join("n/a" if v is None else f"{v:.3f}" for v in curve["auc"]))
    return {"images": described, "n_images": len(raw), "seed": int(seed), "shifts": results}
