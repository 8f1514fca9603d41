"""Builtin image sources: DICOM, NIfTI and MedMNIST .npz arrays."""

from __future__ import annotations

from typing import Any, Callable

import medtl


@medtl.hookimpl
def medtl_register_sources() -> dict[str, Callable[..., Any]]:
    from medtl_plugins.dicom import DicomSource
    from medtl_plugins.nifti import NiftiSource
    from medtl_plugins.npz import NpzSource

    return {"dicom": DicomSource, "nifti": NiftiSource, "npz": NpzSource}
