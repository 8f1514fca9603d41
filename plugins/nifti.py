"""The ``nifti`` source: NIfTI-1 and NIfTI-2 files read with nibabel.

nibabel 5 (``Nifti1Header.get_best_affine``) takes the sform when sform_code is not 0,
else the qform when qform_code is not 0, else a scaling by the voxel sizes. nibabel also
applies scl_slope and scl_inter, and treats a slope of 0 or NaN as no scaling. The source then reorients the voxels to one canonical orientation
(RAS by default) so that files from different sites have the same axis order and
direction.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medtl.errors import BadFileError, ConfigError
from medtl.orientation import check_axcodes, reorient

__all__ = ["NiftiOptions", "NiftiSource", "reorient"]

logger = logging.getLogger(__name__)


class NiftiOptions(BaseModel):
    """Options of the ``nifti`` source, set under ``data.sources.nifti`` in a study file."""

    model_config = ConfigDict(extra="forbid")

    orientation: str | None = Field(
        "RAS", description="axis codes of the canonical orientation, such as RAS or LPS; null keeps the "
        "file's voxel order")
    volume: int | None = Field(
        None, description="for 4D files, the index of the volume to read (0 is the first); null reads all "
        "volumes as channels")
    nan_policy: Literal["fail", "zero", "min"] = Field(
        "fail", description="what to do with NaN or infinite voxels: fail, replace them with 0, or replace "
        "them with the minimum finite value")

    @field_validator("orientation")
    @classmethod
    def _check_orientation(cls, value: str | None) -> str | None:
        return None if value is None else check_axcodes(value)


class NiftiSource:
    """Read a ``.nii`` or ``.nii.gz`` file as float32 ``(C, X, Y, Z)`` in the canonical orientation.

    A 2D file (or one with a single slice) keeps its third axis of size 1; the
    preprocessor drops it for a 2D study.

    Args:
        **options: the fields of :class:`NiftiOptions`.
    """

    cacheable = True

    def __init__(self, **options: Any):
        try:
            self.options = NiftiOptions(**options)
        except ValidationError as exc:
            problems = [("data.sources.nifti." + ".".join(str(p) for p in err["loc"]), err["msg"])
                        for err in exc.errors()]
            raise ConfigError("invalid options for the nifti source", problems) from None

    def describe(self) -> str:
        """Return the options that change the output, for cache keys."""
        return "nifti:" + self.options.model_dump_json()

    def read(self, path: str) -> tuple[np.ndarray, dict[str, Any]]:
        """Read one file.

        Raises:
            BadFileError: for a missing or unreadable file, an unsupported shape, or
                NaN or infinite voxels under ``nan_policy: fail``.
        """
        import nibabel as nib

        if not Path(path).is_file():
            raise BadFileError(path, "file not found")
        try:
            img = nib.load(path)
            if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
                raise BadFileError(path, f"not a NIfTI image but {type(img).__name__}")
            linear = np.asarray(img.affine, dtype=np.float64)[:3, :3]
            if not np.isfinite(linear).all() or abs(np.linalg.det(linear)) < 1e-12:
                raise BadFileError(path, "the affine is singular (zero or degenerate voxel axes), so the "
                                   "image orientation is unknown; fix the header's sform/qform")
            data = np.asarray(img.get_fdata(dtype=np.float32))
        except BadFileError:
            raise
        except (OSError, EOFError, ValueError, MemoryError, nib.filebasedimages.ImageFileError) as exc:
            raise BadFileError(path, f"not a readable NIfTI file: {type(exc).__name__}: {exc}") from None
        affine = np.asarray(img.affine, dtype=np.float64)
        import nibabel.orientations as nio

        stored = "".join(nio.aff2axcodes(affine))
        data = self._select_volumes(data, path)  # (X, Y, Z, C)
        if self.options.orientation is not None:
            data, affine = reorient(data, affine, self.options.orientation)
        data = self._apply_nan_policy(data, path)
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        array = np.ascontiguousarray(np.moveaxis(data, -1, 0), dtype=np.float32)
        meta = {
            "kind": "nifti",
            "spacing": tuple(float(z) for z in zooms),
            "affine": affine,
            "orientation": "".join(nio.aff2axcodes(affine)),
            "stored_orientation": stored,
            "shape": tuple(array.shape),
            "form": _affine_source(img),
        }
        return array, meta

    def _select_volumes(self, data: np.ndarray, path: str) -> np.ndarray:
        while data.ndim < 3:
            data = data[..., None]
        if data.ndim == 3:
            return data[..., None]
        if data.ndim > 4:
            extra = data.shape[4:]
            if all(s == 1 for s in extra):
                data = data.reshape(data.shape[:4])
            else:
                raise BadFileError(path, f"image has shape {data.shape}; only 3D and 4D NIfTI files are read")
        volumes = data.shape[3]
        index = self.options.volume
        if index is None:
            return data
        if not -volumes <= index < volumes:
            raise BadFileError(path, f"data.sources.nifti.volume is {index} but the file has {volumes} volumes")
        return data[..., index : index + 1] if index != -1 else data[..., -1:]

    def _apply_nan_policy(self, data: np.ndarray, path: str) -> np.ndarray:
        finite = np.isfinite(data)
        if finite.all():
            return data
        bad = int(data.size - finite.sum())
        policy = self.options.nan_policy
        if policy == "fail":
            raise BadFileError(path, f"{bad} voxels are NaN or infinite; set data.sources.nifti.nan_policy "
                                     "to zero or min to replace them")
        fill = 0.0 if policy == "zero" or not finite.any() else float(data[finite].min())
        logger.warning("replaced %d NaN or infinite voxels with %g (nan_policy %s)", bad, fill, policy)
        return np.where(finite, data, np.float32(fill))


def _affine_source(img: Any) -> str:
    """Name the header field that nibabel took the affine from."""
    header = img.header
    if int(header["sform_code"]) > 0:
        return "sform"
    if int(header["qform_code"]) > 0:
        return "qform"
    return "voxel sizes"
