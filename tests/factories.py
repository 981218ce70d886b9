"""Builders for small images and datasets in tmp_path (no image files are committed)."""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def synthetic_mammogram(seed: int, *, malignant: bool, size: int = 224) -> np.ndarray:
    """A 2-D uint8 image: noisy breast-like ellipse on black, with a bright spiky blob when malignant."""
    rng = np.random.default_rng(seed)
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    draw.ellipse((-size // 2, size // 8, size * 3 // 4, size * 7 // 8), fill=int(rng.integers(70, 110)))
    cx, cy = (int(v) for v in rng.integers(size // 4, size // 2, 2))
    r = int(rng.integers(8, 18))
    if malignant:
        pts = [(cx + (r + 10 * (i % 2)) * np.cos(a), cy + (r + 10 * (i % 2)) * np.sin(a))
               for i, a in enumerate(np.linspace(0, 2 * np.pi, 16, endpoint=False))]
        draw.polygon(pts, fill=230)
    else:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=150)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (size, size))
    return np.clip(arr, 0, 255).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def build_tiny_dataset(root: Path, *, sources_per_class: int = 4, copies: int = 3) -> Path:
    """train/val/test x benign/malignant; each source image has `copies` augmented copies in every
    split (the paper's layout), named like "1001 (2).png". Enough groups for the grouped protocol."""
    for split_i, split in enumerate(("train", "val", "test")):
        for label, cls in enumerate(("benign", "malignant")):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for s in range(sources_per_class):
                source_id = 1000 * (label + 1) + s + 1
                base = synthetic_mammogram(source_id, malignant=bool(label))
                for c in range(copies):
                    copy = np.rot90(base, k=(c + split_i) % 4) if c else base
                    noisy = np.clip(copy.astype(int) + (c + split_i), 0, 255).astype(np.uint8)
                    Image.fromarray(noisy).save(folder / f"{source_id} ({split_i * copies + c + 1}).png")
    return root


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_dataset(root: Path, *, sources_per_class: int = 4, copies: int = 3, splits: bool = True,
                 class_dirs: tuple[str, str] = ("benign", "malignant")) -> Path:
    """A tiny dataset in the paper's layout (train/val/test with class folders) or flat class folders.

    Source image ids are 1000 + k; copy j of source k is named "<id> (<j>).png" (copy 0 is "<id>.png").
    With splits, each source's copies are spread over train/val/test like the paper's split.
    """
    split_names = ("train", "val", "test")
    for label, cls in enumerate(class_dirs):
        for k in range(sources_per_class):
            source_id = 1000 + 100 * label + k
            for j in range(copies):
                name = f"{source_id}.png" if j == 0 else f"{source_id} ({j}).png"
                folder = root / split_names[j % 3] / cls if splits else root / cls
                write_png(folder / name, synthetic_mammogram(source_id * 100 + j, malignant=bool(label)))
    return root


def minimal_card(**fields) -> dict:
    """A model card with every field the schema requires (`mammo_core.store.card`), overridden by `fields`."""
    card = {"name": "m", "created": "2026-01-01T00:00:00+00:00", "architecture": "paper-cnn", "model_sha256": "",
            "input_pipeline": "resize", "threshold": 0.5, "class_names": ["benign", "malignant"],
            "input_shape": [224, 224, 1], "dataset": {}, "split": {"protocol": "grouped"}, "training": {},
            "evaluation": {"note": ""}, "metrics": {}}
    card.update(fields)
    return card


#: Fake patient identifiers that `dicom_bytes` writes into every file; no output may ever show them.
PATIENT_NAME, PATIENT_ID = "DOE^JANE", "PID-12345"
DIGITAL_MG = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation


def dicom_bytes(pixels: np.ndarray, *, transfer_syntax: str | None = None, **attrs) -> bytes:
    """A single-frame MG DICOM Part 10 file holding `pixels` (uint8/uint16/int16, or (H, W, 3) uint8 with
    attrs PhotometricInterpretation="RGB") uncompressed, with PATIENT_NAME and PATIENT_ID in its header.
    `attrs` set or override elements by keyword (12 bits stored for 16-bit data unless BitsStored is given)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = attrs.get("SOPClassUID", DIGITAL_MG)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.Modality = "MG"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1 if pixels.ndim == 2 else pixels.shape[2]
    ds.PhotometricInterpretation = "MONOCHROME2"
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = 12 if ds.BitsAllocated == 16 else ds.BitsAllocated
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelData = pixels.tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.HighBit = ds.BitsStored - 1
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def sigterm_and_wait(requested, timeout: float = 10.0) -> None:
    """SIGTERM to this process, then wait until the handler has set `requested` (it may raise in here)."""
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + timeout
    while not requested.is_set():
        assert time.time() < deadline, "the SIGTERM handler did not run"
        time.sleep(0.005)
