"""The study manifest: one row per image, with its label, site and patient.

A manifest is a CSV file with the columns ``path``, ``label``, ``site`` and
``patient_id``, and optionally ``split``. Paths resolve against the CSV's folder.
A MedMNIST ``.npz`` file also serves as a manifest: its rows are expanded by the
``npz`` source and keep the dataset's own train/val/test split.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from medtl.errors import DataError

__all__ = ["Manifest", "Row", "load_manifest", "assign_splits", "file_sha256", "split_csv_text",
           "write_split_csv", "split_summary", "patients_in_several_splits", "source_column"]

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("path", "label", "site", "patient_id")
SPLITS = ("train", "val", "test")


@dataclass
class Row:
    """One image of the study. ``index`` is the row's position in the manifest."""

    index: int
    path: str
    label: str | None
    site: str
    patient_id: str
    split: str | None = None
    source: str | None = None


@dataclass
class Manifest:
    rows: list[Row]
    path: str
    sha256: str
    labels: list[str] = field(default_factory=list)

    @property
    def sites(self) -> list[str]:
        return sorted({r.site for r in self.rows})

    def label_index(self, label: str) -> int:
        return self.labels.index(label)

    def select(self, site: str | None = None, split: str | None = None) -> list[Row]:
        return [
            r for r in self.rows if (site is None or r.site == site) and (split is None or r.split == split)
        ]

    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """Count images per site, split and label."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for r in self.rows:
            per_split = out.setdefault(r.site, {}).setdefault(r.split or "none", {})
            key = r.label if r.label is not None else "unlabeled"
            per_split[key] = per_split.get(key, 0) + 1
        return out


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sort_labels(labels: set[str]) -> list[str]:
    try:
        return sorted(labels, key=lambda x: float(x))
    except ValueError:
        return sorted(labels)


def load_manifest(
    path: str | Path,
    *,
    default_site: str | None = None,
    labels: list[str] | None = None,
    allow_missing_patient: bool = False,
    check_files: bool = True,
    npz_source: Any = None,
) -> Manifest:
    """Read and validate a manifest, reporting every problem at once.

    Args:
        path: the CSV (or MedMNIST ``.npz``) file.
        default_site: site name for rows without a ``site`` column.
        labels: the allowed labels in class order; inferred from the rows when missing.
        allow_missing_patient: accept a manifest without ``patient_id`` and treat each
            image as its own patient (images of one patient may then share splits).
        check_files: check that every path exists.
        npz_source: the source that expands a ``.npz`` manifest into rows.

    Raises:
        DataError: listing all problems found, with row numbers.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"manifest not found: {path}. Set data.manifest to an existing CSV file.")
    sha = file_sha256(path)
    if path.suffix == ".npz":
        if npz_source is None:
            raise DataError(f"{path}: a .npz manifest needs the npz source plugin, which is not loaded")
        raw_rows = npz_source.expand(str(path))
        base = path.parent
        columns = set(REQUIRED_COLUMNS) | {"split"}
    else:
        raw_rows, columns = _read_csv(path)
        base = path.parent

    problems: list[str] = []
    missing = [c for c in ("path", "label") if c not in columns]
    if "site" not in columns and default_site is None:
        missing.append("site")
    if "patient_id" not in columns and not allow_missing_patient:
        problems.append(
            "no patient_id column: medtl splits by patient so that no patient lands in two splits. "
            "Add the column, or set data.split.allow_image_split: true to split by image."
        )
    if missing:
        problems.append(f"missing column(s): {', '.join(missing)}")
    if problems:
        raise DataError(f"{path}: invalid manifest:\n  " + "\n  ".join(problems))

    rows: list[Row] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_rows):
        line = i + 2  # header is line 1
        rel = (raw.get("path") or "").strip()
        if not rel:
            problems.append(f"row {line}: empty path")
            continue
        if ("#" in rel and path.suffix == ".npz") or Path(rel).is_absolute():
            full = rel
        else:
            full = str(base / rel)
        if full in seen:
            problems.append(f"row {line}: duplicate path {rel!r} (first at row {seen[full]})")
        seen[full] = line
        if check_files and path.suffix != ".npz" and not Path(full).exists():
            problems.append(f"row {line}: file not found: {rel}")
        label = (raw.get("label") or "").strip() or None
        site = (raw.get("site") or "").strip() or default_site
        if not site:
            problems.append(f"row {line}: empty site")
            continue
        patient = (raw.get("patient_id") or "").strip()
        if not patient:
            if allow_missing_patient:
                patient = f"image-{i}"
            else:
                problems.append(f"row {line}: empty patient_id")
                continue
        split = (raw.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            problems.append(f"row {line}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        rows.append(Row(i, full, label, site, patient, split, raw.get("source") or None))

    problems.extend(_mixed_split_problems(rows))
    present = {r.label for r in rows if r.label is not None}
    if labels is not None:
        unknown = sorted(present - set(labels))
        if unknown:
            where = [str(r.index + 2) for r in rows if r.label in unknown]
            shown = ", ".join(where[:10]) + (f" and {len(where) - 10} more" if len(where) > 10 else "")
            problems.append(f"labels not in data.labels {labels}: {unknown} (rows {shown})")
        label_list = list(labels)
    else:
        label_list = _sort_labels(present)
    if len(label_list) < 2 and rows:
        problems.append(f"need at least 2 classes, found {label_list}")
    if problems:
        first = problems[:50]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
        raise DataError(f"{path}: invalid manifest ({count}):\n  " + "\n  ".join(first) + more
                        + "\nFix these rows or remove them from the manifest; nothing was trained.")
    if not rows:
        raise DataError(f"{path}: the manifest has no rows")
    return Manifest(rows=rows, path=str(path), sha256=sha, labels=label_list)


def _mixed_split_problems(rows: list[Row]) -> list[str]:
    """Report patients whose images the manifest's own split column puts in several splits."""
    by_patient: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.split is not None:
            by_patient.setdefault((r.site, r.patient_id), []).append(r)
    problems = []
    for patient_rows in by_patient.values():
        splits = sorted({r.split for r in patient_rows if r.split})
        if len(splits) > 1:
            lines = ", ".join(str(r.index + 2) for r in patient_rows)
            problems.append(f"rows {lines}: one patient_id has images in the splits {', '.join(splits)}; "
                            "all images of a patient must be in one split")
    return problems


def source_column(path: str | Path) -> dict[str, list[int]]:
    """Map each name in a CSV manifest's ``source`` column to its row numbers (the header is row 1).

    Returns an empty dict for a ``.npz`` manifest, a CSV file without that column, or
    a file that is missing or unreadable, which :func:`load_manifest` reports.
    """
    path = Path(path)
    if path.suffix == ".npz" or not path.is_file():
        return {}
    try:
        rows, columns = _read_csv(path)
    except (DataError, OSError):
        return {}
    names: dict[str, list[int]] = {}
    if "source" in columns:
        for i, raw in enumerate(rows):
            name = (raw.get("source") or "").strip()
            if name:
                names.setdefault(name, []).append(i + 2)
    return names


def _read_csv(path: Path) -> tuple[list[dict[str, str]], set[str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = {c.strip() for c in (reader.fieldnames or [])}
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV file: {exc}") from None
    rows = [{(k or "").strip(): v for k, v in r.items()} for r in rows]
    return rows, columns


def assign_splits(manifest: Manifest, val: float, test: float, seed: int) -> None:
    """Assign train/val/test to rows without a split, by patient and stratified by label.

    Splits are made per site, so each site has its own internal test set. All images
    of a patient go to one split. Rows that already carry a split keep it.
    """
    for site in manifest.sites:
        site_rows = manifest.select(site=site)
        # An image without a split joins the split its patient already has.
        given = {r.patient_id: r.split for r in site_rows if r.split is not None}
        for r in site_rows:
            if r.split is None and r.patient_id in given:
                r.split = given[r.patient_id]
        rows = [r for r in site_rows if r.split is None]
        if not rows:
            continue
        patients = sorted({r.patient_id for r in rows})
        # A patient's label for stratification is its most frequent image label.
        by_patient: dict[str, list[str]] = {}
        for r in rows:
            by_patient.setdefault(r.patient_id, []).append(r.label or "unlabeled")
        patient_label = {p: max(set(v), key=v.count) for p, v in by_patient.items()}
        assignment = _split_patients(patients, patient_label, val, test, seed)
        for r in rows:
            r.split = assignment[r.patient_id]
        counts = {s: sum(1 for r in rows if r.split == s) for s in SPLITS}
        logger.info("site %s split by patient, images per split: %s", site, counts)


def _split_patients(
    patients: list[str], patient_label: dict[str, str], val: float, test: float, seed: int
) -> dict[str, str]:
    ids = np.arange(len(patients))
    y = np.array([patient_label[p] for p in patients])
    assignment = {p: "train" for p in patients}
    remaining = ids
    for split_name, fraction in (("test", test), ("val", val / max(1e-9, 1 - test))):
        if fraction <= 0 or len(remaining) < 2:
            continue
        chosen = _pick_fraction(remaining, y[remaining], fraction, seed)
        for i in chosen:
            assignment[patients[i]] = split_name
        remaining = np.setdiff1d(remaining, chosen)
    return assignment


def _pick_fraction(ids: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Pick about ``fraction`` of ``ids``, stratified by ``y`` where every class allows it."""
    n_folds = max(2, int(round(1 / fraction)))
    _, class_counts = np.unique(y, return_counts=True)
    if class_counts.min() >= n_folds:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        _, held = next(splitter.split(ids, y, groups=ids))
    else:
        splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        _, held = next(splitter.split(ids, y, groups=ids))
    return ids[held]


def split_csv_text(manifest: Manifest) -> str:
    """Return the split each manifest row was given, as CSV (row index, site, patient, split)."""
    lines = ["row,site,patient_id,split"]
    for r in manifest.rows:
        lines.append(f"{r.index},{_csv_field(r.site)},{_csv_field(r.patient_id)},{r.split}")
    return "\n".join(lines) + "\n"


def write_split_csv(manifest: Manifest, path: Path) -> None:
    """Write :func:`split_csv_text` to ``path``."""
    from medtl.runio import atomic_write_text

    atomic_write_text(path, split_csv_text(manifest))


def split_summary(manifest: Manifest) -> dict[str, Any]:
    """Summarize the split for the run record: the SHA-256 of split.csv and counts per split.

    Two runs with the same ``sha256`` trained and tested on the same rows.
    """
    text = split_csv_text(manifest)
    images: dict[str, int] = {}
    patients: dict[str, set[str]] = {}
    for r in manifest.rows:
        split = r.split or "none"
        images[split] = images.get(split, 0) + 1
        patients.setdefault(split, set()).add(f"{r.site}\0{r.patient_id}")
    return {
        "file": "split.csv",
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "images": images,
        "patients": {k: len(v) for k, v in patients.items()},
    }


def patients_in_several_splits(manifest: Manifest) -> dict[str, list[str]]:
    """Return the patients (per site) whose images fall in more than one split."""
    seen: dict[tuple[str, str], set[str]] = {}
    for r in manifest.rows:
        seen.setdefault((r.site, r.patient_id), set()).add(r.split or "none")
    return {f"{site}/{patient}": sorted(splits) for (site, patient), splits in seen.items() if len(splits) > 1}


def _csv_field(value: str) -> str:
    if any(c in value for c in ',"\n'):
        return '"' + value.replace('"', '""') + '"'
    return value
