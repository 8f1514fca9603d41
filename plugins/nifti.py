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
            img = nib.as_closest_canonical(nib.load(path))
            data = np.asarray(img.get_fdata(dtype=np.float32))
        except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as exc:
            raise BadFileError(path, f"not a readable NIfTI file: {exc}") from exc
        spacing = tuple(float(z) for z in img.header.get_zooms()[: data.ndim])
        return np.ascontiguousarray(data[None]), {"spacing": spacing, "affine": img.affine, "kind": "nifti"}
