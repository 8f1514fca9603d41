"""``medtl inspect PATH... [--json]``: report what the sources find in files and folders.

Per file or series it prints the kind, shape, spacing, orientation and intensity
range, or the reason for a skip or failure. It prints geometry and coding only:
no patient name, ID, date or UID.
"""

from __future__ import annotations

import argparse
import json
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
    for key in ("modality", "photometric", "transfer_syntax", "gantry_tilt_deg", "warnings", "form"):
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
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    nifti_files = [p for p in files if source_name_for_path(p) == "nifti"]
    entries = [_describe(p, None, lambda p=p: nifti.read(str(p))) for p in nifti_files]
    others = [p for p in files if p not in set(nifti_files)]
    try:
        series, counts = dicom.scan_files(others)
    except BadFileError as exc:
        return entries + [{"path": str(folder), "series": None, "status": "failed", "reason": exc.reason,
                           "file": exc.path}]
    for info in series:
        entries.append(_describe(folder, info.label, lambda i=info: dicom.read_series(i, folder)))
    if counts["no_pixels"]:
        entries.append({"path": str(folder), "series": None, "status": "skipped",
                        "reason": f"{counts['no_pixels']} DICOM objects without pixel data"})
    if counts["not_dicom"] and not series and not nifti_files:
        entries.append({"path": str(folder), "series": None, "status": "skipped",
                        "reason": f"{counts['not_dicom']} files are neither DICOM nor NIfTI"})
    return entries


def _format(entry: dict[str, Any]) -> str:
    where = entry["path"] + (f" [{entry['series']}]" if entry.get("series") else "")
    if entry["status"] != "ok":
        return f"{where}: {entry['status'].upper()}: {entry['reason']}"
    parts = [entry.get("kind") or "image", "x".join(str(s) for s in entry["shape"])]
    if entry.get("spacing"):
        parts.append("spacing " + "x".join(f"{s:.4g}" for s in entry["spacing"]) + " mm")
    if entry.get("orientation"):
        parts.append(f"orientation {entry['orientation']}")
    if entry.get("range"):
        parts.append(f"range {entry['range'][0]:.6g}..{entry['range'][1]:.6g}")
    for key in ("modality", "photometric", "transfer_syntax"):
        if entry.get(key):
            parts.append(str(entry[key]))
    line = f"{where}: " + ", ".join(parts)
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
