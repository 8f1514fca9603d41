"""Builtin augmentation presets, built from MONAI dictionary transforms."""

from __future__ import annotations

import math
from typing import Any, Callable

import medtl


def _none(data: Any) -> list:
    return []


def _default(data: Any, flip: bool = True, rotate_degrees: float = 10.0, scale: float = 0.1,
             noise_std: float = 0.02, contrast: bool = True, flip_axes: list[int] | None = None) -> list:
    """Mild geometric and intensity augmentation suited to most 2D and 3D studies.

    ``flip`` flips half of the images along the last spatial axis (left to right in a
    2D study in display order). ``flip_axes`` lists the spatial axes instead, each
    flipped independently with probability 0.5; 0 is the first spatial axis.
    """
    from monai.transforms import RandAdjustContrastd, RandAffined, RandFlipd, RandGaussianNoised

    dims = data.spatial_dims
    angle = math.radians(rotate_degrees)
    transforms: list = []
    if flip_axes is not None:
        bad = [axis for axis in flip_axes if not 0 <= axis < dims]
        if bad:
            raise ValueError(f"transforms.options.flip_axes lists {bad}, but a {dims}D study has spatial axes "
                             f"0 to {dims - 1}")
        transforms.extend(RandFlipd(keys="image", prob=0.5, spatial_axis=axis) for axis in flip_axes)
    elif flip:
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
