"""The ``dicom`` source: single DICOM images, multi-frame objects and series folders.

A manifest path that names a file reads that file: a single image becomes a 2D array
``(C, rows, columns)`` and a multi-frame object with more than one frame becomes
``(C, frames, rows, columns)``. A path that names a folder reads one series from it as
a 3D volume ``(C, slices, rows, columns)``, with slices sorted by their position along
the slice normal.

Pixel data is decoded by pydicom (with the pylibjpeg plugins of the ``dicom`` extra for
JPEG, JPEG-LS and JPEG 2000). On top of pydicom's ``pixel_array`` the source applies
the modality LUT (RescaleSlope and RescaleIntercept, or a Modality LUT Sequence),
inverts MONOCHROME1 so that higher values are brighter, expands PALETTE COLOR to RGB
and returns float32. pydicom 3 already converts YBR_FULL and YBR_FULL_422 to RGB.

The metadata it returns contains geometry and coding only (shape, spacing, affine,
modality, photometric interpretation, transfer syntax), never patient identifiers.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medtl.errors import BadFileError, ConfigError, SkippedFile

__all__ = ["DicomOptions", "DicomSource", "SeriesInfo", "dicom_affine"]

logger = logging.getLogger(__name__)

#: Keywords whose values identify a patient or an encounter. Error messages that
#: come from pydicom are scrubbed of these values before they reach a log or report.
_IDENTIFYING_VRS = {"PN", "LO", "SH", "DA", "DT", "TM", "UI", "LT", "ST", "UT", "AE", "UC"}

#: Relative tolerance on the slice step before a series counts as non-uniform.
_POSITION_DUPLICATE_MM = 1e-3
_TILT_TOLERANCE_DEG = 0.1


class DicomOptions(BaseModel):
    """Options of the ``dicom`` source, set under ``data.sources.dicom`` in a study file."""

    model_config = ConfigDict(extra="forbid")

    invert_monochrome1: bool = Field(
        True, description="invert MONOCHROME1 images so that higher values are brighter, as in MONOCHROME2")
    voi: Literal["none", "dicom"] = Field(
        "none", description="'dicom' applies the file's VOI LUT or first WindowCenter/WindowWidth after the "
        "modality LUT; 'none' keeps modality values (Hounsfield units for CT)")
    window: tuple[float, float] | None = Field(
        None, description="explicit [center, width] linear window applied after the modality LUT; the output "
        "is scaled to 0..1. Takes precedence over voi")
    series: Literal["largest", "only"] = Field(
        "largest", description="rule for a folder that contains several series: 'largest' picks the series with "
        "the most images (ties: lowest SeriesNumber), 'only' fails unless exactly one series is left")
    series_number: int | None = Field(None, description="keep only the series with this SeriesNumber")
    series_description: str | None = Field(
        None, description="keep only series whose SeriesDescription matches this regular expression")
    geometry: Literal["warn", "fail"] = Field(
        "warn", description="what to do with a series whose slice spacing is non-uniform, that misses slices, "
        "lacks positions or has a gantry tilt: log a warning and keep the median spacing, or fail")
    spacing_tolerance: float = Field(
        0.01, gt=0, lt=1, description="relative deviation of a slice step from the median step that counts "
        "as non-uniform spacing")


@dataclass
class SeriesInfo:
    """One series found in a folder: its number, modality and the files that hold it."""

    key: str
    number: int | None
    modality: str
    description: str
    datasets: list[Any] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)

    @property
    def label(self) -> str:
        """Name the series without identifiers: its SeriesNumber and modality."""
        number = "?" if self.number is None else str(self.number)
        return f"series {number} ({self.modality}, {len(self.paths)} files)"


class DicomSource:
    """Read DICOM files and series folders into float32 arrays with the channel axis first.

    Args:
        **options: the fields of :class:`DicomOptions`.

    Raises:
        ConfigError: for an unknown or invalid option.
    """

    cacheable = True

    def __init__(self, **options: Any):
        try:
            self.options = DicomOptions(**options)
        except ValidationError as exc:
            problems = [("data.sources.dicom." + ".".join(str(p) for p in err["loc"]), err["msg"])
                        for err in exc.errors()]
            raise ConfigError("invalid options for the dicom source", problems) from None
        if self.options.series_description is not None:
            try:
                self._description_re: re.Pattern[str] | None = re.compile(self.options.series_description)
            except re.error as exc:
                raise ConfigError("invalid options for the dicom source", [
                    ("data.sources.dicom.series_description", f"not a valid regular expression: {exc}")]) from None
        else:
            self._description_re = None

    def describe(self) -> str:
        """Return the options that change the output, for cache keys."""
        return "dicom:" + self.options.model_dump_json()

    # -- entry point --------------------------------------------------------

    def read(self, path: str) -> tuple[np.ndarray, dict[str, Any]]:
        """Read a file or a series folder.

        Raises:
            SkippedFile: for a DICOM object without pixel data (report, RT plan, waveform).
            BadFileError: for a missing, truncated, corrupt or undecodable file, naming it.
        """
        p = Path(path)
        decoded = _decode_plain_file(p)  # None for a folder, a missing file and any unusual file
        if decoded is not None:
            return self._read_dataset(*decoded, p)
        if p.is_dir():
            return self.read_series(self.select_series(p), p)
        if not p.is_file():
            raise BadFileError(path, "file not found")
        ds = _dcmread(p)
        return self._read_dataset(ds, None, p)

    # -- single files and multi-frame objects ---------------------------------

    def _read_dataset(self, ds: Any, pixels: np.ndarray | None, path: Path) -> tuple[np.ndarray, dict[str, Any]]:
        """Convert a dataset, and its decoded pixels when the caller has them, to (array, meta)."""
        if pixels is None:
            _require_pixels(ds, path)
        frames = self._frames(ds, pixels, path)  # (F, H, W, S)
        order = _enhanced_frame_order(ds, len(frames))
        if order is not None:
            frames = frames[order]
        channels_first = np.moveaxis(frames, -1, 0)  # (S, F, H, W)
        if channels_first.shape[1] == 1:
            array = channels_first[:, 0]
            kind = "image"
        else:
            array = channels_first
            kind = "multiframe"
        meta = _base_meta(ds, kind)
        meta.update(_file_geometry(ds, array.ndim - 1, order))
        meta["shape"] = tuple(array.shape)
        out = np.ascontiguousarray(array, dtype=np.float32)
        if not out.flags.writeable:  # float32 pixel data decoded as a view on the file's bytes
            out = out.copy()
        return out, meta

    def _frames(self, ds: Any, pixels: np.ndarray | None, path: Path) -> np.ndarray:
        """Decode all frames as float32 ``(frames, rows, columns, samples)`` with the LUTs applied."""
        from pydicom.pixels import apply_color_lut, pixel_array

        if pixels is None:
            try:
                # The function form decodes like Dataset.pixel_array (YBR converted to RGB)
                # but does not keep a decoded copy on the dataset.
                pixels = pixel_array(ds)
            except Exception as exc:  # noqa: BLE001 - pydicom and its plugins raise many exception types
                syntax = _transfer_syntax_name(ds)
                hint = " Install the decoders with: pip install 'medtl[dicom]'." if "plugin" in str(exc) else ""
                raise BadFileError(str(path), f"pixel data could not be decoded ({syntax}): "
                                              f"{_scrub(str(exc), ds)}{hint}") from None
        photometric = str(_get(ds, "PhotometricInterpretation", "MONOCHROME2")).strip()
        samples = int(_get(ds, "SamplesPerPixel", 1) or 1)
        if photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
            samples = 3
        spatial_ndim = pixels.ndim - (1 if samples > 1 else 0)
        if spatial_ndim == 2:
            pixels = pixels[None]
        if samples == 1:
            pixels = pixels[..., None]
        if samples > 1:
            return np.asarray(pixels, dtype=np.float32)
        return self._monochrome(pixels, ds, photometric)

    def _monochrome(self, pixels: np.ndarray, ds: Any, photometric: str) -> np.ndarray:
        values = _modality_lut(pixels, ds)
        options = self.options
        invert = photometric == "MONOCHROME1" and options.invert_monochrome1
        if invert:
            low, high = _modality_range(ds, values)
        if options.window is not None:
            values = _linear_window(values, *options.window)
            low, high = 0.0, 1.0
        elif options.voi == "dicom" and _has_voi(ds):
            from pydicom.pixels import apply_voi_lut

            values = np.stack([apply_voi_lut(frame[..., 0], ds) for frame in values])[..., None]
            low, high = _voi_range(ds)
        if invert:
            # DICOM shows the minimum of the output range as white for MONOCHROME1, so
            # mirroring within that range gives the MONOCHROME2 polarity. The range is
            # the coded one, not the image's own, so all slices of a series agree.
            values = (low + high) - values
        return np.asarray(values, dtype=np.float32)

    # -- series folders ------------------------------------------------------

    def scan_folder(self, folder: Path) -> tuple[list[SeriesInfo], dict[str, int]]:
        """Read every DICOM file under ``folder`` and group images by SeriesInstanceUID.

        Returns the series (in order of SeriesNumber) and counts of files left out:
        ``not_dicom`` and ``no_pixels``.
        """
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        return self.scan_files(files)

    def scan_files(self, files: list[Path], left_out: list[BadFileError] | None = None,
                   ) -> tuple[list[SeriesInfo], dict[str, int]]:
        """Group the image files among ``files`` by SeriesInstanceUID, as :meth:`scan_folder` does.

        Args:
            files: the files to scan.
            left_out: when given, each file that joins no series is appended to it: a
                :class:`SkippedFile` for a file that is not DICOM or contains no image, and a
                :class:`BadFileError` for an unreadable header or an image object without
                pixel data. An unreadable header is then recorded there instead of raised.

        Raises:
            BadFileError: a file's header cannot be read and ``left_out`` is None.
        """
        import pydicom
        from pydicom.errors import InvalidDicomError

        counts = {"not_dicom": 0, "no_pixels": 0}
        groups: dict[str, SeriesInfo] = {}
        for path in files:
            try:
                # Deferred pixel data stays on disk until a slice is decoded, so a folder
                # scan keeps headers only.
                ds = pydicom.dcmread(path, defer_size="64 KB")
            except InvalidDicomError:
                counts["not_dicom"] += 1
                if left_out is not None:
                    left_out.append(SkippedFile(str(path), "not a DICOM file (no DICM prefix)"))
                continue
            except Exception as exc:  # noqa: BLE001 - truncated or corrupt headers raise many types
                error = BadFileError(str(path), f"not a readable DICOM file: {type(exc).__name__}: "
                                                f"{_scrub(str(exc), None)}")
                if left_out is None:
                    raise error from None
                left_out.append(error)
                continue
            if not _has_pixels(ds):
                counts["no_pixels"] += 1
                if left_out is not None:
                    try:
                        _require_pixels(ds, path)
                    except BadFileError as exc:  # SkippedFile is a BadFileError
                        left_out.append(exc)
                continue
            key = str(_get(ds, "SeriesInstanceUID", "") or "")
            info = groups.get(key)
            if info is None:
                number = _get(ds, "SeriesNumber")
                info = groups[key] = SeriesInfo(
                    key=key, number=int(number) if number not in (None, "") else None,
                    modality=str(_get(ds, "Modality", "") or "unknown"),
                    description=str(_get(ds, "SeriesDescription", "") or ""))
            info.datasets.append(ds)
            info.paths.append(path)
        series = sorted(groups.values(), key=lambda s: (s.number is None, s.number or 0, -len(s.paths)))
        return series, counts

    def select_series(self, folder: Path, files: list[Path] | None = None) -> SeriesInfo:
        """Pick the series of a folder (or of the given files) by the ``series*`` options."""
        series, counts = self.scan_folder(folder) if files is None else self.scan_files(files)
        if not series:
            raise BadFileError(str(folder), f"no DICOM image found in the folder ({counts['not_dicom']} files "
                                            f"are not DICOM, {counts['no_pixels']} hold no pixel data)")
        options = self.options
        candidates = series
        if options.series_number is not None:
            candidates = [s for s in candidates if s.number == options.series_number]
        if self._description_re is not None:
            candidates = [s for s in candidates if self._description_re.search(s.description)]
        found = "; ".join(s.label for s in series)
        if not candidates:
            raise BadFileError(str(folder), f"no series matches data.sources.dicom.series_number / "
                                            f"series_description; the folder contains {found}")
        if len(candidates) > 1 and options.series == "only":
            raise BadFileError(str(folder), f"the folder contains {len(candidates)} series ({found}); set "
                                            "data.sources.dicom.series_number, or series: largest")
        chosen = max(candidates, key=lambda s: (len(s.paths), -(s.number or 0)))
        if len(series) > 1:
            logger.warning("folder contains %d series; read %s by rule %r", len(series), chosen.label,
                           options.series)
        return chosen

    def read_series(self, info: SeriesInfo, folder: Path) -> tuple[np.ndarray, dict[str, Any]]:
        """Assemble one series into a ``(C, slices, rows, columns)`` volume.

        The pixel data elements of ``info.datasets`` are released as slices are decoded,
        so each :class:`SeriesInfo` can be read once.
        """
        if len(info.datasets) == 1:
            return self._read_dataset(info.datasets[0], None, info.paths[0])
        multi = [p for ds, p in zip(info.datasets, info.paths) if int(_get(ds, "NumberOfFrames", 1) or 1) > 1]
        if multi:
            raise BadFileError(str(multi[0]), f"{info.label} mixes a multi-frame object with other files; "
                                              "list the multi-frame file in the manifest on its own")
        datasets, paths = info.datasets, info.paths
        _check_same(datasets, paths, ("Rows", "Columns", "SamplesPerPixel"))
        geometry = _series_geometry(datasets, paths, self.options, folder)
        issues = geometry.pop("issues")
        for issue in issues:
            if self.options.geometry == "fail":
                raise BadFileError(str(folder), f"{info.label}: {issue} (data.sources.dicom.geometry is fail; "
                                                "set it to warn to read the series anyway)")
            logger.warning("%s: %s", info.label, issue)
        order = geometry.pop("order")

        # Decode slice by slice into one preallocated volume, so that the peak memory is
        # the volume plus about one decoded slice.
        first = self._frames(datasets[order[0]], None, paths[order[0]])
        volume = np.empty((len(order),) + first.shape[1:], dtype=np.float32)
        volume[0] = first[0]
        for slot, index in enumerate(order[1:], start=1):
            volume[slot] = self._frames(datasets[index], None, paths[index])[0]
            # Free the encoded bytes read from the deferred element; the volume has the slice now.
            datasets[index].pop(0x7FE00010, None)
        datasets[order[0]].pop(0x7FE00010, None)
        array = np.ascontiguousarray(np.moveaxis(volume, -1, 0))
        meta = _base_meta(datasets[order[0]], "series")
        meta.update(geometry)
        meta.update({"shape": tuple(array.shape), "series": info.label, "warnings": issues})
        return array, meta


# ---------------------------------------------------------------------------
# Reading helpers
# ---------------------------------------------------------------------------


#: Elements outside the Image Pixel module (group 0028, which pydicom reads with the
#: pixels anyway) that the single-file path uses: the fast read must fetch each of them.
_PLAIN_FILE_KEYWORDS = (
    "SOPClassUID", "Modality", "ImagerPixelSpacing", "ImageOrientationPatient", "ImagePositionPatient",
    "SliceThickness", "SpacingBetweenSlices", "GridFrameOffsetVector", "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence",
)


def _decode_plain_file(path: Path) -> tuple[Any, np.ndarray] | None:
    """Decode a single-image or multi-frame file in one pass over its header.

    ``dcmread`` builds every element of the file and copies the pixel data into a
    bytes object before decoding starts. pydicom's ``pixel_array``, given an open
    file, reads only the Image Pixel module and the elements in
    ``_PLAIN_FILE_KEYWORDS`` and decodes straight from the file, which is faster.
    benchmarks/bench_ingest.py measures the whole source against the bare loop.

    Returns None for anything unusual, and the caller then takes the full ``dcmread``
    path: a file without the DICM prefix, a file whose decoding fails (the full path
    then reports the error or the skip), or an enhanced object, whose frame order and
    rescale come from its functional groups.
    """
    from pydicom import Dataset
    from pydicom.pixels import pixel_array

    ds = Dataset()
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
            if len(head) < 132 or head[128:] != b"DICM":
                return None
            handle.seek(0)
            # view_only skips the copy of uncompressed pixel data. The float32 conversion
            # makes a writable copy, and _read_dataset copies any array that is still a view.
            pixels = pixel_array(handle, ds_out=ds, specific_tags=[_tag(k) for k in _PLAIN_FILE_KEYWORDS],
                                 view_only=True)
    except Exception:  # noqa: BLE001 - any failure goes to the full path, which reports it
        return None
    if _has(ds, "PerFrameFunctionalGroupsSequence") or _has(ds, "SharedFunctionalGroupsSequence"):
        return None
    return ds, pixels


def _dcmread(path: Path) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        if path.stat().st_size == 0:
            raise BadFileError(str(path), "the file is empty (0 bytes); copy it again from its source")
        return pydicom.dcmread(path)
    except BadFileError:
        raise
    except InvalidDicomError:
        raise BadFileError(str(path), "not a DICOM file: no DICM prefix after the 128-byte preamble. "
                                      "Files without a preamble and file meta group are not read") from None
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt headers raise many types
        raise BadFileError(str(path), f"not a readable DICOM file: {type(exc).__name__}: "
                                      f"{_scrub(str(exc), None)}") from None


def _has_pixels(ds: Any) -> bool:
    return any(_has(ds, k) for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _require_pixels(ds: Any, path: Path) -> None:
    if _has_pixels(ds):
        return
    modality = str(_get(ds, "Modality", "") or "unknown")
    sop = _get(ds, "SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    kind = getattr(sop, "name", None) or "unknown SOP class"
    if "Image Storage" in kind:
        # An image storage class without pixel data is a damaged file (for example one
        # cut short after its header), not a non-image object, so it is not skipped.
        raise BadFileError(str(path), f"{kind} object has no pixel data; the file may be truncated")
    raise SkippedFile(str(path), f"DICOM object without pixel data ({kind}, Modality {modality})")


def _transfer_syntax_name(ds: Any) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return getattr(uid, "name", None) or "unknown transfer syntax"


def _base_meta(ds: Any, kind: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "modality": str(_get(ds, "Modality", "") or "unknown"),
        "photometric": str(_get(ds, "PhotometricInterpretation", "") or "unknown"),
        "transfer_syntax": _transfer_syntax_name(ds),
        "frames": int(_get(ds, "NumberOfFrames", 1) or 1),
    }


def _scrub(text: str, ds: Any) -> str:
    """Remove identifying values of ``ds`` from a pydicom message and shorten it."""
    if ds is not None:
        values: set[str] = set()
        for elem in ds.iterall():
            if elem.VR in _IDENTIFYING_VRS and elem.value not in (None, ""):
                items = elem.value if isinstance(elem.value, (list, tuple)) or elem.VM > 1 else [elem.value]
                for item in items:
                    for part in {str(item), *str(item).split("^")}:
                        if len(part.strip()) >= 3:
                            values.add(part.strip())
        for value in sorted(values, key=len, reverse=True):
            text = text.replace(value, "<redacted>")
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def _check_same(datasets: list[Any], paths: list[Path], keywords: tuple[str, ...]) -> None:
    for keyword in keywords:
        first = _get(datasets[0], keyword)
        for ds, path in zip(datasets[1:], paths[1:]):
            if _get(ds, keyword) != first:
                raise BadFileError(str(path), f"{keyword} is {_get(ds, keyword)} but {first} in "
                                              f"{paths[0].name}; the files are not one series")


# ---------------------------------------------------------------------------
# Header values
# ---------------------------------------------------------------------------

#: struct formats and sizes of the binary value representations that :func:`_get` parses itself.
_BINARY_FORMATS = {"US": ("H", 2), "SS": ("h", 2), "UL": ("I", 4), "SL": ("i", 4), "FL": ("f", 4),
                   "FD": ("d", 8)}


@functools.lru_cache(maxsize=None)
def _tag(keyword: str) -> int | None:
    from pydicom.datadict import tag_for_keyword

    return tag_for_keyword(keyword)


@functools.lru_cache(maxsize=None)
def _dictionary_vr(tag: int) -> str:
    from pydicom.datadict import dictionary_VR

    return str(dictionary_VR(tag))


def _has(ds: Any, keyword: str) -> bool:
    """Return whether ``ds`` contains ``keyword``, looking the tag up once per keyword."""
    return _tag(keyword) in ds


def _get(ds: Any, keyword: str, default: Any = None) -> Any:
    """Return the value of a top-level element, like ``ds.get(keyword, default)``.

    pydicom converts an element on first access through its value hooks. A 2D read
    uses about fifteen elements, and for an uncompressed image their conversion is a
    large part of the read, so this function parses numeric and code strings (DS, IS,
    CS) and binary numbers straight from the raw bytes. Any other value representation,
    an element that pydicom has already converted, or bytes that do not parse cleanly
    go through ``ds.get``. Multi-valued elements come back as lists, and empty ones as
    None.
    """
    tag = _tag(keyword)
    elem = ds.get_item(tag) if tag is not None else None
    if elem is None:
        return default
    if not getattr(elem, "is_raw", False):
        return elem.value
    raw = elem.value
    if raw is None or len(raw) == 0:
        return None
    vr = elem.VR or _dictionary_vr(tag)
    values: list[Any]
    try:
        if vr in _BINARY_FORMATS:
            code, size = _BINARY_FORMATS[vr]
            if len(raw) % size:
                return ds.get(keyword, default)
            values = list(struct.unpack(("<" if elem.is_little_endian else ">") + code * (len(raw) // size), raw))
        elif vr == "DS" or vr == "IS":
            convert = float if vr == "DS" else int
            values = [convert(part) for part in raw.decode("ascii").split("\\")]  # int() and float() strip blanks
        elif vr == "CS":
            values = [part.strip(" \x00") for part in raw.decode("ascii").split("\\")]
        else:
            return ds.get(keyword, default)
    except (UnicodeDecodeError, ValueError, struct.error):
        return ds.get(keyword, default)
    return values[0] if len(values) == 1 else values


# ---------------------------------------------------------------------------
# Lookup tables
# ---------------------------------------------------------------------------


def _frame_rescale(ds: Any, frame: int) -> tuple[float, float] | None:
    """Return (slope, intercept) from the functional groups of an enhanced object."""
    for group_name in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = ds.get(group_name)
        if not groups:
            continue
        item = groups[frame] if group_name.startswith("PerFrame") and frame < len(groups) else groups[0]
        transform = item.get("PixelValueTransformationSequence")
        if transform:
            t = transform[0]
            return float(t.get("RescaleSlope", 1.0)), float(t.get("RescaleIntercept", 0.0))
    return None


def _modality_lut(pixels: np.ndarray, ds: Any) -> np.ndarray:
    """Apply the modality LUT to ``(frames, rows, columns, 1)`` pixels."""
    from pydicom.pixels import apply_modality_lut

    fast = _exact_float32_rescale(pixels, ds)
    if fast is not None:
        return fast
    if _has(ds, "RescaleSlope") or _has(ds, "ModalityLUTSequence") or not _has(ds, "PerFrameFunctionalGroupsSequence"):
        return apply_modality_lut(pixels, ds)
    out = pixels.astype(np.float64)
    for i in range(len(out)):
        rescale = _frame_rescale(ds, i)
        if rescale is not None:
            out[i] = out[i] * rescale[0] + rescale[1]
    return out


def _exact_float32_rescale(pixels: np.ndarray, ds: Any) -> np.ndarray | None:
    """Rescale in float32 when that gives the same values as pydicom's float64 rescale.

    With at most 16-bit stored values, a slope of 1 and an integer intercept below
    2**15 in magnitude, every result is an integer below 2**24 and so exact in float32.
    This is the common CT case, and it halves the cost of the modality LUT.
    """
    if pixels.dtype.itemsize > 2 or pixels.dtype.kind not in "iu" or _has(ds, "ModalityLUTSequence"):
        return None
    slope, intercept = _get(ds, "RescaleSlope"), _get(ds, "RescaleIntercept")
    if slope is None and intercept is None:
        return pixels.astype(np.float32) if not _has(ds, "PerFrameFunctionalGroupsSequence") else None
    if slope is None or intercept is None:
        return None
    slope, intercept = float(slope), float(intercept)
    if slope != 1.0 or intercept != int(intercept) or abs(intercept) >= 2**15:
        return None
    values = pixels.astype(np.float32)
    # A cast followed by an in-place add is faster than np.add with a float32 dtype on
    # integer input, because that call goes through a buffered casting loop.
    values += np.float32(intercept)
    return values


def _stored_range(ds: Any) -> tuple[float, float]:
    bits = int(_get(ds, "BitsStored", _get(ds, "BitsAllocated", 16)) or 16)
    if int(_get(ds, "PixelRepresentation", 0) or 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _modality_range(ds: Any, values: np.ndarray) -> tuple[float, float]:
    """Return the output range of the modality LUT for the coded stored-value range."""
    if _get(ds, "ModalityLUTSequence"):
        depth = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, 2.0**depth - 1
    if _has(ds, "FloatPixelData") or _has(ds, "DoubleFloatPixelData"):
        return float(values.min()), float(values.max())
    low, high = _stored_range(ds)
    rescale = None
    if _has(ds, "RescaleSlope") or _has(ds, "RescaleIntercept"):
        rescale = float(_get(ds, "RescaleSlope", 1.0)), float(_get(ds, "RescaleIntercept", 0.0))
    elif _has(ds, "PerFrameFunctionalGroupsSequence"):
        rescale = _frame_rescale(ds, 0)
    if rescale is not None:
        ends = sorted((low * rescale[0] + rescale[1], high * rescale[0] + rescale[1]))
        return ends[0], ends[1]
    return low, high


def _has_voi(ds: Any) -> bool:
    return bool(_get(ds, "VOILUTSequence")) or (_has(ds, "WindowCenter") and _has(ds, "WindowWidth"))


def _voi_range(ds: Any) -> tuple[float, float]:
    if _get(ds, "VOILUTSequence"):
        depth = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, 2.0**depth - 1
    return _stored_range(ds)


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Apply the DICOM linear window (PS3.3 C.11.2.1.2.1) with output range 0..1."""
    width = max(float(width), 1.0)
    scaled = (values - (center - 0.5)) / (width - 1.0) + 0.5
    return np.clip(scaled, 0.0, 1.0)


