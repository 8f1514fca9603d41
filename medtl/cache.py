"""An on-disk cache of decoded and preprocessed samples.

Each entry is one ``.npy`` file named by a SHA-256 key over

- the bytes of the image file (every file, with its relative name, for a series folder),
- the source plugin's name and the options that change its output (``describe()``),
- the preprocessing chain (:meth:`medtl.data.Preprocessor.describe`),
- a format version.

So a changed file, source option or transform gives a new key, and the old entry is
simply no longer used. File names are hex digests and contain no path, patient ID or
DICOM value. Entries are written to a temporary file and renamed, so two runs that
share a cache folder never read a half-written entry.

Hashing the image files is a large part of a warm epoch, so ``digests.json`` in the
cache folder remembers each file's content digest together with its size, modification
time, change time and inode. A later run reads a file again only when one of these has
changed, the test that git and DVC use to skip unchanged files. Writing to a file always
updates its change time, which programs cannot set back, so a rewritten file is hashed
again even when its size and modification time were restored. The index is keyed by
hashes of the paths and contains no path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["DigestIndex", "DiskCache", "content_digest", "open_cache"]

logger = logging.getLogger(__name__)

#: Bumped when the stored layout or the meaning of a key changes.
CACHE_FORMAT = "medtl-cache-1"


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()


def content_digest(path: str | Path, file_digest: Any = _file_digest) -> str:
    """Hash the contents of a file, or of every file under a folder with their relative names.

    ``file_digest`` returns the SHA-256 digest of one file's bytes. :class:`DiskCache`
    passes its digest index here.
    """
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256(b"folder")
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
            digest.update(file_digest(file))
        return digest.hexdigest()
    return hashlib.sha256(b"file" + file_digest(path)).hexdigest()


class DigestIndex:
    """File content digests remembered by each file's path and stat signature.

    Args:
        path: the JSON file that keeps the index between runs.
    """

    def __init__(self, path: Path):
        self.path = path
        self.hashed = 0  # files read and hashed by this process
        self._dirty = False
        self._entries: dict[str, str] = {}
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            logger.warning("ignoring the unreadable digest index %s (%s); files are hashed again", path, exc)
            return
        if isinstance(loaded, dict) and all(isinstance(v, str) for v in loaded.values()):
            self._entries = loaded

    def __call__(self, path: Path) -> bytes:
        """Return the SHA-256 digest of a file's bytes, from the index when the file is unchanged."""
        st = os.stat(path)
        signature = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"
        key = hashlib.sha256(signature.encode("utf-8", "surrogateescape")).hexdigest()
        known = self._entries.get(key)
        if known is not None:
            return bytes.fromhex(known)
        digest = _file_digest(path)
        self.hashed += 1
        self._entries[key] = digest.hex()
        self._dirty = True
        return digest

    def save(self) -> None:
        """Write the index atomically if it gained entries. A failure only logs a warning.

        NOTE: entries of moved or deleted files are never dropped, and each save
        rewrites the whole file, so a cache folder shared by many large studies keeps
        a growing index; deleting digests.json only costs one round of hashing.
        """
        if not self._dirty:
            return
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self._entries, fh)
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError as exc:
            logger.warning("could not write the digest index %s: %s", self.path, exc)


class DiskCache:
    """Preprocessed samples stored as ``.npy`` files under ``root``.

    It implements ``get(row, preprocessor)`` and ``put(row, preprocessor, image)`` as
    :func:`medtl.data.load_samples` expects. Rows whose source sets ``cacheable =
    False`` (the in-memory ``npz`` source) bypass the cache.

    Args:
        root: the cache folder; created when missing.
        sources: the source plugins by name, as the run loaded them.
    """

    def __init__(self, root: str | Path, sources: dict[str, Any]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.sources = sources
        self.hits = 0
        self.misses = 0
        # Keys of rows already hashed in this process, so that a file is hashed once per run.
        self._keys: dict[tuple[int, str], str | None] = {}
        self.digests = DigestIndex(self.root / "digests.json")

    def key(self, row: Any, preprocessor: Any) -> str | None:
        """Return the entry key of a row, or None when the row is not cached."""
        from medtl.data import source_name_for

        memo = (row.index, row.path)
        if memo in self._keys:
            return self._keys[memo]
        name = source_name_for(row)
        source = self.sources.get(name)
        key = None
        if source is not None and getattr(source, "cacheable", False) and Path(row.path).exists():
            describe = getattr(source, "describe", None)
            # NOTE: a source without describe() is keyed by its class name only, so a change
            # of its options does not invalidate its entries.
            options = describe() if callable(describe) else type(source).__qualname__
            digest = hashlib.sha256()
            for part in (CACHE_FORMAT, content_digest(row.path, self.digests), name, options,
                         preprocessor.describe()):
                digest.update(part.encode("utf-8") + b"\0")
            key = digest.hexdigest()
        self._keys[memo] = key
        return key

    def _entry(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, row: Any, preprocessor: Any) -> torch.Tensor | None:
        """Return the cached image of a row, or None on a miss."""
        key = self.key(row, preprocessor)
        if key is None:
            return None
        entry = self._entry(key)
        try:
            array = np.load(entry, allow_pickle=False)
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError) as exc:
            logger.warning("cache entry %s is unreadable (%s); decoding the image again", entry.name, exc)
            self.misses += 1
            return None
        self.hits += 1
        return torch.from_numpy(array)

    def put(self, row: Any, preprocessor: Any, image: torch.Tensor) -> None:
        """Store the preprocessed image of a row."""
        key = self.key(row, preprocessor)
        if key is None:
            return
        entry = self._entry(key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, np.ascontiguousarray(torch.as_tensor(image).cpu().numpy()), allow_pickle=False)
            os.replace(tmp, entry)
        except OSError as exc:
            logger.warning("could not write cache entry %s: %s", entry.name, exc)
            Path(tmp).unlink(missing_ok=True)

    def stats(self) -> dict[str, Any]:
        """Return the hit and miss counts of this run."""
        return {"hits": self.hits, "misses": self.misses}

    def flush(self) -> None:
        """Save the digest index, so that the next run skips reading unchanged files."""
        self.digests.save()


def open_cache(study: Any, sources: dict[str, Any]) -> DiskCache | None:
    """Open the cache that a study requests: ``data.cache_dir``, by default ``<output.dir>/cache``."""
    if not study.data.cache:
        return None
    root = study.resolve_path(study.data.cache_dir) if study.data.cache_dir else Path(study.output.dir) / "cache"
    try:
        return DiskCache(root, sources)
    except OSError as exc:
        from medtl.errors import ConfigError

        raise ConfigError(f"cannot create the cache folder {root}: {exc.strerror}. Set data.cache_dir to a "
                          "writable folder, or data.cache: false") from None
