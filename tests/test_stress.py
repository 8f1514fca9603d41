"""Tests of the site-shift simulator."""

from __future__ import annotations

import numpy as np
import pytest

from medtl.stress import DEFAULT_SHIFTS, SEVERITIES, SHIFTS, apply_shift


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    # A smooth ramp plus texture, in CT-like units, so every shift has something to change.
    ramp = np.linspace(0.0, 400.0, 48, dtype=np.float32)[None, None, :]
    return (ramp + 100.0 * rng.random((1, 48, 48))).astype(np.float32)


def _change(before: np.ndarray, after: np.ndarray) -> float:
    return float(np.abs(after - before).mean() / np.ptp(before))


def test_every_shift_has_five_levels():
    for name, shift in SHIFTS.items():
        assert len(shift.levels) == SEVERITIES, name


def test_kspace_spikes_not_in_defaults():
    assert "kspace_spikes" not in DEFAULT_SHIFTS
    assert SHIFTS["kspace_spikes"].mr_only


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_severity_zero_is_identity(image, name):
    assert apply_shift(image, name, 0, (32, 32)) is image


@pytest.mark.parametrize("name", sorted(set(SHIFTS) - {"downsample"}))
def test_change_grows_with_severity(image, name):
    changes = [_change(image, apply_shift(image, name, s, (32, 32), seed=1)) for s in range(1, SEVERITIES + 1)]
    assert changes[0] > 0, f"{name} at severity 1 left the image unchanged"
    assert changes[-1] > changes[0], f"{name}: change {changes}"
    assert all(b >= a * 0.9 for a, b in zip(changes, changes[1:])), f"{name}: change {changes}"


def test_downsample_reduces_resolution(image):
    sizes = [apply_shift(image, "downsample", s, (32, 32)).shape[1:] for s in range(1, SEVERITIES + 1)]
    assert sizes[0] == (21, 21)
    assert sizes[-1] == (5, 5)
    assert all(b[0] < a[0] for a, b in zip(sizes, sizes[1:]))


def test_shift_is_reproducible(image):
    first = apply_shift(image, "gaussian_noise", 3, (32, 32), seed=7)
    second = apply_shift(image, "gaussian_noise", 3, (32, 32), seed=7)
    other = apply_shift(image, "gaussian_noise", 3, (32, 32), seed=8)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_shift_keeps_shape_and_dtype(image):
    out = apply_shift(image, "bias_field", 2, (32, 32))
    assert out.shape == image.shape
    assert out.dtype == np.float32


def test_unknown_shift_and_severity_rejected(image):
    with pytest.raises(ValueError, match="unknown shift 'fog'"):
        apply_shift(image, "fog", 1, (32, 32))
    with pytest.raises(ValueError, match="severity must be between 0 and 5"):
        apply_shift(image, "blur", 6, (32, 32))
