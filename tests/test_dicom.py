"""Tests for mammo_core.io.dicom through imaging.load_image: the display pipeline (modality LUT, VOI,
MONOCHROME1) pinned by pixel values, compressed transfer syntaxes, refused files and the privacy of
the metadata. Every DICOM file is built in tmp_path."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from PIL import Image  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import (  # noqa: E402
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

from mammo_core.errors import ImageReadError  # noqa: E402
from mammo_core.io.images import load_image  # noqa: E402
from mammo_core.io.pixels import MAX_PIXELS

DIGITAL_MG = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation

#: The window pinned below: 12-bit data, Window Center 2048, Width 1024 (DICOM LINEAR).
PROBE = np.array([0, 1000, 1536, 2048, 2559, 3000, 4095], dtype=np.uint16)
PROBE_WINDOWED = [0, 0, 0, 128, 255, 255, 255]


def make_dataset(arr: np.ndarray, *, bits_stored: int | None = None, **attrs) -> Dataset:
    """A minimal single-frame MG dataset holding `arr` uncompressed (uint8/uint16/int16)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DIGITAL_MG
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DIGITAL_MG
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    allocated = arr.dtype.itemsize * 8
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored or (12 if allocated == 16 else allocated)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    ds.PixelData = arr.tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def write(ds: Dataset, path: Path, **kwargs) -> Path:
    ds.save_as(path, enforce_file_format=True, **kwargs)
    return path


STEP = 14  # columns per probe value


def probe_image(values: np.ndarray = PROBE, rows: int = 40) -> np.ndarray:
    """Each of `values` fills a block of STEP columns (at least MIN_SIDE columns in all)."""
    return np.tile(np.repeat(values, STEP), (rows, 1))


def first_values(pixels: np.ndarray, count: int = len(PROBE)) -> list[int]:
    return pixels[0, ::STEP][:count].tolist()


def ramp16(rows: int = 48, cols: int = 64) -> np.ndarray:
    return (np.add.outer(np.arange(rows) * 37, np.arange(cols) * 53) % 4096).astype(np.uint16)


# --- display pipeline ---------------------------------------------------------------------------


def test_window_center_width_is_applied(tmp_path):
    path = write(make_dataset(probe_image(), WindowCenter=2048, WindowWidth=1024), tmp_path / "w.dcm")
    loaded = load_image(path)
    assert loaded.pixels.dtype == np.uint8 and loaded.pixels.shape == (40, len(PROBE) * STEP)
    assert first_values(loaded.pixels) == PROBE_WINDOWED
    assert loaded.metadata["voi"] == "window"
    assert loaded.metadata["window_center"] == 2048 and loaded.metadata["window_width"] == 1024


def test_first_of_several_windows_is_used(tmp_path):
    ds = make_dataset(probe_image(), WindowCenter=[2048, 500], WindowWidth=[1024, 200])
    assert first_values(load_image(write(ds, tmp_path / "w2.dcm")).pixels) == PROBE_WINDOWED


def test_monochrome1_is_inverted(tmp_path):
    ds = make_dataset(probe_image(), PhotometricInterpretation="MONOCHROME1", WindowCenter=2048, WindowWidth=1024)
    assert first_values(load_image(write(ds, tmp_path / "m1w.dcm")).pixels) == [255 - v for v in PROBE_WINDOWED]
    ds = make_dataset(probe_image(), PhotometricInterpretation="MONOCHROME1")
    pixels = load_image(write(ds, tmp_path / "m1.dcm")).pixels
    assert first_values(pixels)[0] == 255 and first_values(pixels)[-1] == 0  # min shown white


def test_rescale_is_applied_before_the_window(tmp_path):
    # Stored 1074 -> 2*1074 - 100 = 2048, the window centre; stored 1536 would be 0 without rescale.
    stored = np.array([0, 1074, 4095], dtype=np.uint16)
    ds = make_dataset(probe_image(stored), RescaleSlope=2, RescaleIntercept=-100, WindowCenter=2048, WindowWidth=1024)
    assert first_values(load_image(write(ds, tmp_path / "r.dcm")).pixels, 3) == [0, 128, 255]


def test_without_window_min_max_is_used(tmp_path):
    stored = np.array([500, 1500, 2500], dtype=np.uint16)
    loaded = load_image(write(make_dataset(probe_image(stored)), tmp_path / "mm.dcm"))
    assert first_values(loaded.pixels, 3) == [0, 128, 255]
    assert loaded.metadata["voi"] == "min-max"


