"""Tests of the dicom source: pydicom's own test files, synthetic series and the convert command."""

from __future__ import annotations

import logging
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from dicom_builders import BASIC_TEXT_SR, CR_IMAGE_STORAGE, make_dataset, save, write_series  # noqa: E402

from medtl.errors import BadFileError, ConfigError, SkippedFile  # noqa: E402
from medtl_plugins.dicom import DicomSource  # noqa: E402
from medtl_plugins.nifti import NiftiSource, reorient  # noqa: E402

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"

#: Transfer syntaxes that at least one pydicom test file must cover with an exact match.
REQUIRED_SYNTAXES = {
    "Explicit VR Little Endian", "Implicit VR Little Endian", "Explicit VR Big Endian", "RLE Lossless",
    "JPEG Baseline (Process 1)", "JPEG Extended (Process 2 and 4)",
    "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
    "JPEG-LS Lossless Image Compression", "JPEG 2000 Image Compression (Lossless Only)",
    "JPEG 2000 Image Compression",
}


def _stored_range(ds) -> tuple[float, float]:
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _expected(ds) -> np.ndarray:
    """pydicom's pixel_array after the modality LUT, in the source's layout and dtype policy."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    pixels = ds.pixel_array
    photometric = ds.PhotometricInterpretation
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if photometric == "PALETTE COLOR" or int(ds.get("SamplesPerPixel", 1)) > 1:
        return np.moveaxis(pixels, -1, 0).astype(np.float32)
    values = apply_modality_lut(pixels, ds)
    if photometric == "MONOCHROME1":
        low, high = _stored_range(ds)
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        low, high = sorted((low * slope + intercept, high * slope + intercept))
        values = (low + high) - values
    return values.astype(np.float32)[None]


def _pydicom_decodes(path: Path):
    try:
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            return None
        ds.pixel_array  # noqa: B018 - decoding is the check
        return ds
    except Exception:  # noqa: BLE001 - any failure means pydicom itself cannot decode it
        return None


def test_pydicom_files_match_pixel_array(capsys):
    source = DicomSource()
    files = sorted(p for p in TEST_FILES.rglob("*") if p.is_file())
    matched, rejected, syntaxes = [], [], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            ds = _pydicom_decodes(path)
            if ds is None:
                with pytest.raises(BadFileError) as info:
                    source.read(str(path))
                assert info.value.path == str(path)
                assert info.value.reason
                rejected.append((path.name, type(info.value).__name__))
                continue
            array, meta = source.read(str(path))
            expected = _expected(ds)
            assert array.dtype == np.float32, path.name
            assert array.shape == expected.shape, path.name
            assert np.array_equal(array, expected), path.name
            matched.append(path.name)
            syntaxes.add(meta["transfer_syntax"])
    skipped = sum(1 for _, kind in rejected if kind == "SkippedFile")
    with capsys.disabled():
        print(f"\ndicom coverage of pydicom {pydicom.__version__} test files: {len(matched)} of {len(files)} "
              f"files read exactly as pixel_array after the modality LUT; {skipped} skipped as non-image, "
              f"{len(rejected) - skipped} rejected with an error naming the file")
    assert len(matched) >= 80
    assert REQUIRED_SYNTAXES <= syntaxes, REQUIRED_SYNTAXES - syntaxes


def _same_meta(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        if isinstance(a[key], np.ndarray):
            if not np.allclose(a[key], b[key], rtol=0, atol=1e-9):
                return False
        elif a[key] != b[key]:
            return False
    return True


def test_one_pass_read_matches_dcmread():
    """The fast single-file read gives the same array and metadata as dcmread plus decode."""
    import medtl_plugins.dicom as dicom_module

    files = sorted(p for p in TEST_FILES.rglob("*") if p.is_file())
    sources = [DicomSource(), DicomSource(voi="dicom"), DicomSource(window=(40.0, 400.0))]
    fast_files = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            decoded = dicom_module._decode_plain_file(path)
            if decoded is None:
                continue
            fast_files += 1
            for source in sources:
                ds, pixels = dicom_module._decode_plain_file(path)
                try:
                    full = source._read_dataset(pydicom.dcmread(path), None, path)
                except BadFileError:
                    with pytest.raises(BadFileError):
                        source._read_dataset(ds, pixels, path)
                    continue
                fast = source._read_dataset(ds, pixels, path)
                assert fast[0].dtype == full[0].dtype, path.name
                assert fast[0].flags.writeable, path.name
                assert np.array_equal(fast[0], full[0], equal_nan=True), path.name
                assert _same_meta(fast[1], full[1]), path.name
    assert fast_files >= 60, fast_files


def _as_list(value) -> list:
    from pydicom.multival import MultiValue

    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def test_header_values_match_pydicom_conversion():
    """_get parses DS, IS, CS and binary numbers from raw bytes exactly as pydicom converts them."""
    from medtl_plugins.dicom import _get

    keywords = ["Modality", "PhotometricInterpretation", "SamplesPerPixel", "NumberOfFrames", "BitsStored",
                "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "PixelSpacing", "ImagerPixelSpacing",
                "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness", "SpacingBetweenSlices",
                "InstanceNumber", "SeriesNumber", "WindowCenter", "WindowWidth", "ImageType", "Rows"]
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(p for p in TEST_FILES.rglob("*.dcm") if p.is_file()):
            try:
                raw_ds, converted_ds = pydicom.dcmread(path), pydicom.dcmread(path)
            except Exception:  # noqa: BLE001 - unreadable files are another test's subject
                continue
            for keyword in keywords:
                try:
                    expected = converted_ds.get(keyword)
                except Exception:  # noqa: BLE001 - pydicom cannot convert it; _get must then fail alike
                    continue
                value = _get(raw_ds, keyword)
                if expected in (None, "") or (hasattr(expected, "__len__") and len(expected) == 0
                                                and not isinstance(expected, str)):
                    assert value in (None, "", []), (path.name, keyword, value)
                    continue
                checked += 1
                as_list, got = _as_list(expected), _as_list(value)
                assert len(got) == len(as_list), (path.name, keyword, value, expected)
                for g, e in zip(got, as_list):
                    if isinstance(e, str):
                        assert g == e.strip(), (path.name, keyword, value, expected)
                    else:
                        assert float(g) == float(e), (path.name, keyword, value, expected)
    assert checked > 500, checked


def test_single_frame_multiframe_object():
    array, meta = DicomSource().read(str(TEST_FILES / "liver_1frame.dcm"))
    assert array.shape == (1, 512, 512)
    assert meta["kind"] == "image"


def test_multiframe_object_is_volume():
    array, meta = DicomSource().read(str(TEST_FILES / "rtdose.dcm"))
    assert array.shape == (1, 15, 10, 10)
    assert meta["kind"] == "multiframe"


def test_monochrome1_inverted(tmp_path):
    pixels = np.array([[0, 100], [200, 4095]], dtype=np.uint16)
    ds = make_dataset(pixels, sop_class=CR_IMAGE_STORAGE, modality="CR", photometric="MONOCHROME1",
                      orientation=None)
    ds.BitsStored, ds.HighBit = 12, 11
    path = save(ds, tmp_path / "cr.dcm")
    array, _ = DicomSource().read(str(path))
    assert array[0, 0, 0] == 4095  # stored 0 is white in MONOCHROME1
    assert array[0, 1, 1] == 0
    kept, _ = DicomSource(invert_monochrome1=False).read(str(path))
    assert np.array_equal(kept[0], pixels.astype(np.float32))


def test_window_option_scales_to_unit_range(tmp_path):
    pixels = np.array([[0, 1024], [1064, 2048]], dtype=np.int16)
    path = save(make_dataset(pixels, slope=1.0, intercept=-1024.0), tmp_path / "ct.dcm")
    array, _ = DicomSource(window=(40, 400)).read(str(path))
    assert array.min() == 0.0
    assert array.max() == 1.0
    assert 0.4 < array[0, 1, 0] < 0.6  # 40 HU is the window center


def test_voi_option_applies_file_window(tmp_path):
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    pixels = np.array([[0, 1024], [1064, 2048]], dtype=np.int16)
    ds = make_dataset(pixels, slope=1.0, intercept=-1024.0)
    ds.WindowCenter, ds.WindowWidth = 40, 400
    path = save(ds, tmp_path / "ct.dcm")
    array, _ = DicomSource(voi="dicom").read(str(path))
    expected = apply_voi_lut(apply_modality_lut(pixels, ds), ds)
    assert np.array_equal(array[0], expected.astype(np.float32))
    plain, _ = DicomSource().read(str(path))
    assert np.array_equal(plain[0], pixels.astype(np.float32) - 1024)


def test_unknown_option_names_config_key():
    with pytest.raises(ConfigError, match="data.sources.dicom.serie"):
        DicomSource(serie="largest")


def test_non_image_object_skipped_with_reason(tmp_path):
    path = save(make_dataset(None, sop_class=BASIC_TEXT_SR, modality="SR"), tmp_path / "report.dcm")
    with pytest.raises(SkippedFile, match="Basic Text SR Storage"):
        DicomSource().read(str(path))


def test_truncated_file_error_names_file(tmp_path):
    data = (TEST_FILES / "CT_small.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) - 3000])
    with pytest.raises(BadFileError) as info:
        DicomSource().read(str(path))
    assert info.value.path == str(path)
    assert "cut.dcm" in str(info.value)


def _volume(slices: int = 6) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 2000, size=(slices, 8, 10)).astype(np.int16)


def test_series_sorted_by_position(tmp_path):
    volume = _volume(7)
    names = [f"img{n}.dcm" for n in random.Random(1).sample(range(100), 7)]
    instances = [3, 1, 7, 2, 6, 5, 4]  # contradicts the positions
    write_series(tmp_path / "s", volume, step=2.5, names=names, instances=instances)
    array, meta = DicomSource().read(str(tmp_path / "s"))
    assert array.shape == (1, 7, 8, 10)
    assert np.array_equal(array[0], volume.astype(np.float32) - 1024)
    assert meta["spacing"] == pytest.approx((2.5, 0.8, 0.8))
    assert meta["warnings"] == []


def test_series_positions_descending_sorted(tmp_path):
    volume = _volume(5)
    write_series(tmp_path / "s", volume[::-1], step=-3.0, origin=0.0)
    array, meta = DicomSource().read(str(tmp_path / "s"))
    # Sorted by increasing position along the normal, the reversed slices are restored.
    assert np.array_equal(array[0], volume.astype(np.float32) - 1024)
    assert meta["spacing"][0] == pytest.approx(3.0)


def test_mixed_folder_selects_series_by_rule(tmp_path):
    write_series(tmp_path / "mix", _volume(5), series_number=2, names=[f"a{i}.dcm" for i in range(5)])
    small = _volume(3) + 7
    write_series(tmp_path / "mix", small, series_number=9, names=[f"b{i}.dcm" for i in range(3)])
    largest, meta = DicomSource().read(str(tmp_path / "mix"))
    assert largest.shape[1] == 5
    assert meta["series"].startswith("series 2 ")
    chosen, _ = DicomSource(series_number=9).read(str(tmp_path / "mix"))
    assert np.array_equal(chosen[0], small.astype(np.float32) - 1024)
    with pytest.raises(BadFileError, match="contains 2 series"):
        DicomSource(series="only").read(str(tmp_path / "mix"))


def test_missing_slice_warns_or_fails(tmp_path, caplog):
    volume = _volume(6)
    keep = [0, 1, 2, 4, 5]
    positions = [(-10.0, -20.0, -40.0 + k * 2.5) for k in keep]
    write_series(tmp_path / "gap", volume[keep], positions=positions)
    with caplog.at_level(logging.WARNING, logger="medtl_plugins.dicom"):
        array, meta = DicomSource().read(str(tmp_path / "gap"))
    assert array.shape[1] == 5
    assert "missing" in caplog.text
    assert meta["spacing"][0] == pytest.approx(2.5)
    assert np.linalg.norm(meta["affine"][:3, 0]) == pytest.approx(2.5)
    with pytest.raises(BadFileError, match="missing"):
        DicomSource(geometry="fail").read(str(tmp_path / "gap"))


def test_non_uniform_spacing_fails_under_policy(tmp_path):
    steps = [0.0, 2.5, 5.0, 7.8, 10.3]
    write_series(tmp_path / "nu", _volume(5), positions=[(0.0, 0.0, z) for z in steps])
    with pytest.raises(BadFileError, match="non-uniform"):
        DicomSource(geometry="fail").read(str(tmp_path / "nu"))


def test_duplicate_positions_dropped(tmp_path, caplog):
    volume = _volume(4)
    positions = [(0.0, 0.0, z) for z in (0.0, 2.0, 2.0, 4.0)]
    write_series(tmp_path / "dup", volume, positions=positions)
    with caplog.at_level(logging.WARNING, logger="medtl_plugins.dicom"):
        array, meta = DicomSource().read(str(tmp_path / "dup"))
    assert array.shape[1] == 3
    assert "repeats" in caplog.text
    assert meta["spacing"][0] == pytest.approx(2.0)


def test_gantry_tilt_detected(tmp_path):
    positions = [(0.0, 0.5 * k, 2.0 * k) for k in range(5)]  # slices shift along y: a tilted gantry
    write_series(tmp_path / "tilt", _volume(5), positions=positions)
    _, meta = DicomSource().read(str(tmp_path / "tilt"))
    assert meta["gantry_tilt_deg"] == pytest.approx(np.degrees(np.arctan(0.25)), abs=0.01)
    assert any("gantry tilt" in w for w in meta["warnings"])
    with pytest.raises(BadFileError, match="gantry tilt"):
        DicomSource(geometry="fail").read(str(tmp_path / "tilt"))


def test_convert_series_round_trip(tmp_path):
    from medtl.cli import main

    volume = _volume(6)
    write_series(tmp_path / "s", volume, step=2.0, origin=-30.0)
    out = tmp_path / "out.nii.gz"
    assert main(["convert", str(tmp_path / "s"), str(out)]) == 0

    array, meta = DicomSource().read(str(tmp_path / "s"))
    img = nib.load(out)
    assert np.array_equal(np.asarray(img.dataobj), array[0])
    assert np.allclose(img.affine, meta["affine"])
    # The first voxel sits at ImagePositionPatient, converted from LPS to RAS.
    assert np.allclose(img.affine @ [0, 0, 0, 1], [10.0, 20.0, -30.0, 1])

    read_back, back_meta = NiftiSource().read(str(out))
    expected, _ = reorient(np.moveaxis(array, 0, -1), meta["affine"], "RAS")
    assert np.array_equal(read_back, np.moveaxis(expected, -1, 0))
    assert back_meta["orientation"] == "RAS"


def test_convert_explicit_files(tmp_path):
    from medtl.cli import main

    paths = write_series(tmp_path / "s", _volume(4))
    out = tmp_path / "files.nii"
    assert main(["convert", *map(str, paths), str(out)]) == 0
    assert nib.load(out).shape == (4, 8, 10)


def test_inspect_reports_kinds(tmp_path, capsys):
    import json

    from medtl.cli import main

    write_series(tmp_path / "s", _volume(3))
    shutil.copy(TEST_FILES / "rtplan.dcm", tmp_path / "plan.dcm")
    rc = main(["inspect", "--json", str(tmp_path / "s"), str(tmp_path / "plan.dcm"), str(tmp_path / "none.dcm")])
    entries = json.loads(capsys.readouterr().out)
    assert rc == 3
    assert entries[0]["status"] == "ok"
    assert entries[0]["shape"] == [1, 3, 8, 10]
    assert entries[0]["orientation"] == "SPL"
    assert entries[1]["status"] == "skipped"
    assert entries[2]["status"] == "failed"


#: Distinctive header values that inspect must never print.
_INSPECT_IDENTIFIERS = {"PatientName": "Zorblatt^Henrietta", "PatientID": "PIDQ-70315-X",
                        "PatientBirthDate": "19320611", "InstitutionName": "Quillmere Infirmary"}


def test_inspect_names_files_without_identifiers(tmp_path, capsys):
    import json

    from medtl.cli import main

    folder = tmp_path / "scan"
    write_series(folder / "ct", _volume(3), identifiers=_INSPECT_IDENTIFIERS)
    save(make_dataset(np.full((6, 7), 100, dtype=np.uint16), sop_class=CR_IMAGE_STORAGE, modality="CR",
                      orientation=None, identifiers=_INSPECT_IDENTIFIERS), folder / "xray.dcm")
    save(make_dataset(None, sop_class=BASIC_TEXT_SR, modality="SR", identifiers=_INSPECT_IDENTIFIERS),
         folder / "report.dcm")
    header_cut = folder / "cut.dcm"
    save(make_dataset(np.zeros((6, 7), dtype=np.uint16), identifiers=_INSPECT_IDENTIFIERS), header_cut)
    header_cut.write_bytes(header_cut.read_bytes()[:200])
    (folder / "notes.txt").write_text("not an image\n")

    rc_json = main(["inspect", "--json", str(folder)])
    entries = json.loads(capsys.readouterr().out)
    rc_text = main(["inspect", str(folder)])
    text = capsys.readouterr().out

    assert rc_json == rc_text == 3  # the cut header fails
    by_file = {tuple(e["files"]): e for e in entries}
    assert by_file[("ct/slice000.dcm", "ct/slice001.dcm", "ct/slice002.dcm")]["status"] == "ok"
    assert by_file[("ct/slice000.dcm", "ct/slice001.dcm", "ct/slice002.dcm")]["path"] == str(folder / "ct")
    assert by_file[("xray.dcm",)]["status"] == "ok"
    assert by_file[("xray.dcm",)]["path"] == str(folder / "xray.dcm")
    assert by_file[("report.dcm",)]["status"] == "skipped"
    assert "Basic Text SR Storage" in by_file[("report.dcm",)]["reason"]
    assert by_file[("cut.dcm",)]["status"] == "failed"
    assert by_file[("notes.txt",)]["reason"] == "neither DICOM nor NIfTI"
    assert len(entries) == 5

    for name in ("ct/slice000.dcm", "ct/slice002.dcm", "xray.dcm", "report.dcm", "cut.dcm", "notes.txt"):
        assert name in text
    printed = json.dumps(entries) + text
    for value in _INSPECT_IDENTIFIERS.values():
        for part in value.split("^"):
            assert part not in printed


def test_enhanced_frames_sorted_and_rescaled(tmp_path):
    from pydicom.dataset import Dataset

    frames = np.stack([np.full((4, 5), v, dtype=np.uint16) for v in (10, 20, 30)])
    ds = make_dataset(frames[0], sop_class="1.2.840.10008.5.1.4.1.1.2.1", orientation=None)
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    del ds.PixelSpacing
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [0.5, 0.6]
    measures.SliceThickness = 5.0
    shared.PixelMeasuresSequence = [measures]
    plane = Dataset()
    plane.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = [plane]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for z in (5.0, 0.0, 10.0):  # stored order contradicts the positions
        item, position, transform = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, z]
        transform.RescaleSlope, transform.RescaleIntercept = 2.0, -100.0
        item.PlanePositionSequence = [position]
        item.PixelValueTransformationSequence = [transform]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    path = save(ds, tmp_path / "enhanced.dcm")

    array, meta = DicomSource().read(str(path))
    assert array.shape == (1, 3, 4, 5)
    assert [float(array[0, k, 0, 0]) for k in range(3)] == [-60.0, -80.0, -40.0]
    assert meta["spacing"] == pytest.approx((5.0, 0.5, 0.6))


def test_header_only_image_is_bad_not_skipped(tmp_path):
    import medtl
    from medtl.errors import BadFileError, SkippedFile

    sample = Path(__file__).resolve().parents[1] / "sample_data" / "site_a" / "A000_0.dcm"
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(sample.read_bytes()[:300])
    with pytest.raises(BadFileError, match="no pixel data") as info:
        medtl.create("source", "dicom").read(str(cut))
    assert not isinstance(info.value, SkippedFile)
    assert "cut.dcm" in str(info.value)


def test_empty_file_named_as_empty(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    with pytest.raises(BadFileError) as info:
        DicomSource().read(str(path))
    assert info.value.path == str(path)
    assert "empty" in info.value.reason
