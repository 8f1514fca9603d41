"""Tests of the on-disk sample cache and its keys."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pydicom")

from dicom_builders import make_dataset, save  # noqa: E402

from medtl.cache import DiskCache  # noqa: E402
from medtl.config import study_from_dict  # noqa: E402
from medtl.data import Preprocessor, load_samples  # noqa: E402
from medtl.manifest import load_manifest  # noqa: E402
from medtl_plugins.dicom import DicomSource  # noqa: E402
from medtl_plugins.npz import NpzSource  # noqa: E402


def _study(tmp_path: Path, size: int = 8, **data):
    return study_from_dict({"data": {"manifest": "manifest.csv", "image_size": [size, size], **data},
                            "output": {"dir": str(tmp_path / "runs")}}, base_dir=tmp_path)


def _dataset(tmp_path: Path, count: int = 4) -> Path:
    lines = ["path,label,site,patient_id"]
    for i in range(count):
        pixels = np.full((12, 12), 100 * i, dtype=np.uint16)
        pixels[i, i] = 999
        save(make_dataset(pixels), tmp_path / f"img{i}.dcm")
        lines.append(f"img{i}.dcm,{i % 2},A,Patient-Smith-{i}")
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _load(tmp_path: Path, cache: DiskCache, size: int = 8):
    study = _study(tmp_path, size)
    manifest = load_manifest(tmp_path / "manifest.csv")
    return load_samples(manifest.rows, manifest, study, cache.sources, Preprocessor(study), cache=cache)


def test_warm_load_equals_cold(tmp_path):
    _dataset(tmp_path)
    sources = {"dicom": DicomSource()}
    cold_cache = DiskCache(tmp_path / "cache", sources)
    cold = _load(tmp_path, cold_cache)
    assert cold_cache.stats() == {"hits": 0, "misses": 4}
    warm_cache = DiskCache(tmp_path / "cache", sources)
    warm = _load(tmp_path, warm_cache)
    assert warm_cache.stats() == {"hits": 4, "misses": 0}
    for a, b in zip(cold, warm):
        assert torch.equal(a["image"], b["image"])


def test_entry_names_are_digests(tmp_path):
    _dataset(tmp_path)
    _load(tmp_path, DiskCache(tmp_path / "cache", {"dicom": DicomSource()}))
    names = [p.relative_to(tmp_path / "cache").as_posix() for p in (tmp_path / "cache").rglob("*")
             if p.is_file() and p.name != "digests.json"]
    assert len(names) == 4
    for name in names:
        assert re.fullmatch(r"[0-9a-f]{2}/[0-9a-f]{64}\.npy", name), name


def test_changed_file_invalidates_entry(tmp_path):
    _dataset(tmp_path)
    sources = {"dicom": DicomSource()}
    _load(tmp_path, DiskCache(tmp_path / "cache", sources))
    pixels = np.full((12, 12), 50, dtype=np.uint16)
    pixels[5, 7] = 4000
    save(make_dataset(pixels), tmp_path / "img0.dcm")  # same name, new contents
    cache = DiskCache(tmp_path / "cache", sources)
    items = _load(tmp_path, cache)
    assert cache.stats() == {"hits": 3, "misses": 1}
    assert float(items[0]["image"].max()) == 1.0
    assert float(items[0]["image"].mean()) < 0.1


def test_same_contents_share_entry(tmp_path):
    _dataset(tmp_path)
    sources = {"dicom": DicomSource()}
    _load(tmp_path, DiskCache(tmp_path / "cache", sources))
    shutil.copy(tmp_path / "img3.dcm", tmp_path / "img0.dcm")
    cache = DiskCache(tmp_path / "cache", sources)
    items = _load(tmp_path, cache)
    assert cache.stats() == {"hits": 4, "misses": 0}
    assert torch.equal(items[0]["image"], items[3]["image"])


def test_changed_transform_or_option_invalidates(tmp_path):
    _dataset(tmp_path)
    _load(tmp_path, DiskCache(tmp_path / "cache", {"dicom": DicomSource()}))
    resized = DiskCache(tmp_path / "cache", {"dicom": DicomSource()})
    items = _load(tmp_path, resized, size=6)
    assert resized.stats() == {"hits": 0, "misses": 4}
    assert items[0]["image"].shape == (1, 6, 6)
    windowed = DiskCache(tmp_path / "cache", {"dicom": DicomSource(window=(50, 100))})
    _load(tmp_path, windowed)
    assert windowed.stats() == {"hits": 0, "misses": 4}


def test_changed_orientation_invalidates(tmp_path):
    _dataset(tmp_path)
    manifest = load_manifest(tmp_path / "manifest.csv")
    sources = {"dicom": DicomSource()}
    ras_study, lps_study = _study(tmp_path, orientation="RAS"), _study(tmp_path, orientation="LPS")
    ras = load_samples(manifest.rows, manifest, ras_study, sources, Preprocessor(ras_study),
                       cache=DiskCache(tmp_path / "cache", sources))
    cache = DiskCache(tmp_path / "cache", sources)
    lps = load_samples(manifest.rows, manifest, lps_study, sources, Preprocessor(lps_study), cache=cache)
    assert cache.stats() == {"hits": 0, "misses": 4}
    # The test images are axial, so LPS reverses both axes of the RAS image.
    assert torch.equal(lps[1]["image"], torch.flip(ras[1]["image"], dims=(1, 2)))


def test_unreadable_entry_decoded_again(tmp_path):
    _dataset(tmp_path, count=2)
    sources = {"dicom": DicomSource()}
    cold = _load(tmp_path, DiskCache(tmp_path / "cache", sources))
    for entry in (tmp_path / "cache").rglob("*.npy"):
        entry.write_bytes(b"garbage")
    cache = DiskCache(tmp_path / "cache", sources)
    again = _load(tmp_path, cache)
    assert cache.stats() == {"hits": 0, "misses": 2}
    assert torch.equal(cold[1]["image"], again[1]["image"])


def test_npz_rows_bypass_cache(tmp_path):
    from medtl.manifest import Row

    arrays = {"train_images": np.zeros((2, 4, 4), np.uint8), "train_labels": np.array([[0], [1]])}
    np.savez(tmp_path / "tiny.npz", **arrays)
    cache = DiskCache(tmp_path / "cache", {"npz": NpzSource()})
    row = Row(0, f"{tmp_path / 'tiny.npz'}#train/0", "0", "A", "p", "train", "npz")
    assert cache.key(row, Preprocessor(_study(tmp_path))) is None


def test_unchanged_files_not_hashed_again(tmp_path):
    _dataset(tmp_path)
    sources = {"dicom": DicomSource()}
    cold = DiskCache(tmp_path / "cache", sources)
    _load(tmp_path, cold)
    assert cold.digests.hashed == 4
    warm = DiskCache(tmp_path / "cache", sources)
    _load(tmp_path, warm)
    assert warm.digests.hashed == 0
    assert warm.stats() == {"hits": 4, "misses": 0}
    index_text = (tmp_path / "cache" / "digests.json").read_text()
    assert "img0" not in index_text
    assert str(tmp_path) not in index_text


def test_rewritten_file_hashed_again(tmp_path):
    import os

    _dataset(tmp_path)
    sources = {"dicom": DicomSource()}
    _load(tmp_path, DiskCache(tmp_path / "cache", sources))
    # Same size and modification time, other pixels: only the change time reveals the write.
    path = tmp_path / "img1.dcm"
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    cache = DiskCache(tmp_path / "cache", sources)
    _load(tmp_path, cache)
    assert cache.digests.hashed == 1
    assert cache.stats() == {"hits": 3, "misses": 1}


def test_unreadable_digest_index_ignored(tmp_path, caplog):
    _dataset(tmp_path, count=2)
    sources = {"dicom": DicomSource()}
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "digests.json").write_text("{not json")
    cache = DiskCache(tmp_path / "cache", sources)
    assert "digest index" in caplog.text
    _load(tmp_path, cache)
    assert cache.digests.hashed == 2
    assert DiskCache(tmp_path / "cache", sources).digests.hashed == 0
