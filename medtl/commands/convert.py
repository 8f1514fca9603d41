"""``medtl convert INPUT... OUTPUT.nii.gz``: write what a source reads as a NIfTI file.

The output contains exactly the voxels and the affine that the ``dicom`` or ``nifti``
source returns, so the command doubles as a way to check the readers with any
NIfTI viewer. Spatial axes come first and channels, when there are several, are
the fourth axis.

The voxels keep the source's order (pydicom's ``pixel_array`` order for DICOM), so the
``nifti`` source, which reorients to RAS by default, returns them in another order.
A study reads both in the same order through ``data.orientation``; with
``data.orientation: null`` and ``data.sources.nifti.orientation: null`` the file reads
back in the source's order. ``--orientation CODES`` writes the voxels reoriented as
``data.orientation: CODES`` would give them to the model.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from medtl.errors import BadFileError, ConfigError, OutputError
from medtl.orientation import check_axcodes, reorient_source_output

__all__ = ["register", "convert_command", "read_input", "parse_options", "source_name_for_path"]

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert DICOM files, a series folder or a NIfTI file to NIfTI, as medtl reads it",
        description="Read INPUT with the dicom or nifti source and write the voxels and affine to OUTPUT "
        "(.nii or .nii.gz). Several INPUT files are read as one DICOM series.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="INPUT... then OUTPUT.nii.gz")
    parser.add_argument("--source", choices=("dicom", "nifti"), default=None,
                        help="source plugin to read with (default: from the suffix; folders are DICOM)")
    parser.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                        help="source option, as under data.sources.NAME in a study, for example "
                        "--option series_number=3 (repeatable)")
    parser.add_argument("--orientation", default=None, metavar="CODES",
                        help="reorient the image to these axis codes, such as RAS or LPS, before writing it, as "
                        "data.orientation does in a study (default: keep the source's voxel order)")
    parser.set_defaults(func=convert_command)


def parse_options(texts: list[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings; values are YAML scalars or lists."""
    import yaml

    options: dict[str, Any] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"invalid --option {text!r}: expected KEY=VALUE, for example series_number=3")
        try:
            options[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid --option {text!r}: the value is not valid YAML: {exc}") from None
    return options


def source_name_for_path(path: Path) -> str:
    """Pick ``nifti`` for ``.nii`` and ``.nii.gz`` files and ``dicom`` for everything else."""
    name = path.name.lower()
    return "nifti" if name.endswith((".nii", ".nii.gz")) else "dicom"


def read_input(paths: list[Path], source_name: str | None, options: dict[str, Any]) -> tuple[np.ndarray, dict]:
    """Read one image: a file, a series folder, or several files of one DICOM series."""
    import medtl

    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise BadFileError(missing[0], "file not found")
    name = source_name or source_name_for_path(paths[0])
    source = medtl.create("source", name, **options)
    if len(paths) == 1:
        return source.read(str(paths[0]))
    if name != "dicom":
        raise ConfigError("several inputs are read as one DICOM series; pass a single NIfTI file")
    info = source.select_series(paths[0].parent, files=sorted(paths))
    return source.read_series(info, paths[0].parent)


def to_nifti(array: np.ndarray, meta: dict[str, Any]) -> Any:
    """Build a NIfTI image with spatial axes first and channels as the fourth axis."""
    import nibabel as nib

    data = np.moveaxis(np.asarray(array, dtype=np.float32), 0, -1)  # (*spatial, C)
    if data.ndim == 3:  # 2D image: add the slice axis before the channels
        data = data[:, :, None, :]
    if data.shape[-1] == 1:
        data = data[..., 0]
    affine = np.asarray(meta.get("affine", np.eye(4)), dtype=np.float64)
    img = nib.Nifti1Image(data, affine)
    # Code 1 (scanner) when the source has the patient frame, else 2 (aligned).
    code = 1 if meta.get("patient_frame", True) else 2
    img.set_sform(affine, code=code)
    img.set_qform(affine, code=code)
    return img


def convert_command(args: argparse.Namespace) -> int:
    if len(args.paths) < 2:
        raise ConfigError("medtl convert needs at least one INPUT and the OUTPUT file: "
                          "medtl convert INPUT... OUTPUT.nii.gz")
    *inputs, output = (Path(p) for p in args.paths)
    if not output.name.lower().endswith((".nii", ".nii.gz")):
        raise ConfigError(f"OUTPUT must end in .nii or .nii.gz, got {output.name!r}")
    codes = _orientation_codes(args.orientation)
    array, meta = read_input(inputs, args.source, parse_options(args.options))
    if codes is not None:
        try:
            array, meta = reorient_source_output(array, meta, codes)
        except ValueError as exc:
            raise BadFileError(str(inputs[0]), f"cannot reorient the image to --orientation {codes}: {exc}. "
                               "Leave out --orientation to write the source's voxel order") from None
    import nibabel as nib

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        nib.save(to_nifti(array, meta), str(output))
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror or exc}. "
                          "Choose an OUTPUT path in a writable folder.") from None
    shape = "x".join(str(s) for s in array.shape)
    print(f"wrote {output}: {meta.get('kind', 'image')} {shape} (channels first), "
          f"spacing {_format_spacing(meta.get('spacing'))} mm")
    return 0


def _orientation_codes(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return check_axcodes(text)
    except ValueError as exc:
        raise ConfigError(f"invalid --orientation {text!r}: {exc}") from None


def _format_spacing(spacing: Any) -> str:
    if not spacing:
        return "unknown"
    return "x".join(f"{float(s):.4g}" for s in spacing)
