"""Odd and broken files through the decoder, the app's upload path and `predict`: each is either read as a
viewer shows it or refused with one line naming the file; no patient identifier ever comes out; a folder
run goes past bad files and writes every output whole and under its own name. Every file is built here."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

pytest.importorskip("pydicom")

from mammo_core.errors import ImageReadError  # noqa: E402
from mammo_core.inference.predict import FOR_PROCESSING_WARNING, Predictor  # noqa: E402
from mammo_core.io.images import load_image  # noqa: E402

from .factories import PATIENT_ID, PATIENT_NAME, dicom_bytes, png_bytes, synthetic_mammogram  # noqa: E402

IDENTIFIERS = (PATIENT_NAME, PATIENT_ID)


def marked(rows: int = 48, cols: int = 64) -> np.ndarray:
    """A grey ramp with a bright block in the top-left corner: any turn or flip moves the block."""
    img = np.tile(np.linspace(40, 160, cols).astype(np.uint8), (rows, 1))
    img[2:14, 2:14] = 250
    return img


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def refused(source, name: str | None = None) -> str:
    with pytest.raises(ImageReadError) as info:
        load_image(source, name=name)
    message = str(info.value)
    assert "\n" not in message
    return message


def preparer() -> Predictor:
    """The app's and the CLI's decode + preprocess step, without a model."""
    return Predictor.preparer({"name": "m", "input_pipeline": "breast-crop-v1"})


# --- orientation -----------------------------------------------------------------------------------------

#: EXIF Orientation -> the transpose that turns the shown image into the stored one (the inverse of
#: what a viewer applies).
STORED_AS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 5: Image.Transpose.TRANSPOSE,
             6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(fmt, orientation):
    shown = marked()
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(shown).transpose(STORED_AS[orientation]), fmt, exif=exif.tobytes(),
                  **({"quality": 95} if fmt == "JPEG" else {}))
    loaded = load_image(data, name=f"turned.{fmt.lower()}")
    assert loaded.pixels.shape == shown.shape
    assert (loaded.metadata["width"], loaded.metadata["height"]) == (shown.shape[1], shown.shape[0])
    diff = np.abs(loaded.pixels.astype(int) - shown)
    assert diff.mean() < (2 if fmt == "JPEG" else 0.01)
    assert loaded.pixels[2:14, 2:14].mean() > 235  # the bright block is back in the top-left corner


def test_quarter_turned_tiff_is_read_not_refused_as_truncated():
    # Pillow turns a TIFF by its Orientation tag itself and reports the turned size; the strip check must
    # count the header's own rows. (Tall as shown, so wide as stored: one strip of fewer rows than shown.)
    shown = marked(rows=64, cols=48)
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[274] = 6
    data = encode(Image.fromarray(shown).transpose(STORED_AS[6]), "TIFF", tiffinfo=tags)
    assert np.array_equal(load_image(data, name="turned.tif").pixels, shown)


def test_bilevel_tiff_without_bits_per_sample_uses_the_tiff_default_of_one():
    tifffile = pytest.importorskip("tifffile")
    bits = marked() > 128
    buf = io.BytesIO()
    tifffile.imwrite(buf, bits, photometric="minisblack")
    assert 258 not in Image.open(io.BytesIO(buf.getvalue())).tag_v2  # BitsPerSample left to its default
    assert np.array_equal(load_image(buf.getvalue(), name="mask.tif").pixels, np.where(bits, 255, 0))


def test_animated_png_is_read_as_its_first_frame():
    first = marked()
    data = encode(Image.fromarray(first), "PNG", save_all=True, append_images=[Image.fromarray(255 - first)])
    assert np.array_equal(load_image(data, name="cine.png").pixels, first)


# --- refused before or while reading ---------------------------------------------------------------------


def _png_header_only() -> bytes:
    return png_bytes(marked())[:33]


def _tiff_without_its_directory() -> bytes:
    data = encode(Image.fromarray(marked()), "TIFF", compression="tiff_lzw")  # directory after the strips
    return data[: len(data) // 2]


def _float64_tiff() -> bytes:
    tifffile = pytest.importorskip("tifffile")
    buf = io.BytesIO()
    tifffile.imwrite(buf, marked().astype(np.float64))
    return buf.getvalue()


@pytest.mark.parametrize("fmt,build", [("PNG", lambda: png_bytes(marked())[:8]), ("PNG", _png_header_only),
                                       ("JPEG", lambda: encode(Image.fromarray(marked()), "JPEG")[:2]),
                                       ("TIFF", _tiff_without_its_directory), ("TIFF", _float64_tiff)],
                         ids=["png-signature-only", "png-header-only", "jpeg-2-bytes", "tiff-cut", "tiff-float64"])
def test_a_file_of_a_known_format_that_cannot_be_opened_says_which_format(fmt, build):
    message = refused(build(), name="scan_042.img")
    assert message.startswith("scan_042.img: ") and f"a {fmt} file that cannot be read" in message
    assert "not a readable image" in refused(b"plain text, not an image", name="notes.png")


def test_devices_pipes_and_huge_files_are_refused_before_reading(tmp_path, monkeypatch):
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)  # reading it would wait forever
    assert "not a regular file" in refused(pipe)
    pred = preparer().prepare_one(pipe, "pipe.png")  # the CLI's path into the decoder
    assert pred.error is not None and pred.error.startswith("pipe.png: ") and "not a regular file" in pred.error
    if Path("/dev/zero").exists():
        assert "not a regular file" in refused("/dev/zero")  # endless
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(marked()))
    monkeypatch.setattr("mammo_core.io.images.MAX_FILE_BYTES", 100)
    assert "over the limit of 100" in refused(big)


# --- DICOM -----------------------------------------------------------------------------------------------


def _ramp12() -> np.ndarray:
    return (marked().astype(np.uint16) * 16)


def test_an_element_damaged_where_it_is_read_late_is_refused_naming_it():
    data = bytearray(dicom_bytes(_ramp12()))
    at = data.find(b"\x08\x00\x60\x00CS")  # Modality: read only for the metadata, after the pixels
    data[at + 5] = 0xFF  # its VR becomes 'C\xff', which pydicom cannot convert
    message = refused(bytes(data), name="late.dcm")
    assert message.startswith("late.dcm: DICOM header is damaged") and "(0008,0060)" in message


def test_a_decoder_panic_is_an_image_read_error(monkeypatch):
    from pydicom.dataset import Dataset

    class PanicException(BaseException):  # what pyo3 (Rust) decoders raise: not an Exception
        pass

    def panic(self):
        raise PanicException("index out of bounds: the len is 3200 but the index is 3201")

    monkeypatch.setattr(Dataset, "pixel_array", property(panic))
    assert "could not be decoded (PanicException" in refused(dicom_bytes(_ramp12()), name="rle.dcm")


def test_an_rle_segment_that_runs_past_the_image_does_not_panic(capfd):
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    rows, cols = 40, 40
    # each of the two segments (high and low bytes) holds more than rows * cols bytes: pylibjpeg-rle panics
    runs = bytes([0x81, 0x01]) * (rows * cols // 128 + 5)  # replicate runs of 128 bytes
    header = struct.pack("<16I", 2, 64, 64 + len(runs), *([0] * 13))
    data = dicom_bytes(np.zeros((rows, cols), np.uint16), transfer_syntax=RLELossless,
                       PixelData=encapsulate([header + runs + runs]))
    try:
        load_image(data, name="rle.dcm")
    except ImageReadError as exc:
        assert str(exc).startswith("rle.dcm: ")
    assert "panicked" not in capfd.readouterr().err


def _ts_length_swallows_the_header() -> bytes:
    data = bytearray(dicom_bytes(_ramp12()))
    at = data.find(b"\x02\x00\x10\x00UI")  # Transfer Syntax UID
    end = data.find(PATIENT_ID.encode()) + 16
    data[at + 6:at + 8] = struct.pack("<H", (end - at - 8) // 2 * 2)  # its value now runs past the patient
    return bytes(data)


def _identifier_as_rescale_slope() -> bytes:
    return dicom_bytes(_ramp12(), RescaleSlope="1234567.9").replace(b"1234567.9", PATIENT_ID.encode())


def _identifier_as_photometric() -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns, writing, that it is no code string
        return dicom_bytes(_ramp12(), PhotometricInterpretation=PATIENT_NAME)


def _identifier_as_modality() -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dicom_bytes(_ramp12(), Modality=f"MG {PATIENT_ID}")  # read fine, shown in the metadata


@pytest.mark.parametrize("build", [_ts_length_swallows_the_header, _identifier_as_rescale_slope,
                                   _identifier_as_photometric, _identifier_as_modality],
                         ids=["transfer-syntax-length", "rescale-slope", "photometric", "modality"])
def test_no_patient_identifier_in_messages_metadata_warnings_or_logs(build, caplog):
    data = build()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        try:
            shown = repr(load_image(data, name="scan.dcm").metadata)
        except ImageReadError as exc:
            shown = str(exc)
            assert shown.startswith("scan.dcm: ")
    everything = " ".join([shown, caplog.text, *(str(w.message) for w in caught)])
    assert not [i for i in IDENTIFIERS if i in everything], everything[:500]


@pytest.mark.parametrize("marking", [{"PresentationIntentType": "FOR PROCESSING"},
                                     {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.2.1"}],
                         ids=["presentation-intent", "sop-class"])
def test_for_processing_image_is_scored_with_a_warning(marking):
    image = np.pad(synthetic_mammogram(3, malignant=True).astype(np.uint16) * 16, 8)
    plain = preparer().prepare_one(dicom_bytes(image), "plain.dcm")
    raw = preparer().prepare_one(dicom_bytes(image, **marking), "raw.dcm")
    assert plain.error is None and raw.error is None
    assert FOR_PROCESSING_WARNING not in plain.warnings and FOR_PROCESSING_WARNING in raw.warnings
    assert np.array_equal(raw.model_input, plain.model_input)  # scored all the same


# --- predict on a folder ---------------------------------------------------------------------------------


@pytest.fixture
def weights(request) -> Path:
    """The session's tiny trained models (conftest), when TensorFlow is there to train them."""
    pytest.importorskip("tensorflow")
    return request.getfixturevalue("tiny_weights")