# ---------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------


def _cross(a: Any, b: Any) -> np.ndarray:
    """Return the cross product of two 3-vectors (numpy.cross costs tens of microseconds)."""
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def dicom_affine(row_cosines: np.ndarray, column_cosines: np.ndarray, origin: np.ndarray,
                 pixel_spacing: tuple[float, float], slice_step: np.ndarray) -> np.ndarray:
    """Build the RAS affine of an array indexed ``(slice, row, column)``.

    DICOM positions are in LPS millimetres. ``row_cosines`` (the first three values of
    ImageOrientationPatient) point along a row, so they step with the column index.
    ``pixel_spacing`` is (between rows, between columns), as in PixelSpacing.
    """
    affine = np.empty((4, 4))
    affine[:3, 0] = slice_step
    affine[:3, 1] = np.asarray(column_cosines) * pixel_spacing[0]
    affine[:3, 2] = np.asarray(row_cosines) * pixel_spacing[1]
    affine[:3, 3] = origin
    affine[3] = (0.0, 0.0, 0.0, 1.0)
    affine[:2] *= -1.0  # LPS to RAS
    return affine


def _pixel_spacing(ds: Any) -> tuple[float, float]:
    spacing = _stored_pixel_spacing(ds)
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise BadFileError(str(getattr(ds, "filename", None) or "DICOM dataset"),
                           f"PixelSpacing is {list(spacing)}; spacings must be positive")
    return spacing


