"""The ``nifti`` source: NIfTI-1 and NIfTI-2 files read with nibabel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medtl.errors import BadFileError

__all__ = ["NiftiSource"]


class NiftiSource:
    """Read a ``.nii`` or ``.nii.gz`` file, reoriented to RAS, as float32 with a channel axis.

    nibabel applies scl_slope and scl_inter and picks the sform or qform affine.
    """

    def read(self, path: str) -> tuple[np.ndarray, dict[str, Any]]:
        import nibabel as nib

        if not Path(path).is_file():
            raise BadFileError(path, "file not found")
        try:
            img = nib.load(path)
            linear = np.asarray(img.affine, dtype=np.float64)[:3, :3]
            if not np.isfinite(linear).all() or abs(np.linalg.det(linear)) < 1e-12:
                raise BadFileError(path, "the affine is singular (zero or degenerate voxel axes), so the "
                                   "image orientation is unknown; fix the header's sform/qform")
            img = nib.as_closest_canonical(img)
            data = np.asarray(img.get_fdata(dtype=np.float32))
        except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as exc:
            raise BadFileError(path, f"not a readable NIfTI file: {exc}") from exc
        spacing = tuple(float(z) for z in img.header.get_zooms()[: data.ndim])
        return np.ascontiguousarray(data[None]), {"spacing": spacing, "affine": img.affine, "kind": "nifti"}
