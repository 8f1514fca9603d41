"""From manifest rows to tensors: reading through source plugins, preprocessing, loaders.

Reading and the deterministic preprocessing (channel handling, resizing, intensity
scaling) run once per image and are kept in memory; only the random augmentation
runs every epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import Compose, NormalizeIntensity, Resize, ScaleIntensity
from torch.utils.data import DataLoader

from medtl.config import Study
from medtl.errors import BadFileError, DataError, SkippedFile
from medtl.manifest import Manifest, Row

__all__ = ["SOURCE_BY_SUFFIX", "source_name_for", "Preprocessor", "load_samples", "make_loader",
           "InfiniteLoader", "SkipRecord"]

logger = logging.getLogger(__name__)

#: File suffix -> builtin source name, used when a manifest row names no source.
SOURCE_BY_SUFFIX = {".dcm": "dicom", ".dicom": "dicom", ".nii": "nifti", ".nii.gz": "nifti", ".npz": "npz"}


def source_name_for(row: Row) -> str:
    """Pick the source plugin for a row: its ``source`` column, else its file suffix."""
    if row.source:
        return row.source
    path = row.path.split("#", 1)[0].lower()
    for suffix, name in sorted(SOURCE_BY_SUFFIX.items(), key=lambda kv: -len(kv[0])):
        if path.endswith(suffix):
            return name
    if Path(path).is_dir():
        return "dicom"
    raise DataError(
        f"row {row.index + 2}: cannot tell the source of {Path(path).name!r} from its suffix; "
        f"add a 'source' column naming one of the source plugins"
    )


@dataclass
class SkipRecord:
    """A manifest row left out under ``on_bad_file: skip``."""

    row: int
    site: str
    reason: str


class Preprocessor:
    """The deterministic part of the pipeline: channels, spatial size, intensity."""

    def __init__(self, study: Study):
        data = study.data
        self.spatial_dims = data.spatial_dims
        self.channels = data.channels
        self.image_size = tuple(data.image_size)
        self.resize = Resize(spatial_size=tuple(data.image_size), mode="area" if data.spatial_dims == 2 else "trilinear")
        if data.intensity == "minmax":
            self.intensity: Any = ScaleIntensity(minv=0.0, maxv=1.0)
        elif data.intensity == "zscore":
            self.intensity = NormalizeIntensity(channel_wise=True)
        else:
            self.intensity = None

    def describe(self) -> str:
        """Return a stable description of the chain, used in cache keys and the run record."""
        return f"spatial_dims={self.spatial_dims};channels={self.channels};resize={self.image_size};intensity={type(self.intensity).__name__}"

    def __call__(self, array: np.ndarray, path: str) -> torch.Tensor:
        array = self._fit_dims(array, path)
        array = self._fit_channels(array, path)
        if not np.isfinite(array).all():
            raise BadFileError(path, "image contains NaN or infinite values")
        image = torch.as_tensor(array, dtype=torch.float32)
        image = self.resize(image)
        if self.intensity is not None:
            image = self.intensity(image)
        return torch.as_tensor(image, dtype=torch.float32).contiguous()

    def _fit_dims(self, array: np.ndarray, path: str) -> np.ndarray:
        # Drop singleton spatial axes beyond spatial_dims (a 2D slice stored as X x Y x 1).
        while array.ndim - 1 > self.spatial_dims and 1 in array.shape[1:]:
            axis = 1 + list(array.shape[1:]).index(1) if array.shape[-1] != 1 else array.ndim - 1
            array = np.squeeze(array, axis=axis)
        if array.ndim - 1 != self.spatial_dims:
            raise BadFileError(
                path, f"image has spatial shape {array.shape[1:]}, expected {self.spatial_dims}D (data.spatial_dims)"
            )
        return array

    def _fit_channels(self, array: np.ndarray, path: str) -> np.ndarray:
        c = array.shape[0]
        if c == self.channels:
            return array
        if self.channels == 1 and c == 3:
            # ITU-R BT.601 luma, the usual RGB-to-gray weights
            weights = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(3, *([1] * self.spatial_dims))
            return (array * weights).sum(axis=0, keepdims=True)
        if c == 1:
            return np.repeat(array, self.channels, axis=0)
        raise BadFileError(path, f"image has {c} channels; data.channels is {self.channels}")


def load_samples(rows: list[Row], manifest: Manifest, study: Study, sources: dict[str, Any],
                 preprocessor: Preprocessor, cache: Any = None,
                 skipped: list[SkipRecord] | None = None) -> list[dict[str, Any]]:
    """Read and preprocess rows, applying the ``on_bad_file`` policy.

    Returns dicts with ``image`` (tensor), ``label`` (int, -1 when unlabeled), ``row``,
    ``site``. Under ``on_bad_file: skip`` each failure is logged once and appended to
    ``skipped``; under ``fail`` the first failure raises :class:`BadFileError`.
    """
    items = []
    for row in rows:
        try:
            image = cache.get(row, preprocessor) if cache is not None else None
            if image is None:
                name = source_name_for(row)
                if name not in sources:
                    raise DataError(f"row {row.index + 2}: source {name!r} is not loaded")
                array, _meta = sources[name].read(row.path)
                image = preprocessor(np.asarray(array), row.path)
                if cache is not None:
                    cache.put(row, preprocessor, image)
        except BadFileError as exc:
            if isinstance(exc, SkippedFile) or study.data.on_bad_file == "skip":
                reason = exc.reason
                logger.warning("skipped manifest row %d (site %s): %s", row.index + 2, row.site, reason)
                if skipped is not None:
                    skipped.append(SkipRecord(row.index, row.site, reason))
                continue
            raise BadFileError(exc.path, f"{exc.reason} (manifest row {row.index + 2}; "
                               "set data.on_bad_file: skip to leave such files out)") from exc
        label = manifest.label_index(row.label) if row.label is not None else -1
        items.append({"image": image, "label": label, "row": row.index, "site": row.site})
    return items


def make_loader(items: list[dict[str, Any]], transforms: list, batch_size: int, shuffle: bool,
                num_workers: int, seed: int, drop_last: bool = False,
                sampler: Any = None) -> DataLoader:
    """Build a DataLoader over preprocessed items with the given random transforms."""
    dataset = Dataset(items, transform=Compose(transforms) if transforms else None)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last and len(items) > batch_size,
        generator=generator,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=_collate,
    )


def _collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([torch.as_tensor(b["image"]) for b in batch]),
        "label": torch.as_tensor([b["label"] for b in batch], dtype=torch.long),
        "row": torch.as_tensor([b["row"] for b in batch], dtype=torch.long),
        "site": [b["site"] for b in batch],
    }


@dataclass
class InfiniteLoader:
    """Iterate a loader without end, starting a new pass only when one is exhausted.

    Source and target loaders of different lengths are paired this way, without
    either one being re-iterated from the start on every step.
    """

    loader: DataLoader
    epoch: int = 0
    _iterator: Iterator | None = field(default=None, repr=False)

    def next(self) -> dict[str, Any]:
        if self._iterator is None:
            self._start()
        try:
            return next(self._iterator)  # type: ignore[arg-type]
        except StopIteration:
            self.epoch += 1
            self._start()
            return next(self._iterator)  # type: ignore[arg-type]

    def _start(self) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        self._iterator = iter(self.loader)