def _stored_pixel_spacing(ds: Any) -> tuple[float, float]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = _get(ds, keyword)
        if value is not None and len(value) == 2:
            return float(value[0]), float(value[1])
    shared = _get(ds, "SharedFunctionalGroupsSequence")
    if shared and shared[0].get("PixelMeasuresSequence"):
        value = shared[0].PixelMeasuresSequence[0].get("PixelSpacing")
        if value is not None:
            return float(value[0]), float(value[1])
    return 1.0, 1.0


def _plane(ds: Any, frame: int | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Return (ImageOrientationPatient, ImagePositionPatient) of a file or of one enhanced frame."""
    orientation, position = _get(ds, "ImageOrientationPatient"), _get(ds, "ImagePositionPatient")
    if frame is not None and _has(ds, "PerFrameFunctionalGroupsSequence"):
        item = ds.PerFrameFunctionalGroupsSequence[frame]
        if item.get("PlanePositionSequence"):
            position = item.PlanePositionSequence[0].get("ImagePositionPatient", position)
        for source in (item, (_get(ds, "SharedFunctionalGroupsSequence") or [None])[0]):
            if source is not None and source.get("PlaneOrientationSequence"):
                orientation = source.PlaneOrientationSequence[0].get("ImageOrientationPatient", orientation)
                break
    as_array = (lambda v: np.asarray([float(x) for x in v]) if v is not None else None)
    return as_array(orientation), as_array(position)


def _enhanced_frame_order(ds: Any, frames: int) -> list[int] | None:
    """Order the frames of an enhanced object along the slice normal, when they carry positions."""
    if frames < 2 or not _has(ds, "PerFrameFunctionalGroupsSequence"):
        return None
    planes = [_plane(ds, i) for i in range(frames)]
    if any(o is None or p is None for o, p in planes):
        return None
    normal = _cross(planes[0][0][:3], planes[0][0][3:])
    positions = np.array([float(np.dot(p, normal)) for _, p in planes])
    if np.ptp(positions) < _POSITION_DUPLICATE_MM:
        return None
    return [int(i) for i in np.argsort(positions, kind="stable")]


def _file_geometry(ds: Any, spatial_ndim: int, order: list[int] | None) -> dict[str, Any]:
    spacing = _pixel_spacing(ds)
    first = order[0] if order else 0
    orientation, position = _plane(ds, first if order else None)
    if orientation is None or len(orientation) != 6:
        orientation = np.array([1.0, 0, 0, 0, 1.0, 0])
        position = np.zeros(3) if position is None else position
        # Projection radiographs carry no patient frame, so the LPS frame is nominal.
        frame_known = False
    else:
        frame_known = position is not None
        position = np.zeros(3) if position is None else position
    normal = _cross(orientation[:3], orientation[3:])
    thickness = float(_get(ds, "SpacingBetweenSlices", _get(ds, "SliceThickness", 1.0)) or 1.0)
    step = normal * thickness
    if order:
        _, last = _plane(ds, order[-1])
        if last is not None and len(order) > 1:
            step = (last - position) / (len(order) - 1)
    elif _has(ds, "GridFrameOffsetVector") and spatial_ndim == 3:
        offsets = [float(v) for v in ds.GridFrameOffsetVector]
        if len(offsets) > 1:
            step = normal * (offsets[1] - offsets[0])
    affine = dicom_affine(orientation[:3], orientation[3:], position, spacing, step)
    if spatial_ndim == 2:
        # The 2D array is (rows, columns); move the slice axis last.
        affine = affine[:, [1, 2, 0, 3]]
        return {"spacing": spacing, "affine": affine, "patient_frame": frame_known}
    return {"spacing": (float(np.linalg.norm(step)), *spacing), "affine": affine, "patient_frame": frame_known}


def _series_geometry(datasets: list[Any], paths: list[Path], options: DicomOptions,
                     folder: Path) -> dict[str, Any]:
    """Sort the slices of a series and derive its spacing; collect geometry issues."""
    issues: list[str] = []
    planes = [_plane(ds) for ds in datasets]
    spacing = _pixel_spacing(datasets[0])
    if any(o is None or p is None or len(o) != 6 for o, p in planes):
        issues.append("some slices lack ImagePositionPatient or ImageOrientationPatient; slices are "
                      "ordered by InstanceNumber and the slice spacing is taken from SliceThickness")
        order = sorted(range(len(datasets)), key=lambda i: (int(_get(datasets[i], "InstanceNumber", 0) or 0),
                                                            paths[i].name))
        thickness = float(_get(datasets[0], "SpacingBetweenSlices", _get(datasets[0], "SliceThickness", 1.0)) or 1.0)
        affine = dicom_affine(np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.zeros(3), spacing,
                              np.array([0, 0, thickness]))
        return {"order": order, "issues": issues, "spacing": (thickness, *spacing), "affine": affine,
                "patient_frame": False}

    orientation = planes[0][0]
    for (o, _), path in zip(planes[1:], paths[1:]):
        if not np.allclose(o, orientation, atol=1e-4):
            raise BadFileError(str(path), "ImageOrientationPatient differs from the other slices of the series; "
                                          "the files are not one volume")
    normal = _cross(orientation[:3], orientation[3:])
    positions = np.array([p for _, p in planes])
    along = positions @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]

    # Drop slices that repeat a position: keep the first file in name order.
    kept = [order[0]]
    for index in order[1:]:
        if abs(along[index] - along[kept[-1]]) < _POSITION_DUPLICATE_MM:
            continue
        kept.append(index)
    if len(kept) < len(order):
        logger.warning("dropped %d slices whose ImagePositionPatient repeats another slice", len(order) - len(kept))
        issues_dup = f"{len(order) - len(kept)} duplicate slice positions dropped"
    else:
        issues_dup = None
    order = kept

    steps = np.diff(along[order])
    if len(steps):
        median = float(np.median(steps))
        deviation = np.abs(steps - median)
        if np.any(steps > 1.5 * median):
            missing = int(np.sum(np.round(steps / median) - 1))
            issues.append(f"about {missing} slice(s) missing: steps along the normal range from "
                          f"{steps.min():.4g} to {steps.max():.4g} mm around a median of {median:.4g} mm")
        elif np.any(deviation > options.spacing_tolerance * median):
            issues.append(f"non-uniform slice spacing: steps range from {steps.min():.4g} to "
                          f"{steps.max():.4g} mm around a median of {median:.4g} mm")
        first, last = positions[order[0]], positions[order[-1]]
        direction = (last - first) / np.linalg.norm(last - first)
        tilt = math.degrees(math.acos(min(1.0, abs(float(direction @ normal)))))
        # Step along the stack direction (sheared when tilted) so that one step advances the
        # median spacing along the normal. A missing slice then leaves a gap in the volume,
        # which the policy above has already reported.
        delta = last - first
        step_vector = delta * (median / float(delta @ normal))
        if tilt > _TILT_TOLERANCE_DEG:
            issues.append(f"gantry tilt of {tilt:.2f} degrees: slices are sheared, and the affine keeps the shear")
    else:
        median, tilt = float(_get(datasets[0], "SliceThickness", 1.0) or 1.0), 0.0
        step_vector = normal * median
    affine = dicom_affine(orientation[:3], orientation[3:], positions[order[0]], spacing, step_vector)
    result = {"order": order, "issues": issues, "spacing": (median, *spacing), "affine": affine,
              "patient_frame": True, "gantry_tilt_deg": round(tilt, 3)}
    if issues_dup:
        result["dropped_duplicates"] = issues_dup
    return result
