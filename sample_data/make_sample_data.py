"""Regenerate the two-site sample study in this folder from a seed.

Site A is a set of 2D DICOM radiographs (DX); site B has the same kind of images
as NIfTI files, acquired on a "scanner" with another intensity response, more
noise, lower resolution and a bias field. The finding is a small round opacity
(a nodule) that appears in every image of a positive patient.

Usage: python sample_data/make_sample_data.py [--seed 0] [--out sample_data]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from pathlib import Path

import numpy as np

SIZE = 64
PATIENTS_PER_SITE = 60
IMAGES_PER_PATIENT = 3
POSITIVE_FRACTION = 0.5


def _anatomy(rng: np.random.Generator) -> np.ndarray:
    """Draw a smooth background with two darker lung fields and soft texture, in [0, 1]."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    image = 0.55 + 0.1 * (yy - 0.5)
    for cx in (0.3, 0.7):
        cx += rng.normal(0, 0.02)
        lung = np.exp(-(((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2) ** 2)
        image -= 0.3 * lung
    # low-frequency texture: a few random Gaussian bumps, positive and negative
    for _ in range(10):
        cx, cy = rng.uniform(0.1, 0.9, size=2)
        r = rng.uniform(0.04, 0.12)
        image += rng.normal(0, 0.04) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))
    return image


def _nodule(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    cx, cy = rng.uniform(14, SIZE - 14, size=2)
    radius = rng.uniform(2.5, 4.0)
    amplitude = rng.uniform(0.15, 0.30)
    return amplitude * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius**2))


def _site_a(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Site A's detector: linear response, mild noise, 12-bit output."""
    image = image + rng.normal(0, 0.015, image.shape)
    return np.clip(image * 3000 + 500, 0, 4095).astype(np.uint16)


def _site_b(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Site B's scanner: gamma response, bias field, half resolution, strong noise."""
    from scipy.ndimage import gaussian_filter, zoom

    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    bias = 1.0 + 0.35 * np.sin(np.pi * (xx + rng.uniform(-0.2, 0.2))) * np.cos(np.pi * (yy - 0.5))
    image = np.clip(image, 0, None) ** 1.8 * bias
    image = gaussian_filter(image, sigma=1.2)
    image = zoom(zoom(image, 0.5, order=1), 2.0, order=1)
    image = image + rng.normal(0, 0.05, image.shape)
    return (image * 800 + 100).astype(np.float32)


def _write_dicom(path: Path, pixels: np.ndarray, patient: str, index: int, seed: int) -> None:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=[str(seed), *map(str, parts)])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage, for presentation
    meta.MediaStorageSOPInstanceUID = uid(patient, index, "sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid(patient, "study")
    ds.SeriesInstanceUID = uid(patient, index, "series")
    ds.PatientName = f"Pseudonym^{patient}"
    ds.PatientID = patient
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20200101"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = "DX"
    ds.Manufacturer = "medtl synthetic"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.PatientOrientation = ["R", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImagerPixelSpacing = [2.0, 2.0]
    ds.PixelSpacing = [2.0, 2.0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = 0
    ds.RescaleType = "US"
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _write_nifti(path: Path, pixels: np.ndarray) -> None:
    import nibabel as nib

    # The file stores the radiograph's columns as its first axis, the fastest-varying
    # one as in DICOM pixel data, so the pixels are transposed. The affine puts the image in the same patient frame as
    # site A's DICOM files, which have no ImageOrientationPatient: the dicom source's
    # nominal frame, columns toward the patient's left and rows toward posterior (both
    # negative in RAS). With 2.5 mm pixels, a coarser detector than site A's.
    affine = np.diag([-2.5, -2.5, 2.5, 1.0])
    img = nib.Nifti1Image(pixels.T[:, :, None].astype(np.float32), affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def generate(out: Path, seed: int = 0) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for site in ("A", "B"):
        folder = out / ("site_a" if site == "A" else "site_b")
        folder.mkdir(parents=True, exist_ok=True)
        labels = (np.arange(PATIENTS_PER_SITE) < PATIENTS_PER_SITE * POSITIVE_FRACTION).astype(int)
        rng.shuffle(labels)
        for p in range(PATIENTS_PER_SITE):
            patient = f"{site}{p:03d}"
            for i in range(IMAGES_PER_PATIENT):
                image = _anatomy(rng)
                if labels[p]:
                    image = image + _nodule(rng)
                if site == "A":
                    name = f"{patient}_{i}.dcm"
                    _write_dicom(folder / name, _site_a(image, rng), patient, i, seed)
                else:
                    name = f"{patient}_{i}.nii.gz"
                    _write_nifti(folder / name, _site_b(image, rng))
                rows.append({"path": f"{folder.name}/{name}", "label": "nodule" if labels[p] else "normal",
                             "site": site, "patient_id": patient})
    with (out / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "site", "patient_id"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    rows = generate(args.out, args.seed)
    digest = hashlib.sha256((args.out / "manifest.csv").read_bytes()).hexdigest()[:12]
    print(f"wrote {len(rows)} images and manifest.csv (sha256 {digest}) to {args.out}")


if __name__ == "__main__":
    main()