def test_folder_run_writes_each_output_whole_under_its_own_name_and_leaks_nothing(weights, tmp_path, capsys):
    from mammo_core.cli import main

    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    good = synthetic_mammogram(3, malignant=True)
    (folder / "a.png").write_bytes(png_bytes(good))
    (folder / "a.jpg").write_bytes(encode(Image.fromarray(good), "JPEG", quality=95))
    (folder / "sub" / "a.png").write_bytes(png_bytes(synthetic_mammogram(4, malignant=False)))
    (folder / "DOE_JANE_12345.dcm").write_bytes(dicom_bytes(good.astype(np.uint16) * 16))
    (folder / "broken.dcm").write_bytes(_ts_length_swallows_the_header())
    (folder / "cut.png").write_bytes(png_bytes(good)[:300])
    cams, inputs, table = tmp_path / "cams", tmp_path / "inputs", tmp_path / "rows.csv"
    code = main(["--weights", str(weights), "predict", str(folder), "--json", "--gradcam", str(cams),
                 "--save-inputs", str(inputs), "--out", str(table)])
    out, err = capsys.readouterr()
    rows = {Path(r["path"]).relative_to(folder).as_posix(): r for r in map(json.loads, out.splitlines())}
    assert code == 2
    assert sorted(rows) == ["DOE_JANE_12345.dcm", "a.jpg", "a.png", "broken.dcm", "cut.png", "sub/a.png"]
    assert rows["broken.dcm"]["error"].startswith(str(folder / "broken.dcm") + ": DICOM")
    assert rows["cut.png"]["error"].startswith(str(folder / "cut.png") + ": ")
    # four scored inputs, four overlays, four model inputs: a.jpg, a.png and sub/a.png (in that order) do not
    # overwrite each other
    stems = ["DOE_JANE_12345", "a", "a_png", "a_png_2"]
    assert sorted(p.name for p in cams.iterdir()) == sorted(f"{s}_gradcam.png" for s in stems)
    assert sorted(p.name for p in inputs.iterdir()) == sorted(f"{s}_input.png" for s in stems)
    assert Image.open(inputs / "a_input.png").size == (224, 224)
    everything = out + err + table.read_text(encoding="utf-8")
    assert not [i for i in IDENTIFIERS if i in everything]


