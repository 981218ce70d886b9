"""The PACS round trip against a real Orthanc (with its DICOMweb plugin) started by a session fixture.

Synthetic DICOM mammograms (both breasts, CC and MLO, patient identifiers that must never leak)
are uploaded through Orthanc's REST API; `python -m mammo_core pacs ...` then pulls, scores and
pushes back, and the tests read what came back into Orthanc over QIDO/WADO, parse the SR with
highdicom and validate the SR and the SC with dciodvfy. Tests that need Orthanc, dcmtk or
dicom3tools skip with a reason when `scripts/install_pacs.sh` could not install them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from io import BytesIO

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mammo_core.cli import main
from mammo_core.pacs.errors import safe_url
from mammo_core.pacs.vocabulary import DEFAULT_AET, DISCLAIMER, ENV_PASSWORD, SC_MAX_SIDE

from .factories import synthetic_mammogram

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
STORESCU = "/usr/bin/storescu"  # dcmtk's, not the one pynetdicom installs into the venv
DCIODVFY = "/usr/bin/dciodvfy"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
#: What the synthetic studies carry and no output of ours may contain.
SECRETS = {"PatientName": "SECRETNAME^JANE", "PatientID": "PID-SECRET-4242", "AccessionNumber": "ACCSECRET77",
           "PatientBirthDate": "19580214"}
FOUR_VIEWS = (("R", "CC"), ("R", "MLO"), ("L", "CC"), ("L", "MLO"))
ROWS, COLUMNS = 960, 768  # larger than SC_MAX_SIDE, so the Secondary Capture must be a reduced copy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing(*paths: str) -> str | None:
    gone = [p for p in paths if not os.path.exists(p)]
    return f"{', '.join(gone)} not installed (scripts/install_pacs.sh could not install it)" if gone else None


@dataclass
class OrthancServer:
    http_port: int
    dicom_port: int
    username: str
    password: str
    aet: str = "ORTHANC"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def rest(self, method: str, path: str, **kwargs):
        import requests

        response = requests.request(method, self.url + path, auth=(self.username, self.password), timeout=30, **kwargs)
        response.raise_for_status()
        return response

    def upload(self, datasets: list[Dataset]) -> None:
        for ds in datasets:
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            self.rest("POST", "/instances", data=buf.getvalue(), headers={"Content-Type": "application/dicom"})

    def client(self):
        from dicomweb_client.api import DICOMwebClient
        import requests

        session = requests.Session()
        session.auth = (self.username, self.password)
        return DICOMwebClient(url=self.dicomweb, session=session)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory) -> OrthancServer:
    """A throwaway Orthanc with the DICOMweb plugin on free loopback ports, with a test user and our AE
    title registered (REST PUT /modalities) so C-FIND and C-GET are allowed. Stopped by its PID."""
    import requests

    reason = _missing(ORTHANC, DICOMWEB_PLUGIN)
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("orthanc")
    server = OrthancServer(http_port=_free_port(), dicom_port=_free_port(), username="tester",
                           password=secrets.token_urlsafe(12))  # may start with "-": pass it as --password=...
    config = {
        "Name": "mammo-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
        "HttpPort": server.http_port, "DicomPort": server.dicom_port, "DicomAet": server.aet,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
        "RegisteredUsers": {server.username: server.password},
        "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomModalities": {}, "SaveJobs": False,
    }
    (root / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
    log = open(root / "orthanc.log", "wb")
    proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                server.rest("GET", "/system")
                break
            except requests.exceptions.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Orthanc did not start; see {root / 'orthanc.log'}")
                time.sleep(0.1)
        server.rest("PUT", "/modalities/mammo-assist",
                    json={"AET": DEFAULT_AET, "Host": "127.0.0.1", "Port": _free_port()})
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# --- synthetic studies ---------------------------------------------------------------------------


def mammogram(study_uid: str, series_uid: str, laterality: str, view: str, number: int, *, seed: int,
              modality: str = "MG", truncate_pixels: bool = False) -> Dataset:
    """A 12-bit for-presentation digital mammogram with the tags a real one carries (synthetic pixels)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop_class = MG_FOR_PRESENTATION if modality == "MG" else "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in SECRETS.items():
        setattr(ds, keyword, value)
    ds.PatientSex = "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.ReferringPhysicianName = "20240315", "101500", "1", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, number
    ds.Manufacturer, ds.BodyPartExamined = "synthetic", "BREAST"
    ds.ImageLaterality, ds.ViewPosition = laterality, view
    ds.PatientOrientation = ["A", "R"] if laterality == "L" else ["P", "L"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImagerPixelSpacing = [0.1, 0.1]
    base = synthetic_mammogram(seed, malignant=bool(seed % 2))
    pixels = np.asarray(Image.fromarray(base).resize((COLUMNS, ROWS), Image.BILINEAR)).astype(np.uint16) * 16
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ROWS, COLUMNS, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    data = pixels.tobytes()
    ds.PixelData = data[: len(data) // 2] if truncate_pixels else data
    return ds


def four_view_study(seed: int, *, broken: int | None = None) -> list[Dataset]:
    """Both breasts x CC/MLO; `broken` names an image whose pixel data is cut in half."""
    study, series = generate_uid(), generate_uid()
    return [mammogram(study, series, lat, view, i + 1, seed=seed + i, truncate_pixels=(i == broken))
            for i, (lat, view) in enumerate(FOUR_VIEWS)]


def run_cli(capsys, *argv: str) -> tuple[int, list[dict], str, str]:
    """Run `python -m mammo_core ...` in-process; (exit code, JSON lines, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return code, records, out, err


def assert_no_secrets(*texts: str, password: str | None = None) -> None:
    for text in texts:
        for keyword, value in SECRETS.items():
            assert value not in text and value.split("^")[0] not in text, f"{keyword} leaked into the output"
        if password:
            assert password not in text, "the password leaked into the output"


def by_level(records: list[dict], level: str) -> list[dict]:
    return [r for r in records if r.get("level") == level]


# --- the round trip over DICOMweb ----------------------------------------------------------------


@dataclass
class RoundTrip:
    study: list[Dataset]
    records: list[dict]
    stdout: str
    stderr: str
    code: int
    sr: Dataset
    captures: list[Dataset]


@pytest.fixture(scope="module")
def round_trip(orthanc, tiny_weights) -> RoundTrip:
    """Upload a 4-image study, run `pacs score --push-results --json` once, fetch the SR and SCs back."""
    study = four_view_study(seed=11)
    orthanc.upload(study)
    uid = study[0].StudyInstanceUID
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setenv(ENV_PASSWORD, orthanc.password)  # the password from the environment, not the command line
        code = main(["--weights", str(tiny_weights), "pacs", "score", "--dicomweb", orthanc.dicomweb,
                     "--username", orthanc.username, "--study", uid, "--push-results", "--json"])
    records = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    client = orthanc.client()  # read back over QIDO-RS and WADO-RS
    found: dict[str, list[Dataset]] = {}
    for series in client.search_for_series(study_instance_uid=uid):
        series_uid = series["0020000E"]["Value"][0]
        for inst in client.search_for_instances(study_instance_uid=uid, series_instance_uid=series_uid):
            found.setdefault(series["00080060"]["Value"][0], []).append(
                client.retrieve_instance(uid, series_uid, inst["00080018"]["Value"][0]))
    return RoundTrip(study, records, out.getvalue(), err.getvalue(), code, (found.get("SR") or [None])[0],
                     found.get("OT", []))


def test_score_prints_image_breast_and_exam_records(round_trip):
    assert round_trip.code == 0, round_trip.stderr
    images = by_level(round_trip.records, "image")
    assert sorted((r["laterality"], r["view"]) for r in images) == sorted(FOUR_VIEWS)
    assert {r["sop_instance_uid"] for r in images} == {str(ds.SOPInstanceUID) for ds in round_trip.study}
    for r in images:
        assert 0.0 <= r["probability"] <= 1.0 and r["label"] in ("benign", "malignant")
        assert r["study"] == round_trip.study[0].StudyInstanceUID and r["model"] == "tiny-grouped"
    breasts = {r["laterality"]: r for r in by_level(round_trip.records, "breast")}
    assert set(breasts) == {"L", "R"}
    for side, breast in breasts.items():
        views = [r["probability"] for r in images if r["laterality"] == side]
        assert breast["probability"] == pytest.approx(max(views), abs=1e-6)
        assert breast["views"] == ["CC", "MLO"] and breast["n_images"] == 2
    (exam,) = by_level(round_trip.records, "exam")
    assert exam["probability"] == pytest.approx(max(b["probability"] for b in breasts.values()), abs=1e-6)
    assert exam["label"] == ("malignant" if exam["probability"] >= exam["threshold"] else "benign")
    (results,) = by_level(round_trip.records, "results")
    assert len(results["sc_sop_instance_uids"]) == 4


def test_no_patient_identifier_or_password_in_output(round_trip, orthanc):
    assert_no_secrets(round_trip.stdout, round_trip.stderr, password=orthanc.password)


def test_sr_holds_the_json_scores_model_and_disclaimer(round_trip, tiny_weights):
    from mammo_core.pacs.sr import read_report
    from mammo_core.store.card import read_card

    assert round_trip.sr is not None, "no SR came back into the study"
    assert round_trip.sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert round_trip.sr.SOPInstanceUID == by_level(round_trip.records, "results")[0]["sr_sop_instance_uid"]
    report = read_report(round_trip.sr)
    for r in by_level(round_trip.records, "image"):
        entry = report["images"][r["sop_instance_uid"]]
        assert entry["probability"] == pytest.approx(r["probability"], abs=1e-6)
        assert entry["label"] == r["label"] and entry["threshold"] == pytest.approx(r["threshold"])
        if entry["region"] is not None:  # the Grad-CAM peak, on the source image's pixel grid
            xy = np.asarray(entry["region"])
            assert xy.shape == (5, 2) and (xy[:, 0] <= COLUMNS).all() and (xy[:, 1] <= ROWS).all()
    for r in by_level(round_trip.records, "breast"):
        assert report["breasts"][r["laterality"]]["probability"] == pytest.approx(r["probability"], abs=1e-6)
    exam = by_level(round_trip.records, "exam")[0]
    assert report["exam"]["probability"] == pytest.approx(exam["probability"], abs=1e-6)
    card = read_card(tiny_weights / "tiny-grouped")
    assert report["algorithm"] == {"name": "tiny-grouped", "version": card["model_sha256"]}
    assert DISCLAIMER in report["comments"]
    # DICOM requires the patient and study modules: copied from the source, and only there.
    assert round_trip.sr.PatientID == SECRETS["PatientID"]
    assert round_trip.sr.StudyInstanceUID == round_trip.study[0].StudyInstanceUID
    assert DISCLAIMER in round_trip.sr.SeriesDescription


def test_secondary_captures_show_the_overlay_and_reference_their_source(round_trip):
    assert len(round_trip.captures) == 4
    sources = {str(ds.SOPInstanceUID) for ds in round_trip.study}
    for sc in round_trip.captures:
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in sources
        assert sc.BurnedInAnnotation == "YES" and DISCLAIMER in sc.ImageComments
        rgb = sc.pixel_array
        # a reduced copy (the source is taller than wide) below a text banner
        assert rgb.shape[2] == 3 and sc.Columns == round(COLUMNS * SC_MAX_SIDE / ROWS) and sc.Rows > SC_MAX_SIDE
        picture = rgb[-SC_MAX_SIDE:]
        assert (picture[..., 2].astype(int) - picture[..., 0].astype(int)).max() > 30  # jet colours, not gray
        banner = rgb[: rgb.shape[0] - picture.shape[0]]
        yellow = (banner[..., 0] > 200) & (banner[..., 1] > 170) & (banner[..., 2] < 90)
        assert yellow.sum() > 50  # the disclaimer line is burned in


def test_sr_and_sc_pass_dciodvfy(round_trip, tmp_path):
    reason = _missing(DCIODVFY)
    if reason:
        pytest.skip(reason)
    for name, ds in (("sr.dcm", round_trip.sr), ("sc.dcm", round_trip.captures[0])):
        ds.save_as(tmp_path / name, enforce_file_format=True)
        result = subprocess.run([DCIODVFY, str(tmp_path / name)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{name}: {errors}"


# --- DIMSE, the listener, bad input --------------------------------------------------------------


def test_dimse_scores_the_same_and_pushes_with_c_store(orthanc, tiny_weights, capsys):
    study = four_view_study(seed=31)
    orthanc.upload(study)
    uid = study[0].StudyInstanceUID
    argv = ["--weights", str(tiny_weights), "pacs", "score", "--accession", SECRETS["AccessionNumber"], "--json"]
    code, web, _, err = run_cli(capsys, *argv[:4], "--dicomweb", orthanc.dicomweb, "--username", orthanc.username,
                                f"--password={orthanc.password}", "--study", uid, "--json")
    assert code == 0, err
    code, dimse, out, err = run_cli(capsys, *argv[:4], "--dimse", f"127.0.0.1:{orthanc.dicom_port}", "--aet",
                                    orthanc.aet, "--study", uid, "--push-results", "--json")
    assert code == 0, err
    assert_no_secrets(out, err)
    as_map = lambda recs: {r["sop_instance_uid"]: r["probability"] for r in by_level(recs, "image")}  # noqa: E731
    assert as_map(dimse) == pytest.approx(as_map(web), abs=1e-6) and len(as_map(dimse)) == 4
    pushed = by_level(dimse, "results")[0]
    stored = orthanc.rest("GET", f"/instances/{_orthanc_id(orthanc, pushed['sr_sop_instance_uid'])}/simplified-tags").json()
    assert stored["StudyInstanceUID"] == uid and stored["Modality"] == "SR"


def _orthanc_id(orthanc, sop_uid: str) -> str:
    found = orthanc.rest("POST", "/tools/lookup", data=sop_uid).json()
    assert found, f"instance {sop_uid} is not in Orthanc"
    return found[0]["ID"]


def test_listener_scores_a_study_pushed_by_storescu_once(orthanc, tiny_weights, tmp_path, capsys, monkeypatch):
    reason = _missing(STORESCU)
    if reason:
        pytest.skip(reason)
    study = four_view_study(seed=51)
    files = []
    for i, ds in enumerate(study):
        files.append(tmp_path / "in" / f"{i}.dcm")
        files[-1].parent.mkdir(exist_ok=True)
        ds.save_as(files[-1], enforce_file_format=True)
    orthanc.upload(study)  # the PACS holds the study the results are pushed into
    port = _free_port()
    monkeypatch.setenv(ENV_PASSWORD, orthanc.password)
    result = {}
    argv = ["--weights", str(tiny_weights), "pacs", "listen", "--port", str(port), "--out", str(tmp_path / "out"),
            "--idle", "1.5", "--max-studies", "1", "--push-results-to", orthanc.dicomweb, "--username",
            orthanc.username, "--json"]
    thread = threading.Thread(target=lambda: result.setdefault("code", main(argv)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while True:  # wait for the port (the model loads first)
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert time.monotonic() < deadline and thread.is_alive(), "the listener did not start"
        time.sleep(0.2)
    sent = subprocess.run([STORESCU, "-aec", DEFAULT_AET, "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    thread.join(timeout=120)
    assert not thread.is_alive() and result["code"] == 0
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    exams = by_level(records, "exam")
    assert len(exams) == 1 and exams[0]["n_images"] == 4  # scored once, with every image
    assert len(by_level(records, "image")) == 4 and len(by_level(records, "breast")) == 2
    assert len(list((tmp_path / "out" / study[0].StudyInstanceUID).glob("*.dcm"))) == 4
    sr_uid = by_level(records, "results")[0]["sr_sop_instance_uid"]
    assert _orthanc_id(orthanc, sr_uid)
    assert_no_secrets(out, err, password=orthanc.password)


def test_study_without_mammograms_is_a_clear_error(orthanc, tiny_weights, capsys):
    study, series = generate_uid(), generate_uid()
    orthanc.upload([mammogram(study, series, "L", "CC", 1, seed=3, modality="OT")])
    code, records, out, err = run_cli(capsys, "--weights", str(tiny_weights), "pacs", "score", "--dicomweb",
                                      orthanc.dicomweb, "--username", orthanc.username,
                                      f"--password={orthanc.password}", "--study", study, "--json")
    assert code == 2
    assert len(records) == 1 and "no for-presentation MG image" in records[0]["error"]
    assert "not scored (modality OT, not MG)" in err
    assert_no_secrets(out, err, password=orthanc.password)


def test_undecodable_image_is_one_error_and_the_rest_is_scored(orthanc, tiny_weights, capsys):
    study = four_view_study(seed=71, broken=3)  # L-MLO has half its pixel data
    orthanc.upload(study)
    code, records, out, err = run_cli(capsys, "--weights", str(tiny_weights), "pacs", "score", "--dicomweb",
                                      orthanc.dicomweb, "--username", orthanc.username,
                                      f"--password={orthanc.password}", "--study", study[0].StudyInstanceUID, "--push-results",
                                      "--json")
    assert code == 2
    bad = [r for r in by_level(records, "image") if "error" in r]
    assert len(bad) == 1 and bad[0]["sop_instance_uid"] == str(study[3].SOPInstanceUID)
    assert "\n" not in bad[0]["error"] and bad[0]["path"] in bad[0]["error"]
    assert len([r for r in by_level(records, "image") if "probability" in r]) == 3
    breasts = {r["laterality"]: r for r in by_level(records, "breast")}
    assert breasts["L"]["n_images"] == 1 and breasts["R"]["n_images"] == 2
    assert len(by_level(records, "results")[0]["sc_sop_instance_uids"]) == 3
    assert_no_secrets(out, err, password=orthanc.password)


@pytest.mark.parametrize("case", ["down", "bad-password", "dimse-down"])
def test_unreachable_or_refusing_pacs_is_one_line_and_exit_1(case, orthanc, tiny_weights, capsys):
    wrong = "not-" + orthanc.password
    if case == "down":
        where = ["--dicomweb", f"http://127.0.0.1:{_free_port()}/dicom-web"]
    elif case == "bad-password":
        where = ["--dicomweb", orthanc.dicomweb, "--username", orthanc.username, "--password", wrong]
    else:
        where = ["--dimse", f"127.0.0.1:{_free_port()}"]
    code, records, out, err = run_cli(capsys, "--weights", str(tiny_weights), "pacs", "score", *where,
                                      "--study", "1.2.3", "--json")
    assert code == 1 and records == []
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    expected = {"down": "is unreachable", "bad-password": "refused the credentials", "dimse-down": "is unreachable"}
    assert expected[case] in lines[0]
    assert wrong not in err and orthanc.password not in err


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_echo_confirms_the_connection(protocol, orthanc, capsys, monkeypatch):
    monkeypatch.setenv(ENV_PASSWORD, orthanc.password)
    where = (["--dicomweb", orthanc.dicomweb, "--username", orthanc.username] if protocol == "dicomweb"
             else ["--dimse", f"127.0.0.1:{orthanc.dicom_port}", "--aet", orthanc.aet])
    code, _, out, err = run_cli(capsys, "pacs", "echo", *where)
    assert code == 0 and out.strip().endswith(": OK"), err
    assert orthanc.password not in out + err


# --- pieces that need no server ------------------------------------------------------------------


def test_laterality_view_and_selection_rules():
    from mammo_core.pacs.study import laterality_of, skip_reason, view_of

    ds = mammogram(generate_uid(), generate_uid(), "R", "MLO", 1, seed=1)
    assert (laterality_of(ds), view_of(ds), skip_reason(ds)) == ("R", "MLO", None)
    del ds.ImageLaterality, ds.ViewPosition
    ds.Laterality = "L"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "399162004", "SCT", "cranio-caudal"
    ds.ViewCodeSequence = [code]
    assert (laterality_of(ds), view_of(ds)) == ("L", "CC")
    ds.PresentationIntentType = "FOR PROCESSING"
    assert "FOR PROCESSING" in skip_reason(ds)
    ds.Modality = "SR"
    assert "modality SR" in skip_reason(ds)


def test_breast_rules_and_cam_region_mapping():
    from mammo_core.pacs.scoring import combine
    from mammo_core.pacs.sr import cam_region_box

    assert combine([0.2, 0.6], "max") == 0.6 and combine([0.2, 0.6], "mean") == pytest.approx(0.4)
    with pytest.raises(ValueError, match="median"):
        combine([0.5], "median")
    heat = np.zeros((224, 224), np.float32)
    heat[100:112, 50:56] = 1.0  # one blob; the source image is 2x taller and 4x wider
    assert cam_region_box(heat, 448, 896) == (200.0, 200.0, 224.0, 224.0)


def test_messages_never_show_credentials():
    from mammo_core.pacs.dimse import parse_address

    assert safe_url("https://bob:hunter2@pacs.example:8443/dicom-web?x=1") == "https://pacs.example:8443/dicom-web"
    assert parse_address("pacs:104") == ("pacs", 104)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address("pacs")


def test_sr_carries_interval_distribution_flag_warnings_and_peak_region():
    """The fields an ensemble's Prediction adds reach the SR; the region sits on the Grad-CAM peak."""
    from types import SimpleNamespace

    from mammo_core.pacs.sc import build_capture
    from mammo_core.pacs.scoring import BreastScore, ImageScore, StudyScore
    from mammo_core.pacs.sr import build_report, read_report
    from mammo_core.pacs.study import image_from_dataset

    ds = mammogram(generate_uid(), generate_uid(), "L", "CC", 1, seed=2)
    heat = np.zeros((224, 224), np.float32)
    heat[112:128, 28:56] = 1.0  # rows 480-548, columns 96-192 of the 960x768 source
    pred = SimpleNamespace(name="x", probability=0.8, label="malignant", threshold=0.5, heatmap=heat, error=None,
                           image=SimpleNamespace(pixels=np.zeros((ROWS, COLUMNS), np.uint8)),
                           probability_interval=(0.7, 0.9), in_distribution=False, warnings=["unusual contrast"])
    image = ImageScore(image_from_dataset(ds), pred)
    score = StudyScore(study_uid=ds.StudyInstanceUID, model="m", model_sha256="ab" * 32, threshold=0.5, rule="max",
                       images=[image], breasts=[BreastScore("L", 0.8, "malignant", [image])],
                       exam_probability=0.8, exam_label="malignant")
    report = read_report(build_report(score, series_uid=generate_uid()))
    entry = report["images"][str(ds.SOPInstanceUID)]
    assert entry["interval"] == pytest.approx((0.7, 0.9)) and entry["in_distribution"] is False
    assert entry["warnings"] == ["unusual contrast"] and entry["label"] == "malignant"
    xy = np.asarray(entry["region"])
    assert xy[:, 0].min() == pytest.approx(96, abs=3) and xy[:, 0].max() == pytest.approx(192, abs=3)
    assert xy[:, 1].min() == pytest.approx(480, abs=3) and xy[:, 1].max() == pytest.approx(548, abs=3)
    assert report["breasts"]["L"]["probability"] == pytest.approx(0.8) and report["exam"]["label"] == "malignant"
    sc = build_capture(image, model_name="m", series_uid=generate_uid(), instance_number=1)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID and sc.Laterality == "L"
