"""``medtl inspect PATH... [--json]``: report what the sources find in files and folders.

Per file or series it prints the kind, shape, spacing, orientation and intensity
range, or the reason for a skip or failure. Every file found in a folder is named by
its path relative to that folder. It prints geometry and coding only: no patient
name, ID, date or UID.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from medtl.commands.convert import parse_options, source_name_for_path
from medtl.errors import EXIT_DATA, BadFileError, SkippedFile

__all__ = ["register", "inspect_command", "inspect_paths"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect", help="show what medtl reads from DICOM and NIfTI files, series folders and why it skips files",
        description="Read each PATH with the dicom or nifti source and print, per file or series, the kind, "
        "shape, spacing, orientation, intensity range, or the reason for a skip or failure. Exits with 3 "
        "when a file fails.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="file or folder")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    parser.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                        help="dicom source option, as under data.sources.dicom in a study, for example "
                        "--option geometry=fail (repeatable)")
    parser.set_defaults(func=inspect_command)


def _describe(path: Path, series: str | None, read: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": str(path), "series": series}
    try:
        array, meta = read()
    except SkippedFile as exc:
        entry.update(status="skipped", reason=exc.reason)
        return entry
    except BadFileError as exc:
        entry.update(status="failed", reason=exc.reason, file=exc.path)
        return entry
    import nibabel.orientations as nio

    affine = meta.get("affine")
    finite = np.isfinite(array)
    entry.update(
        status="ok",
        kind=meta.get("kind"),
        shape=list(array.shape),
        spacing=[round(float(s), 6) for s in meta.get("spacing", ())],
        # Without a patient frame (radiographs, secondary captures) axis codes would be invented.
        orientation=("".join(str(c) for c in nio.aff2axcodes(affine))
                     if affine is not None and meta.get("patient_frame", True) else None),
        range=[float(array[finite].min()), float(array[finite].max())] if finite.any() else None,
    )
    for key in ("stored_orientation", "modality", "photometric", "transfer_syntax", "gantry_tilt_deg", "warnings",
                "form"):
        if meta.get(key) not in (None, [], ""):
            entry[key] = meta[key]
    return entry


def inspect_paths(paths: list[Path], options: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Inspect files and folders; return one entry per file or series."""
    import medtl

    options = options or {}
    dicom = medtl.create("source", "dicom", **options.get("dicom", {}))
    nifti = medtl.create("source", "nifti", **options.get("nifti", {}))
    entries: list[dict[str, Any]] = []
    for path in paths:
        if not path.exists():
            entries.append({"path": str(path), "series": None, "status": "failed", "reason": "file not found"})
            continue
        if path.is_file():
            source = nifti if source_name_for_path(path) == "nifti" else dicom
            entries.append(_describe(path, None, lambda p=path, s=source: s.read(str(p))))
            continue
        entries.extend(_inspect_folder(path, dicom, nifti))
    return entries


def _inspect_folder(folder: Path, dicom: Any, nifti: Any) -> list[dict[str, Any]]:
    """Describe every file under ``folder``: NIfTI images, DICOM series, then the files left out.

    Each entry's ``files`` lists its files relative to ``folder``. An entry's ``path`` is
    the file itself, or for a series of several files the folder that contains them all.
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        return [{"path": str(folder), "series": None, "files": [], "status": "skipped",
                 "reason": "the folder contains no files"}]

    def relative(path: Path) -> str:
        return path.relative_to(folder).as_posix()

    nifti_files = [p for p in files if source_name_for_path(p) == "nifti"]
    entries = []
    for path in nifti_files:
        entry = _describe(path, None, lambda p=path: nifti.read(str(p)))
        entries.append({**entry, "files": [relative(path)]})

    others = [p for p in files if p not in set(nifti_files)]
    left_out: list[BadFileError] = []
    series, _ = dicom.scan_files(others, left_out=left_out)
    for info in series:
        where = info.paths[0] if len(info.paths) == 1 else _common_folder(info.paths)
        entry = _describe(where, info.label, lambda i=info: dicom.read_series(i, folder))
        entries.append({**entry, "files": [relative(p) for p in info.paths]})

    for error in left_out:
        status = "skipped" if isinstance(error, SkippedFile) else "failed"
        reason = error.reason
        if status == "skipped" and reason.startswith("not a DICOM file"):
            reason = "neither DICOM nor NIfTI"
        entries.append({"path": error.path, "series": None, "files": [relative(Path(error.path))],
                        "status": status, "reason": reason})
    return entries


def _common_folder(paths: list[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def _format_files(files: list[str]) -> str:
    if len(files) <= 3:
        return ", ".join(files)
    return f"{files[0]} .. {files[-1]} ({len(files)} files)"


def _format(entry: dict[str, Any]) -> str:
    files = entry.get("files") or []
    several = len(files) > 1
    # The series label is shown only for a series of several files, whose path is their folder.
    where = entry["path"] + (f" [{entry['series']}]" if entry.get("series") and several else "")
    if entry["status"] != "ok":
        line = f"{where}: {entry['status'].upper()}: {entry['reason']}"
        if entry.get("file") and entry["file"] != entry["path"]:
            line += f" (file {entry['file']})"
    else:
        parts = [entry.get("kind") or "image", "x".join(str(s) for s in entry["shape"])]
        if entry.get("spacing"):
            parts.append("spacing " + "x".join(f"{s:.4g}" for s in entry["spacing"]) + " mm")
        if entry.get("orientation"):
            stored = entry.get("stored_orientation")
            # The nifti source reorients on reading, so a file's own axis order can differ.
            parts.append(f"orientation {entry['orientation']}"
                         + (f" (stored {stored})" if stored and stored != entry["orientation"] else ""))
        if entry.get("range"):
            parts.append(f"range {entry['range'][0]:.6g}..{entry['range'][1]:.6g}")
        for key in ("modality", "photometric", "transfer_syntax"):
            if entry.get(key):
                parts.append(str(entry[key]))
        line = f"{where}: " + ", ".join(parts)
    if several:
        line += f"\n    files: {_format_files(files)}"
    for warning in entry.get("warnings", []):
        line += f"\n    warning: {warning}"
    return line


def inspect_command(args: argparse.Namespace) -> int:
    options = parse_options(args.options)
    entries = inspect_paths([Path(p) for p in args.paths], {"dicom": options} if options else None)
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        for entry in entries:
            print(_format(entry))
    return EXIT_DATA if any(e["status"] == "failed" for e in entries) else 0
