"""The ``npz`` source: MedMNIST-format arrays with their own train/val/test split.

A MedMNIST file holds ``{split}_images`` and ``{split}_labels`` for the splits train,
val and test. Images are ``(N, H, W)`` for grayscale 2D, ``(N, H, W, 3)`` for color
2D and ``(N, D, H, W)`` for 3D volumes. A row's path is ``FILE.npz#SPLIT/INDEX``.
"""

from __future__ import annotations

import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from medtl.errors import BadFileError

__all__ = ["NpzSource"]

_SPLITS = ("train", "val", "test")


class NpzSource:
    """Read images from MedMNIST ``.npz`` files.

    Args:
        volumetric: whether 4D arrays are ``(N, D, H, W)`` volumes (default
            ``None``: decided by the file name's "3d" or by a trailing axis that is
            not 3, meaning colour).
    """

    #: The arrays are already in memory, so an on-disk cache of their rows saves nothing.
    cacheable = False

    def __init__(self, volumetric: bool | None = None):
        self.volumetric = volumetric
        self._arrays: dict[str, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()

    def _load(self, file: str) -> dict[str, np.ndarray]:
        with self._lock:
            if file not in self._arrays:
                try:
                    with np.load(file, allow_pickle=False) as data:
                        self._arrays[file] = {k: data[k] for k in data.files}
                except (OSError, ValueError, zipfile.BadZipFile) as exc:
                    raise BadFileError(file, f"not a readable .npz file: {exc}") from exc
            return self._arrays[file]

    def expand(self, file: str) -> list[dict[str, str]]:
        """List one manifest row per image, keeping the file's own split."""
        arrays = self._load(file)
        rows = []
        name = Path(file).name
        for split in _SPLITS:
            images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
            if images is None or labels is None:
                continue
            labels = np.asarray(labels)
            if labels.ndim == 2 and labels.shape[1] > 1:
                raise BadFileError(file, f"{split}_labels has shape {labels.shape}; multi-label data is not supported")
            labels = labels.reshape(len(labels))
            for i in range(len(images)):
                rows.append(
                    {
                        "path": f"{file}#{split}/{i}",
                        "label": str(int(labels[i])),
                        "patient_id": f"{name}:{split}:{i}",
                        "split": split,
                        "source": "npz",
                    }
                )
        if not rows:
            raise BadFileError(file, "no {train,val,test}_images / _labels arrays found; is this a MedMNIST file?")
        return rows

    def read(self, path: str) -> tuple[np.ndarray, dict[str, Any]]:
        file, sep, key = path.partition("#")
        split, _, index = key.partition("/")
        if not sep or split not in _SPLITS or not index.isdigit():
            raise BadFileError(path, "an npz path must look like FILE.npz#train/12")
        arrays = self._load(file)
        images = arrays.get(f"{split}_images")
        if images is None or int(index) >= len(images):
            raise BadFileError(path, f"no image {index} in {split}_images")
        image = np.asarray(images[int(index)], dtype=np.float32)
        if image.ndim == 2:
            image = image[None]
        elif image.ndim == 3 and self._is_color(file, image):
            image = np.moveaxis(image, -1, 0)
        elif image.ndim == 3:
            image = image[None]
        else:
            raise BadFileError(path, f"unsupported image shape {image.shape}")
        spatial = image.ndim - 1
        return np.ascontiguousarray(image), {"spacing": (1.0,) * spatial, "kind": "npz"}

    def _is_color(self, file: str, image: np.ndarray) -> bool:
        if self.volumetric is not None:
            return not self.volumetric
        if "3d" in Path(file).name.lower():
            return False
        return image.shape[-1] == 3