def test_overlay_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from mammo_core import cli

    def disk_full(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OSError):
        cli._save_png(marked(), tmp_path / "a_gradcam.png")
    assert list(tmp_path.iterdir()) == []


def test_cli_keeps_reader_warnings_off_stderr():
    from mammo_core import cli

    data = dicom_bytes(_ramp12(), NumberOfFrames=0)  # pydicom warns that 0 frames is invalid, assumes 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_image(data, name="zero_frames.dcm")
        assert caught, "pydicom no longer warns here; pick another warning to test with"
        caught.clear()
        cli._quiet_readers()
        load_image(data, name="zero_frames.dcm")
    assert caught == []


def test_pacs_readers_turn_pydicom_value_checks_off():
    """The PACS package (DICOMweb, C-GET, C-STORE datasets decoded as read) and the file reader both turn
    pydicom's value checks off, so a damaged header is never quoted in a warning or a log."""
    import importlib

    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.WARN
    import mammo_core.pacs

    importlib.reload(mammo_core.pacs)
    assert pydicom.config.settings.reading_validation_mode == pydicom.config.IGNORE
    pydicom.config.settings.reading_validation_mode = pydicom.config.WARN
    from mammo_core.pacs.study import image_from_bytes

    from pydicom.uid import generate_uid

    uids = {key: generate_uid() for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    image = image_from_bytes(dicom_bytes(synthetic_mammogram(0, malignant=False, size=64), **uids))
    assert image.data and pydicom.config.settings.reading_validation_mode == pydicom.config.IGNORE