def test_signed_pixels_min_max(tmp_path):
    stored = np.array([-1000, 0, 1000], dtype=np.int16)
    pixels = load_image(write(make_dataset(probe_image(stored)), tmp_path / "s.dcm")).pixels
    assert first_values(pixels, 3) == [0, 128, 255]


def test_8bit_without_window_is_unchanged(tmp_path):
    stored = np.array([10, 50, 90], dtype=np.uint8)
    pixels = load_image(write(make_dataset(probe_image(stored)), tmp_path / "8.dcm")).pixels
    assert first_values(pixels, 3) == [10, 50, 90]


@pytest.mark.parametrize("vr", ["OW", "US"])
def test_voi_lut_sequence_wins_and_large_8bit_lut_does_not_wrap(tmp_path, vr):
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]  # 4096 entries of 8 bits: indices above 255 must not wrap
    table = np.arange(4096) // 16
    item.add_new("LUTData", vr, table.astype("<u2").tobytes() if vr == "OW" else table.tolist())
    stored = np.array([0, 256, 2048, 4095], dtype=np.uint16)
    ds = make_dataset(probe_image(stored), WindowCenter=100, WindowWidth=10)
    ds.VOILUTSequence = Sequence([item])
    loaded = load_image(write(ds, tmp_path / "lut.dcm"))
    assert first_values(loaded.pixels, 4) == [0, 16, 128, 255]
    assert loaded.metadata["voi"] == "voi_lut"


def test_invalid_window_falls_back_to_min_max(tmp_path):
    stored = np.array([500, 1500, 2500], dtype=np.uint16)
    ds = make_dataset(probe_image(stored), WindowCenter=1500, WindowWidth=0)
    loaded = load_image(write(ds, tmp_path / "bad_window.dcm"))
    assert first_values(loaded.pixels, 3) == [0, 128, 255]
    assert loaded.metadata["voi"] == "min-max"


