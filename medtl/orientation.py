"""Reorientation of images by their affine, shared by the nifti source and the preprocessor.

An affine follows nibabel's convention: a 4x4 matrix from voxel indices, in array
order, to RAS+ world millimetres. Axis codes name the direction in which each array
axis increases, as ``nibabel.orientations.aff2axcodes`` returns them: ``"RAS"`` means
that the first axis runs toward the patient's right, the second toward anterior and
the third toward superior. DICOM's LPS patient frame is ``"LPS"`` in these codes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_axcodes", "reorient", "reorient_image", "reorient_source_output", "axcodes_of"]

_AXIS_PAIRS = ({"L", "R"}, {"A", "P"}, {"S", "I"})


def check_axcodes(value: str) -> str:
    """Validate three axis codes, one of each of L/R, A/P and S/I, and return them upper-case.

    Raises:
        ValueError: naming the invalid value.
    """
    codes = value.upper()
    if len(codes) != 3 or any(len({c for c in codes if c in pair}) != 1 for pair in _AXIS_PAIRS):
        raise ValueError(f"expected three axis codes, one of each of L/R, A/P and S/I, got {value!r}")
    return codes


def axcodes_of(affine: np.ndarray) -> str:
    """Return the axis codes of an affine's first three voxel axes, such as ``"LPS"``."""
    import nibabel.orientations as nio

    return "".join(nio.aff2axcodes(affine))


def reorient(data: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """Flip and permute the first three axes of ``data`` into the axis codes, with the new affine.

    Axes after the third (channels, volumes) keep their place. The new affine maps the
    new voxel indices to the same world points.
    """
    import nibabel.orientations as nio

    current = nio.io_orientation(affine)
    target = nio.axcodes2ornt(tuple(codes))
    transform = nio.ornt_transform(current, target)
    out = nio.apply_orientation(data, transform)
    new_affine = affine @ nio.inv_ornt_aff(transform, data.shape[:3])
    return out, new_affine


def reorient_image(array: np.ndarray, affine: np.ndarray,
                   codes: str) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Reorient a channels-first image ``(C, *spatial)`` with 2 or 3 spatial axes.

    A 2D image ``(C, H, W)`` is treated as one slice: its affine is 4x4, and its third
    column is the slice axis, as the dicom source builds it. The slice axis is dropped
    again after reorienting, so the result is 2D too, and the returned affine keeps
    the dropped slice axis as its third column.

    Returns:
        The reoriented array, its affine, and for each output spatial axis the input
        spatial axis it comes from. For a 2D image these are 0 and 1, in some order,
        because the slice axis is dropped.

    Raises:
        ValueError: when the array is not 2D or 3D, or the affine is not a finite 4x4
            matrix with independent voxel axes.
    """
    import nibabel.orientations as nio

    affine = np.asarray(affine, dtype=np.float64)
    spatial = array.ndim - 1
    if spatial not in (2, 3):
        raise ValueError(f"only 2D and 3D images are reoriented, got an array of shape {array.shape}")
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"the affine must be a finite 4x4 matrix, got shape {affine.shape}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError("the affine is singular (zero or parallel voxel axes), so the orientation is unknown")

    current = nio.io_orientation(affine)
    transform = nio.ornt_transform(current, nio.axcodes2ornt(tuple(codes)))
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        # Already in order, as the nifti source's output is by default: no copy.
        return array, affine, tuple(range(spatial))

    data = np.moveaxis(array, 0, -1)  # (*spatial, C)
    if spatial == 2:
        data = data[:, :, None, :]  # the slice axis, before the channels
    out = nio.apply_orientation(data, transform)
    new_affine = affine @ nio.inv_ornt_aff(transform, data.shape[:3])

    # transform[i, 0] is the output axis that input axis i moves to.
    source_axes = [0, 0, 0]
    for input_axis, output_axis in enumerate(transform[:, 0].astype(int)):
        source_axes[output_axis] = input_axis
    if spatial == 2:
        slice_axis = int(transform[2, 0])
        out = np.squeeze(out, axis=slice_axis)
        in_plane_axes = [axis for axis in range(3) if axis != slice_axis]
        new_affine = new_affine[:, [*in_plane_axes, slice_axis, 3]]
        source_axes = [source_axes[axis] for axis in in_plane_axes]
    result = np.ascontiguousarray(np.moveaxis(out, -1, 0))
    return result, new_affine, tuple(source_axes)


def reorient_source_output(array: np.ndarray, meta: dict[str, Any],
                           codes: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Reorient a source's ``(array, meta)`` by ``meta["affine"]``, as :func:`reorient_image` does.

    Returns the new array and a copy of ``meta`` with the affine, axis codes, shape and
    spacing of the new array.

    Raises:
        ValueError: when ``meta`` has no affine, or as :func:`reorient_image` does.
    """
    affine = meta.get("affine")
    if affine is None:
        raise ValueError("the source reported no affine, so the orientation is unknown")
    out, new_affine, source_axes = reorient_image(array, affine, codes)
    new_meta = dict(meta, affine=new_affine, orientation=axcodes_of(new_affine), shape=tuple(out.shape))
    spacing = meta.get("spacing")
    if spacing is not None and len(spacing) == len(source_axes):
        new_meta["spacing"] = tuple(spacing[axis] for axis in source_axes)
    return out, new_meta
