"""The ``dicom`` source: single DICOM images (2D) read with pydicom."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medtl.errors import BadFileError, SkippedFile

__all__ = ["DicomSource"]


class DicomSource:
    """Read a DICOM image file into a float32 array with the channel axis first.

    The modality LUT (RescaleSlope, RescaleIntercept) is applied and MONOCHROME1
    images are inverted so that higher values are brighter, as in MONOCHROME2.
    """

    def __init__(self, invert_monochrome1: bool = True):
        self.invert_monochrome1 = invert_monochrome1

    def read(self, path: str) -> tuple[np.ndarray, dict[str, Any]]:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import apply_modality_lut

        if not Path(path).is_file():
            raise BadFileError(path, "file not found")
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise BadFileError(path, f"not a readable DICOM file: {exc}") from exc
        if "PixelData" not in ds:
            modality = ds.get("Modality", "unknown")
            raise SkippedFile(path, f"DICOM object without pixel data (Modality {modality})")
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for undecodable data
            raise BadFileError(path, f"pixel data could not be decoded: {exc}") from exc
        array = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        if photometric == "MONOCHROME1" and self.invert_monochrome1:
            array = array.max() + array.min() - array
        samples = int(ds.get("SamplesPerPixel", 1))
        if samples == 1:
            array = array[None]
        else:
            array = np.moveaxis(array, -1, 0)
        spacing = tuple(float(s) for s in ds.get("PixelSpacing", [1.0, 1.0]))
        if not all(np.isfinite(s) and s > 0 for s in spacing):
            raise BadFileError(path, f"PixelSpacing is {list(spacing)}; spacings must be positive")
        return np.ascontiguousarray(array), {"spacing": spacing, "kind": "dicom"}