def test_rgb_dicom_becomes_luma(tmp_path):
    rgb = np.zeros((40, 40, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # pure red 200 -> luma 0.299 * 200 = 59.8
    ds = make_dataset(rgb[..., 0])
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()
    pixels = load_image(write(ds, tmp_path / "rgb.dcm")).pixels
    assert pixels.shape == (40, 40) and np.all(pixels == 60)


# --- transfer syntaxes --------------------------------------------------------------------------


def _encapsulated(ds: Dataset, frame: bytes, syntax: UID) -> Dataset:
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def test_rle_lossless(tmp_path):
    arr = ramp16()
    ds = make_dataset(arr)
    ds.compress(RLELossless)
    loaded = load_image(write(ds, tmp_path / "rle.dcm"))
    assert loaded.metadata["transfer_syntax"] == "RLE Lossless"
    assert np.array_equal(loaded.pixels, load_image(write(make_dataset(arr), tmp_path / "raw.dcm")).pixels)


def test_jpeg2000_lossless(tmp_path):
    arr = ramp16()
    ds = make_dataset(arr)
    ds.compress(JPEG2000Lossless)  # pylibjpeg-openjpeg's encoder
    loaded = load_image(write(ds, tmp_path / "j2k.dcm"))
    assert "JPEG 2000" in loaded.metadata["transfer_syntax"]
    assert np.array_equal(loaded.pixels, load_image(write(make_dataset(arr), tmp_path / "raw.dcm")).pixels)


def test_jpeg_baseline_8bit(tmp_path):
    arr = (np.add.outer(np.arange(48), np.arange(64)) * 2).astype(np.uint8)  # smooth 0..220
    buf = BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    ds = _encapsulated(make_dataset(arr), buf.getvalue(), JPEGBaseline8Bit)
    loaded = load_image(write(ds, tmp_path / "jpeg.dcm"))
    assert loaded.pixels.shape == arr.shape
    assert np.abs(loaded.pixels.astype(int) - arr).mean() < 2  # lossy, but close
    assert loaded.metadata["transfer_syntax"].startswith("JPEG Baseline")


def _jpeg_lossless_sv1(arr: np.ndarray, precision: int) -> bytes:
    """Minimal JPEG lossless (Process 14, predictor 1) encoder for one grayscale component.

    No encoder for this syntax ships with the test dependencies, and it is the commonest
    compression of full-field mammograms, so the test writes its own: every Huffman code is the
    5-bit category number (17 categories fit, none all-ones).
    """
    rows, cols = arr.shape
    x = arr.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[1:, 1:] = x[1:, :-1]
    diffs = (x - pred) % 65536
    diffs = np.where(diffs >= 32768, diffs - 65536, diffs).ravel()

    acc, nbits, body = 0, 0, bytearray()
    for diff in diffs.tolist():
        size = abs(diff).bit_length()
        acc, nbits = (acc << 5) | size, nbits + 5
        if 0 < size < 16:
            acc, nbits = (acc << size) | (diff if diff > 0 else diff + (1 << size) - 1), nbits + size
        while nbits >= 8:
            nbits -= 8
            byte = (acc >> nbits) & 0xFF
            body.append(byte)
            if byte == 0xFF:
                body.append(0)  # byte stuffing
        acc &= (1 << nbits) - 1
    if nbits:
        byte = ((acc << (8 - nbits)) | ((1 << (8 - nbits)) - 1)) & 0xFF  # pad with 1-bits
        body += bytes([byte, 0]) if byte == 0xFF else bytes([byte])

    counts = [0] * 16
    counts[4] = 17
    out = bytearray(b"\xff\xd8")
    out += b"\xff\xc3" + struct.pack(">HBHHB", 11, precision, rows, cols, 1) + bytes([1, 0x11, 0])
    out += b"\xff\xc4" + struct.pack(">HB", 2 + 1 + 16 + 17, 0) + bytes(counts) + bytes(range(17))
    out += b"\xff\xda" + struct.pack(">HB", 8, 1) + bytes([1, 0x00, 1, 0, 0])
    return bytes(out + body + b"\xff\xd9")


def test_jpeg_lossless_sv1(tmp_path):
    arr = ramp16()
    ds = _encapsulated(make_dataset(arr), _jpeg_lossless_sv1(arr, 12), JPEGLosslessSV1)
    loaded = load_image(write(ds, tmp_path / "jll.dcm"))
    assert "Lossless" in loaded.metadata["transfer_syntax"]
    assert np.array_equal(loaded.pixels, load_image(write(make_dataset(arr), tmp_path / "raw.dcm")).pixels)


def test_deflated_explicit_vr(tmp_path):
    arr = ramp16()
    ds = make_dataset(arr)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    loaded = load_image(write(ds, tmp_path / "deflate.dcm"))
    assert np.array_equal(loaded.pixels, load_image(write(make_dataset(arr), tmp_path / "raw.dcm")).pixels)


def test_full_field_size_loads(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 4096, size=(4084, 3328), dtype=np.uint16)
    loaded = load_image(write(make_dataset(arr, WindowCenter=2048, WindowWidth=4096), tmp_path / "ffdm.dcm"))
    assert loaded.pixels.shape == (4084, 3328) and loaded.pixels.dtype == np.uint8
    assert loaded.metadata["width"] == 3328 and loaded.metadata["height"] == 4084
    assert loaded.metadata["bit_depth"] == 12


# --- refused files ------------------------------------------------------------------------------


def _refused(path: Path, *fragments: str) -> str:
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    message = str(info.value)
    assert path.name in message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    return message


def test_multi_frame_is_refused(tmp_path):
    frames = np.stack([ramp16(), ramp16()])
    ds = make_dataset(ramp16(), NumberOfFrames=2)
    ds.PixelData = frames.tobytes()
    _refused(write(ds, tmp_path / "dbt.dcm"), "multi-frame", "2 frames")


def test_no_pixel_data_is_refused(tmp_path):
    ds = make_dataset(ramp16())
    del ds.PixelData
    _refused(write(ds, tmp_path / "sr.dcm"), "no pixel data")


def test_unknown_transfer_syntax_is_refused(tmp_path):
    ds = make_dataset(ramp16())
    ds.file_meta.TransferSyntaxUID = UID("1.2.3.4.5.6.7")
    path = write(ds, tmp_path / "odd.dcm", implicit_vr=False, little_endian=True)
    _refused(path, "transfer syntax", "1.2.3.4.5.6.7", "not supported")


def test_missing_decoder_is_refused(tmp_path, monkeypatch):
    import pydicom.pixels

    class NoPlugin:
        is_available = False
        missing_dependencies = ["pyjpegls - requires pyjpegls"]

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: NoPlugin())
    ds = _encapsulated(make_dataset(ramp16()), b"\xff\xd8\xff\xd9", UID("1.2.840.10008.1.2.4.80"))
    _refused(write(ds, tmp_path / "jls.dcm"), "JPEG-LS", "not installed", "pyjpegls")


def test_truncated_pixel_data_is_refused(tmp_path):
    path = write(make_dataset(ramp16()), tmp_path / "whole.dcm")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:-1000])
    _refused(cut, "damaged or truncated")


