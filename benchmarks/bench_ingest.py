"""Benchmark DICOM ingest: cold decoding, cached epochs and peak memory of a 3D series.

Usage:
    python benchmarks/bench_ingest.py [--images 200] [--size 512] [--slices 200] [--repeats 3]
                                      [--json results.json]

It writes synthetic CT files into a temporary folder, then measures:

1. Cold decoding throughput of the ``dicom`` source (decode, modality LUT, float32)
   against a bare pydicom loop (``dcmread`` then ``pixel_array``) over the same files,
   per transfer syntax: explicit VR little endian, RLE lossless and JPEG 2000 lossless.
   The page cache is warm for both, so the numbers compare decoding, not the disk.
2. A cached epoch (``load_samples`` through :class:`medtl.cache.DiskCache`, entries
   present) against a cold epoch (empty cache: decode, preprocess, write the entry).
3. Peak traced memory (``tracemalloc``, which tracks NumPy buffers) while the source
   reads one series folder into a volume, relative to the size of the volume.

The target figures are a ratio of at least 0.9 for (1) and at least 10 for (2).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _write_files(folder: Path, count: int, size: int, syntax) -> list[Path]:
    from dicom_builders import make_dataset, save
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(0)
    series_uid = generate_uid()
    yy, xx = np.mgrid[0:size, 0:size]
    paths = []
    for i in range(count):
        # Smooth anatomy-like content plus noise, so that compressors see realistic data.
        base = 1000 + 600 * np.sin(xx / (17 + i % 5)) * np.cos(yy / 23)
        pixels = (base + rng.normal(0, 20, (size, size))).astype(np.int16)
        ds = make_dataset(pixels, slope=1.0, intercept=-1024.0, position=(0.0, 0.0, 2.5 * i), instance=i + 1,
                            series_uid=series_uid)
        if syntax != ExplicitVRLittleEndian:
            ds.compress(syntax, encoding_plugin="pylibjpeg" if "2000" in syntax.name else "")
        paths.append(save(ds, folder / f"{i:04d}.dcm"))
    return paths


def _best_rate(function, paths: list[Path], repeats: int) -> float:
    """Return the best images per second over ``repeats`` passes."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            function(path)
        rates.append(len(paths) / (time.perf_counter() - start))
    return max(rates)


def bench_decoding(root: Path, images: int, size: int, repeats: int) -> list[dict]:
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

    from medtl_plugins.dicom import DicomSource

    source = DicomSource()
    results = []
    for syntax in (ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless):
        count = images if syntax == ExplicitVRLittleEndian else max(10, images // 4)
        paths = _write_files(root / syntax.name.replace(" ", "_"), count, size, syntax)

        def bare(path: Path) -> None:
            pydicom.dcmread(path).pixel_array  # noqa: B018 - decoding is the work measured

        def medtl_read(path: Path) -> None:
            source.read(str(path))

        # Alternate the two loops so that load from other processes hits both alike.
        bare_rates, medtl_rates = [], []
        for _ in range(repeats):
            bare_rates.append(_best_rate(bare, paths, 1))
            medtl_rates.append(_best_rate(medtl_read, paths, 1))
        results.append({
            "transfer_syntax": syntax.name, "files": count, "size": size,
            "bare_pydicom_img_s": round(max(bare_rates), 1), "medtl_img_s": round(max(medtl_rates), 1),
            "ratio": round(max(medtl_rates) / max(bare_rates), 3),
            "ratio_median": round(statistics.median(m / b for m, b in zip(medtl_rates, bare_rates)), 3),
        })
    return results


def bench_cache(root: Path, images: int, size: int, repeats: int) -> dict:
    from pydicom.uid import RLELossless

    from medtl.cache import DiskCache
    from medtl.config import study_from_dict
    from medtl.data import Preprocessor, load_samples
    from medtl.manifest import load_manifest
    from medtl_plugins.dicom import DicomSource

    folder = root / "cache_study"
    paths = _write_files(folder, images, size, RLELossless)
    lines = ["path,label,site,patient_id"] + [f"{p.name},{i % 2},A,P{i}" for i, p in enumerate(paths)]
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    study = study_from_dict({"data": {"manifest": "manifest.csv", "image_size": [224, 224]}}, base_dir=folder)
    manifest = load_manifest(folder / "manifest.csv")
    preprocessor = Preprocessor(study)
    sources = {"dicom": DicomSource()}

    cold_times, warm_times = [], []
    for attempt in range(repeats):
        cache_dir = root / f"cache{attempt}"
        start = time.perf_counter()
        load_samples(manifest.rows, manifest, study, sources, preprocessor, cache=DiskCache(cache_dir, sources))
        cold_times.append(time.perf_counter() - start)
        # A new DiskCache, as in a new process: an empty key memo, and the digest index
        # that the cold epoch saved in the cache folder.
        warm = DiskCache(cache_dir, sources)
        start = time.perf_counter()
        load_samples(manifest.rows, manifest, study, sources, preprocessor, cache=warm)
        warm_times.append(time.perf_counter() - start)
        assert warm.hits == len(paths), warm.stats()
    cold, warm_s = min(cold_times), min(warm_times)
    return {"files": images, "size": size, "transfer_syntax": "RLE Lossless", "image_size": [224, 224],
            "cold_epoch_s": round(cold, 3), "warm_epoch_s": round(warm_s, 3), "speedup": round(cold / warm_s, 1)}


def bench_memory(root: Path, slices: int, size: int) -> dict:
    from pydicom.uid import ExplicitVRLittleEndian

    from medtl_plugins.dicom import DicomSource

    folder = root / "series"
    _write_files(folder, slices, size, ExplicitVRLittleEndian)
    source = DicomSource()
    tracemalloc.start()
    start = time.perf_counter()
    array, meta = source.read(str(folder))
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    volume_mb = array.nbytes / 2**20
    return {"slices": slices, "size": size, "shape": list(array.shape), "seconds": round(seconds, 2),
            "volume_mib": round(volume_mb, 1), "peak_traced_mib": round(peak / 2**20, 1),
            "peak_over_volume": round(peak / array.nbytes, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="uncompressed files for the decoding test")
    parser.add_argument("--size", type=int, default=512, help="rows and columns of each image")
    parser.add_argument("--slices", type=int, default=200, help="slices of the series in the memory test")
    parser.add_argument("--repeats", type=int, default=3, help="passes per measurement; the best one counts")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    import os

    with tempfile.TemporaryDirectory(prefix="medtl-bench-") as tmp:
        root = Path(tmp)
        results = {
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": os.cpu_count()},
            "decoding": bench_decoding(root, args.images, args.size, args.repeats),
            "cache": bench_cache(root, max(20, args.images // 2), args.size, args.repeats),
            "memory": bench_memory(root, args.slices, args.size),
        }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
