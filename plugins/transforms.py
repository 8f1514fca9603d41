"""Builtin augmentation presets, built from MONAI dictionary transforms."""

from __future__ import annotations

import math
from typing import Any, Callable

import medtl


def _none(data: Any) -> list:
    return []


def _default(data: Any, flip: bool = True, rotate_degrees: float = 10.0, scale: float = 0.1,
             noise_std: float = 0.02, contrast: bool = True) -> list:
    """Mild geometric and intensity augmentation suited to most 2D and 3D studies."""
    from monai.transforms import RandAdjustContrastd, RandAffined, RandFlipd, RandGaussianNoised

    dims = data.spatial_dims
    angle = math.radians(rotate_degrees)
    transforms: list = []
    if flip:
        transforms.append(RandFlipd(keys="image", prob=0.5, spatial_axis=dims - 1))
    transforms.append(
        RandAffined(
            keys="image",
            prob=0.5,
            rotate_range=(angle,) if dims == 2 else (angle, angle, angle),
            scale_range=(scale,) * dims,
            padding_mode="border",
        )
    )
    if contrast:
        transforms.append(RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.8, 1.25)))
    if noise_std > 0:
        transforms.append(RandGaussianNoised(keys="image", prob=0.3, std=noise_std))
    return transforms


@medtl.hookimpl
def medtl_register_transforms() -> dict[str, Callable[..., Any]]:
    return {"default": _default, "none": _none}