def test_corrupted_header_is_refused(tmp_path):
    path = tmp_path / "garbage.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + bytes(range(256)) * 4)
    _refused(path, "damaged")


def _j2k_file(tmp_path: Path) -> bytes:
    ds = make_dataset(ramp16())
    ds.compress(JPEG2000Lossless)
    return write(ds, tmp_path / "j2k.dcm").read_bytes()


def test_corrupted_compressed_frame_is_refused(tmp_path):
    data = bytearray(_j2k_file(tmp_path))
    start = data.find(b"\xff\x4f\xff\x51")  # J2K codestream: SOC then SIZ marker
    data[start + 4 : start + 40] = b"\xff" * 36  # wreck the SIZ header, keep the file's length
    bad = tmp_path / "bad_j2k.dcm"
    bad.write_bytes(bytes(data))
    _refused(bad, "damaged or truncated", "JPEG 2000")


def test_cut_compressed_file_is_refused(tmp_path):
    data = _j2k_file(tmp_path)
    cut = tmp_path / "cut_j2k.dcm"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.warns(UserWarning):  # pydicom's own "End of file reached" warning
        _refused(cut, "damaged or truncated")


def test_huge_header_is_refused_before_decoding(tmp_path):
    ds = make_dataset(ramp16())
    ds.Rows, ds.Columns = 20000, 20000  # the pixel data does not match: it must never be read
    assert 20000 * 20000 > MAX_PIXELS
    _refused(write(ds, tmp_path / "bomb.dcm"), "decompression bomb")


def test_tiny_dicom_is_refused(tmp_path):
    _refused(write(make_dataset(np.zeros((8, 8), np.uint16)), tmp_path / "tiny.dcm"), "at least")


# --- privacy ------------------------------------------------------------------------------------


def test_metadata_holds_no_identifiers(tmp_path):
    identifiers = {
        "PatientName": "Doe^Jane",
        "PatientID": "PID-4411-XYZ",
        "PatientBirthDate": "19610923",
        "AccessionNumber": "ACC-778899",
        "InstitutionName": "Saint Example Hospital",
        "ReferringPhysicianName": "Who^Doctor",
        "StudyID": "STUDY-5521",
        "StudyDate": "20240131",
        "OtherPatientIDs": "OTHER-ID-1",
    }
    ds = make_dataset(probe_image(), WindowCenter=2048, WindowWidth=1024, ViewPosition="CC",
                      ImageLaterality="L", **identifiers)
    loaded = load_image(write(ds, tmp_path / "named.dcm"))
    text = repr(loaded.metadata)
    for value in [*identifiers.values(), "Doe", "Jane", ds.SOPInstanceUID]:
        assert value not in text, f"{value!r} leaked into metadata"
    assert loaded.metadata["view_position"] == "CC" and loaded.metadata["laterality"] == "L"
    assert loaded.metadata["format"] == "DICOM" and loaded.metadata["photometric"] == "MONOCHROME2"


def test_pydicom_still_needs_our_voi_lut_workaround():
    """`dicom._apply_voi_lut_sequence` exists because pydicom's `apply_voi` wraps an 8-bit VOI LUT with
    more than 256 entries. When this test fails, pydicom has fixed it: drop the workaround for `apply_voi`."""
    from pydicom import Dataset
    from pydicom.pixels import apply_voi
    from pydicom.sequence import Sequence

    from mammo_core.io.dicom import _apply_voi_lut_sequence

    ds = Dataset()
    ds.PhotometricInterpretation, ds.BitsStored, ds.BitsAllocated, ds.PixelRepresentation = "MONOCHROME2", 12, 16, 0
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    lut = (np.arange(4096) // 16).astype(np.uint16)  # monotonic 0..255
    item.LUTData = lut.tolist()
    ds.VOILUTSequence = Sequence([item])
    values = np.array([0, 1000, 2000, 4095], dtype=np.uint16)
    ours, _, _ = _apply_voi_lut_sequence(values, ds)
    assert ours.tolist() == lut[values].tolist()
    assert apply_voi(values, ds).tolist() != lut[values].tolist(), "pydicom fixed the wrap-around; use apply_voi"
