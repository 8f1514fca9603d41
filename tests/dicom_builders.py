"""Builders of small synthetic DICOM files for the tests (imported by test modules)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def make_dataset(pixels: np.ndarray | None, *, sop_class: str = CT_IMAGE_STORAGE, modality: str = "CT",
                 photometric: str = "MONOCHROME2", slope: float | None = None, intercept: float | None = None,
                 series_uid: str | None = None, series_number: int = 1, instance: int = 1,
                 position: tuple[float, float, float] | None = None,
                 orientation: tuple[float, ...] | None = (1, 0, 0, 0, 1, 0),
                 spacing: tuple[float, float] = (0.8, 0.8), identifiers: dict[str, Any] | None = None) -> Any:
    """Build an in-memory DICOM dataset with explicit VR little endian file meta."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance
    ds.Modality = modality
    for keyword, value in (identifiers or {}).items():
        setattr(ds, keyword, value)
    if pixels is None:
        return ds
    pixels = np.asarray(pixels)
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1 if pixels.ndim == 2 else pixels.shape[2]
    ds.PhotometricInterpretation = photometric
    if ds.SamplesPerPixel > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if np.issubdtype(pixels.dtype, np.signedinteger) else 0
    ds.PixelSpacing = list(spacing)
    if orientation is not None:
        ds.ImageOrientationPatient = list(orientation)
    if position is not None:
        ds.ImagePositionPatient = list(position)
        ds.SliceThickness = 1.0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0.0
    ds.PixelData = pixels.tobytes()
    return ds


def save(ds: Any, path: Path) -> Path:
    """Write a dataset with a preamble and file meta, as a conformant DICOM file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, volume: np.ndarray, *, step: float = 2.5, origin: float = -40.0,
                 names: list[str] | None = None, instances: list[int] | None = None,
                 positions: list[tuple[float, float, float]] | None = None,
                 series_uid: str | None = None, series_number: int = 1,
                 identifiers: dict[str, Any] | None = None) -> list[Path]:
    """Write one file per slice of ``volume`` (slices, rows, columns), axial, as int16 CT."""
    from pydicom.uid import generate_uid

    series_uid = series_uid or generate_uid()
    paths = []
    for k, plane in enumerate(volume):
        position = positions[k] if positions else (-10.0, -20.0, origin + k * step)
        ds = make_dataset(plane.astype(np.int16), slope=1.0, intercept=-1024.0, series_uid=series_uid,
                          series_number=series_number, instance=instances[k] if instances else k + 1,
                          position=position, identifiers=identifiers)
        name = names[k] if names else f"slice{k:03d}.dcm"
        paths.append(save(ds, folder / name))
    return paths
