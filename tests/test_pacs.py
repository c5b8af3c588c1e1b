"""The PACS worker (scripts/pacs.py, bone_r.pacs) against a real Orthanc server, through its REST API (--url) and
through DICOMweb (--dicomweb: QIDO-RS, WADO-RS, STOW-RS with dicomweb-client, Orthanc's DICOMweb plugin serving).

One Orthanc for the module, serving both, started here on a free loopback port with a temporary storage folder and
a user whose password only the worker's environment knows, stopped at the end. Each test starts from an empty server. Radiographs
go in through Orthanc's REST API (synthetic phantoms with a known box; the real sample DICOMs of ../shared/data when
they are there), the worker runs as its command line does, and what it stored is read back from Orthanc with
pydicom and highdicom: one SR and one overlay per radiograph, in the source's study, referencing the source, its
regions in the source's pixels; nothing added by a second run, nor by a run of the other protocol.

Orthanc is Debian's `orthanc` package, its DICOMweb plugin `orthanc-dicomweb` (.ci/run installs both). Without them
these tests skip, unless CI or BONE_R_REQUIRE_ORTHANC=1 is set: then they fail.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

import inference
from bone_r import DISCLAIMER, dicom_results, pacs
from bone_r.image import DEFAULT_MAX_MEMORY
from bone_r.runs import ROOT
from bone_r.synthetic import make_dicom, make_phantom
from fakes import write_fake_model
from scripts import pacs as pacs_script

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom-samples"
USER = "boner-worker"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian's orthanc-dicomweb


def orthanc_required() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false") or os.environ.get("BONE_R_REQUIRE_ORTHANC") == "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, password: str, dicomweb: bool):
        self.url, self.password = url, password
        self.dicomweb = f"{url}/dicom-web" if dicomweb else None  # the plugin's root, when it is loaded
        self.http = requests.Session()
        self.http.auth = (USER, password)
        self.http.trust_env = False

    def get(self, path: str, **kw):
        response = self.http.get(self.url + path, timeout=30, **kw)
        response.raise_for_status()
        return response

    def upload(self, data: bytes) -> dict:
        response = self.http.post(self.url + "/instances", data=data, timeout=30)
        response.raise_for_status()
        return response.json()

    def instances(self) -> list[dict]:
        return self.get("/instances", params={"expand": ""}).json()

    def file(self, instance: str) -> pydicom.Dataset:
        return pydicom.dcmread(io.BytesIO(self.get(f"/instances/{instance}/file").content))

    def clear(self) -> None:
        for study in self.get("/studies").json():
            self.http.delete(f"{self.url}/studies/{study}", timeout=30).raise_for_status()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    binary = shutil.which("Orthanc")
    if binary is None:
        reason = "Orthanc is not installed (apt-get install orthanc)"
        if orthanc_required():
            pytest.fail(f"{reason}; it is required here (CI or BONE_R_REQUIRE_ORTHANC=1)", pytrace=False)
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("orthanc")
    port, password = _free_port(), secrets.token_urlsafe(12)
    config = {
        "Name": "bone-r-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": port, "RemoteAccessAllowed": False, "DicomServerEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.is_file() else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: password},
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", password, DICOMWEB_PLUGIN.is_file())
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if server.http.get(server.url + "/system", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
def server(orthanc, monkeypatch):
    """An empty server, and the worker's credentials in its environment."""
    orthanc.clear()
    monkeypatch.setenv(pacs.USER_ENV, USER)
    monkeypatch.setenv(pacs.PASSWORD_ENV, orthanc.password)
    return orthanc


def endpoint(server: Server, protocol: str) -> tuple[str, str]:
    """(flag, URL) that point the worker at `server` through `protocol` ("rest" or "dicomweb")."""
    if protocol == "rest":
        return "--url", server.url
    if server.dicomweb is None:
        reason = f"Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb: {DICOMWEB_PLUGIN})"
        if orthanc_required():
            pytest.fail(f"{reason}; it is required here (CI or BONE_R_REQUIRE_ORTHANC=1)", pytrace=False)
        pytest.skip(reason)
    return "--dicomweb", server.dicomweb


def radiograph(pixels: np.ndarray, *, study: str, modality: str = "DX", patient: str = "PHANTOM", truncate: bool = False) -> bytes:
    """A phantom as a DICOM file of `study` (its own series), as a modality would send it."""
    ds = pydicom.dcmread(io.BytesIO(make_dicom(pixels)))
    ds.Modality = modality
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.PatientID, ds.PatientName = patient, "Phantom^Synthetic"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20261129", "120000", "A1", "1"
    ds.ReferringPhysicianName, ds.PatientBirthDate, ds.PatientSex = "", "", "O"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    if truncate:  # the pixel data ends early: the file is stored, but no decoder can read it
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def capture(capsys, caplog):
    """What the worker prints and logs (under pytest its log lines go to caplog)."""
    caplog.set_level(logging.INFO, logger="boner")

    def read() -> str:
        out = capsys.readouterr()
        text = caplog.text + out.out + out.err
        caplog.clear()
        return text
    return read


def run_worker(capture, url: str, *args: str, flag: str = "--url") -> tuple[int, str]:
    code = pacs_script.main([flag, url, "--once", *args])
    return code, capture()


def results_of(server: Server, source_uid: str) -> tuple[list[dict], list[dict]]:
    """(SRs, overlays) on the server whose reference is `source_uid`."""
    srs, overlays = [], []
    for inst in server.instances():
        ds = server.file(inst["ID"])
        if ds.Modality == "SR":
            refs = [item.ReferencedSOPInstanceUID for ev in ds.CurrentRequestedProcedureEvidenceSequence
                    for series in ev.ReferencedSeriesSequence for item in series.ReferencedSOPSequence]
            if source_uid in refs:
                srs.append({"id": inst["ID"], "ds": ds})
        elif getattr(ds, "SourceImageSequence", None) and ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source_uid:
            overlays.append({"id": inst["ID"], "ds": ds})
    return srs, overlays


def read_sr(ds: pydicom.Dataset):
    """The SR through highdicom: (image-level group, planar ROI groups)."""
    import highdicom as hd

    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    image_level = sr.content.get_image_measurement_groups()
    return image_level, sr.content.get_planar_roi_measurement_groups()


def region_source(region) -> tuple[str, str]:
    """(SOP class, SOP instance) of the image a region is drawn on (its SELECTED FROM item)."""
    [selected_from] = region.ContentSequence
    assert selected_from.RelationshipType == "SELECTED FROM"
    ref = selected_from.ReferencedSOPSequence[0]
    return ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID


def text_values(group, meaning: str) -> list[str]:
    return [str(item.TextValue) for item in group[0].ContentSequence
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeMeaning == meaning]


# --------------------------------------------------------------------------- a phantom with a known box


@pytest.fixture(scope="module")
def known_box_model(tmp_path_factory):
    """The fake backend (tests/fakes.py) answering one box where the phantom's fracture is, and nothing else."""
    phantom = make_phantom(600, 500, fractured=True, seed=3, bits=16)
    h, w = phantom.pixels.shape
    x1, y1, x2, y2 = phantom.box
    boxes = [[(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h, 0.83],
             [0.2, 0.2, 0.1, 0.1, 0.01]]  # below every threshold: never reported
    weights = write_fake_model(tmp_path_factory.mktemp("fake-model"), boxes, thresholds={"balanced": 0.5})
    return phantom, weights


def check_phantom_results(server: Server, source_id: str, phantom, study: str) -> pydicom.Dataset:
    """The phantom's one SR and one overlay, read back from the server: where they are, what they say, the SR's
    region on the phantom's box in its own pixels. Returns the SR."""
    source_ds = server.file(source_id)
    srs, overlays = results_of(server, source_ds.SOPInstanceUID)
    assert len(srs) == 1 and len(overlays) == 1
    sr, overlay = srs[0]["ds"], overlays[0]["ds"]
    for ds in (sr, overlay):  # the source's study and patient, a series of its own that says what it is
        assert ds.StudyInstanceUID == study and ds.PatientID == "PHANTOM"
        assert ds.SeriesInstanceUID != source_ds.SeriesInstanceUID
        assert "machine-generated, not a diagnosis" in ds.SeriesDescription
    stored = {i["ID"]: i for i in server.instances()}
    assert stored[srs[0]["id"]]["ParentSeries"] != stored[overlays[0]["id"]]["ParentSeries"]

    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage and sr.CompletionFlag == "COMPLETE"
    image_level, findings = read_sr(sr)
    assert len(findings) == 1
    finding = findings[0]
    region = finding.roi
    assert region.graphic_type.value == "POLYLINE"
    x1, y1, x2, y2 = phantom.box  # in the source's own pixels (500 x 600: no harmonization resize either way)
    np.testing.assert_allclose(region.value, [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], atol=0.01)
    assert region_source(region) == (source_ds.SOPClassUID, source_ds.SOPInstanceUID)
    assert finding.finding_type.meaning == "Fracture"
    [score] = finding.get_measurements()
    assert score.name.meaning == "Detector score" and score.value == pytest.approx(0.83)
    assert text_values(finding, "Fracture type (best guess, not a diagnosis)")
    assert text_values(finding, "Disclaimer") == [DISCLAIMER]
    algorithm = {item.ConceptNameCodeSequence[0].CodeMeaning: str(item.TextValue) for item in finding[0].ContentSequence
                 if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeMeaning.startswith("Algorithm")}
    assert algorithm["Algorithm Name"] == "Bone-R fake" and algorithm["Algorithm Version"].startswith("sha256:")
    [image_group] = image_level
    values = {m.name.meaning: m.value for m in image_group.get_measurements()}
    assert values == {"Highest detector score": pytest.approx(0.83), "Score threshold": pytest.approx(0.5)}
    assert text_values(image_group, "Operating mode") == ["balanced"]
    assert text_values(image_group, "Summary")[0].startswith("Bone-R suspects a fracture: 1 region(s)")

    assert overlay.Modality == "OT" and overlay.BurnedInAnnotation == "YES" and overlay.PhotometricInterpretation == "RGB"
    assert overlay.Columns == 500 and overlay.Rows > 600  # the image, then the key and the disclaimer band below it
    pixels = overlay.pixel_array
    assert (np.abs(pixels[:600].astype(int) - pixels[:600].mean(axis=2, keepdims=True)) > 40).any()  # a coloured box
    preview = server.get(f"/instances/{overlays[0]['id']}/preview")
    assert preview.headers["content-type"] == "image/png"
    return sr


def upload_others(server: Server, study: str) -> tuple[dict, dict]:
    """A CT series in `study` and an undecodable DX file in a study of its own: what a pass must skip."""
    ct = server.upload(radiograph(make_phantom(64, 64, fractured=False, seed=1).pixels, study=study, modality="CT"))
    broken = server.upload(radiograph(make_phantom(64, 64, seed=2).pixels, study=pydicom.uid.generate_uid(), truncate=True))
    return ct, broken


def check_pass(log: str, server: Server, stored: str, ct_series: str, broken: str, counts: str) -> None:
    """The log of a pass that stored the phantom's results and skipped `upload_others`, each named as the worker
    names it: one line each, then the counts; never the password."""
    assert f"stored  instance {stored} (DX): fracture suspected (1 box(es))" in log
    assert f"skipped series {ct_series}" in log and "modality CT is not a radiograph" in log
    assert f"skipped instance {broken} (DX): undecodable" in log
    assert f"{counts}, 2 skipped, 0 failed" in log
    assert server.password not in log


def test_worker_stores_an_sr_and_an_overlay_in_the_study_and_a_second_run_adds_nothing(server, capture, known_box_model):
    phantom, weights = known_box_model
    study = pydicom.uid.generate_uid()
    source = server.upload(radiograph(phantom.pixels, study=study))
    ct, broken = upload_others(server, study)
    before = len(server.instances())

    code, log = run_worker(capture, server.url, "--weights", str(weights))
    assert code == 0, log
    check_pass(log, server, source["ID"], ct["ParentSeries"], broken["ID"], "1 analysed and stored, 0 already done")
    assert len(server.instances()) == before + 2

    check_phantom_results(server, source["ID"], phantom, study)

    code, log = run_worker(capture, server.url, "--weights", str(weights))
    assert code == 0, log
    assert f"done    instance {source['ID']} (DX): its Bone-R result is already stored" in log
    assert "0 analysed and stored, 1 already done, 2 skipped" in log
    assert len(server.instances()) == before + 2


def test_dicomweb_worker_stores_the_same_results_and_sees_what_rest_stored_and_vice_versa(server, capture, known_box_model):
    flag, url = endpoint(server, "dicomweb")
    phantom, weights = known_box_model
    study = pydicom.uid.generate_uid()
    first = server.upload(radiograph(phantom.pixels, study=study))
    code, log = run_worker(capture, server.url, "--weights", str(weights))  # REST does the first radiograph
    assert code == 0 and "1 analysed and stored, 0 already done" in log, log
    second = server.upload(radiograph(phantom.pixels, study=study))
    ct, broken = upload_others(server, study)
    uid_of = {name: server.file(inst["ID"]) for name, inst in (("first", first), ("second", second), ("ct", ct), ("broken", broken))}
    before = len(server.instances())

    code, log = run_worker(capture, url, "--weights", str(weights), flag=flag)  # DICOMweb: the second, not the first
    assert code == 0, log
    assert f"DICOMweb service at {url}; model fake" in log
    assert f"done    instance {uid_of['first'].SOPInstanceUID} (DX): its Bone-R result is already stored" in log
    check_pass(log, server, uid_of["second"].SOPInstanceUID, uid_of["ct"].SeriesInstanceUID,
               uid_of["broken"].SOPInstanceUID, "1 analysed and stored, 1 already done")
    assert len(server.instances()) == before + 2

    sr = check_phantom_results(server, second["ID"], phantom, study)
    rest_sr = check_phantom_results(server, first["ID"], phantom, study)
    predictor = inference.Predictor(weights)
    identity = {"model": dicom_results.model_identity(predictor.card, predictor.weights, predictor.name),
                "mode": "balanced", "threshold": 0.5}
    for made, source in ((sr, uid_of["second"]), (rest_sr, uid_of["first"])):  # one name, whichever protocol made it
        assert made.SOPInstanceUID == dicom_results.result_uids(study, source.SOPInstanceUID, identity).sr

    code, log = run_worker(capture, url, "--weights", str(weights), flag=flag)
    assert code == 0 and "0 analysed and stored, 2 already done, 2 skipped, 0 failed" in log, log
    code, log = run_worker(capture, server.url, "--weights", str(weights))  # REST sees what DICOMweb stored
    assert code == 0, log
    assert f"done    instance {second['ID']} (DX): its Bone-R result is already stored" in log
    assert "0 analysed and stored, 2 already done, 2 skipped, 0 failed" in log
    assert len(server.instances()) == before + 2


def test_dicomweb_store_refused_fails_that_instance_not_the_run(server, monkeypatch, capture, known_box_model):
    flag, url = endpoint(server, "dicomweb")
    _, weights = known_box_model
    client = pacs.DicomWeb(url, (USER, server.password))
    ds = pydicom.dcmread(io.BytesIO(radiograph(make_phantom(64, 64, seed=5).pixels, study=pydicom.uid.generate_uid())))
    elsewhere = pacs.Instance("x", pydicom.uid.generate_uid(), ds.SOPInstanceUID, ref=ds.SeriesInstanceUID)
    with pytest.raises(pacs.StoreFailed, match="HTTP 409"):  # STOW-RS to another study than the instance's
        client.store_results(elsewhere, [ds])
    assert server.instances() == []

    def partly(self, datasets, study_instance_uid=None):  # a server that answers 202, each instance failed (PS3.18 10.5.3)
        answer = pydicom.Dataset()
        answer.ReferencedSOPSequence, answer.FailedSOPSequence = [], []
        for item in datasets:
            failed = pydicom.Dataset()
            failed.ReferencedSOPInstanceUID, failed.FailureReason = item.SOPInstanceUID, 0xA700
            answer.FailedSOPSequence.append(failed)
        return answer
    import dicomweb_client

    monkeypatch.setattr(dicomweb_client.DICOMwebClient, "store_instances", partly)
    sources = [server.upload(radiograph(make_phantom(64, 64, seed=s).pixels, study=pydicom.uid.generate_uid())) for s in (6, 7)]
    code, log = run_worker(capture, url, "--weights", str(weights), flag=flag)
    assert code == 1, log
    for source in sources:
        assert f"failed  instance {server.file(source['ID']).SOPInstanceUID} (DX): STOW-RS did not store" in log
    assert "failure reason 42752" in log and "0 analysed and stored, 0 already done, 0 skipped, 2 failed" in log
    assert len(server.instances()) == 2


def test_no_finding_gives_a_clear_report_and_watch_does_each_instance_once(server, known_box_model):
    _, weights = known_box_model
    predictor = inference.Predictor(weights)
    identity = {"model": dicom_results.model_identity(predictor.card, weights), "mode": "specific", "threshold": 0.9,
                "disclaimer": DISCLAIMER}
    analyse = pacs_script.make_analyse(predictor, "specific", 0.9, identity, DEFAULT_MAX_MEMORY)
    source = server.upload(radiograph(make_phantom(300, 240, seed=4).pixels, study=pydicom.uid.generate_uid(),
                                      modality="CR"))
    client = pacs.Orthanc(server.url, (USER, server.password))
    counts = pacs.watch(client, analyse, identity, interval_s=0.01, passes=3)
    assert (counts.stored, counts.done, counts.skipped, counts.failed) == (1, 0, 0, 0)
    [sr], [_] = results_of(server, server.file(source["ID"]).SOPInstanceUID)
    image_level, findings = read_sr(sr["ds"])
    assert findings == []  # the 0.83 box is under 0.9: no region at all
    [image_group] = image_level
    [suspected] = [item for item in image_group[0].ContentSequence if item.ValueType == "CODE"
                   and item.ConceptNameCodeSequence[0].CodeMeaning == "Fracture suspected above threshold"]
    assert suspected.ConceptCodeSequence[0].CodeMeaning == "No"
    assert text_values(image_group, "Summary")[0].startswith("No finding above threshold")


@pytest.mark.parametrize("protocol", ["rest", "dicomweb"])
def test_wrong_credentials_and_credentials_in_the_url_are_refused_without_echo(server, capture, monkeypatch, known_box_model,
                                                                               protocol):
    _, weights = known_box_model
    flag, url = endpoint(server, protocol)
    monkeypatch.setenv(pacs.PASSWORD_ENV, "wrong-password-xyz")
    code, log = run_worker(capture, url, "--weights", str(weights), flag=flag)
    assert code == 2 and "refused the credentials (HTTP 401)" in log and "wrong-password-xyz" not in log
    code, log = run_worker(capture, url.replace("http://", f"http://{USER}:hunter2@"), "--weights", str(weights), flag=flag)
    assert code == 2 and pacs.USER_ENV in log and "hunter2" not in log


def test_the_worker_runs_as_a_file_and_says_where_credentials_go():
    import sys

    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "pacs.py"), "--help"], capture_output=True,
                         text=True, timeout=120, cwd="/")
    assert run.returncode == 0, run.stderr
    assert "--once" in run.stdout and "--watch" in run.stdout and "--dicomweb" in run.stdout and pacs.PASSWORD_ENV in run.stdout


# --------------------------------------------------------------------------- real radiographs, the bundled model

# The real samples are read at a fixed low threshold, not a mode's: the SR's geometry is checked only where boxes
# exist, and the card's screening threshold moves with every bundle (RG3's tibia scores 0.02-0.06 today).
REAL_CONF = 0.01
REAL = {  # what each sample brings
    "RG2_JPLL.dcm": "CR, JPEG Lossless, 10-bit",
    "RG3_J2KR.dcm": "CR, JPEG 2000, MONOCHROME1",
    "JPEG2KLossless_1s_1f_u_16_16.dcm": "DX, JPEG 2000, 16-bit",
    "Fake_MONOHR1.dcm": "CR, JPEG baseline, MONOCHROME1",
}


def check_real_results(server: Server, predictor: inference.Predictor, name: str, instance: str) -> int:
    """The sample's one SR and one overlay, in its study; the SR's regions are the boxes `predictor` finds on the
    file directly (at REAL_CONF), in the source's pixels. Returns how many there are."""
    data = (SAMPLES / name).read_bytes()
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    srs, overlays = results_of(server, source.SOPInstanceUID)
    assert len(srs) == 1 and len(overlays) == 1, name
    sr = srs[0]["ds"]
    assert sr.StudyInstanceUID == source.StudyInstanceUID and overlays[0]["ds"].StudyInstanceUID == source.StudyInstanceUID
    study = server.get(f"/instances/{instance}/study").json()["ID"]  # the same study in Orthanc's index too
    assert {server.get(f"/instances/{r['id']}/study").json()["ID"] for r in (srs[0], overlays[0])} == {study}
    assert overlays[0]["ds"].Columns == source.Columns and overlays[0]["ds"].Rows > source.Rows, name
    # the same model on the same file, directly: the SR's regions are its boxes, in the source's pixels
    expected = predictor.predict(data, conf=REAL_CONF).detections
    _, findings = read_sr(sr)
    assert len(findings) == len(expected), name
    for finding, det in zip(findings, expected):
        x1, y1, x2, y2 = det.xyxy
        np.testing.assert_allclose(finding.roi.value, [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], atol=0.01)
        assert region_source(finding.roi) == (source.SOPClassUID, source.SOPInstanceUID)
        assert finding.get_measurements()[0].value == pytest.approx(det.score, abs=1e-5)
        assert (np.asarray(finding.roi.value) <= [source.Columns, source.Rows]).all(), name
    return len(findings)


@pytest.mark.realdata
@pytest.mark.slow
def test_worker_on_real_radiographs_with_the_bundled_model(server, capture):
    if not all((SAMPLES / name).is_file() for name in REAL):
        pytest.skip(f"the DICOM samples are not at {SAMPLES}")
    uploaded = {name: server.upload((SAMPLES / name).read_bytes()) for name in REAL}
    code, log = run_worker(capture, server.url, "--conf", str(REAL_CONF))
    assert code == 0, log
    assert f"{len(REAL)} analysed and stored, 0 already done, 0 skipped, 0 failed" in log
    predictor = inference.Predictor()
    boxes_seen = sum(check_real_results(server, predictor, name, inst["ID"]) for name, inst in uploaded.items())
    assert boxes_seen > 0  # the test looked at some regions (RG3's tibia gets boxes at REAL_CONF)
    count = len(server.instances())
    code, log = run_worker(capture, server.url, "--conf", str(REAL_CONF))
    assert code == 0 and f"0 analysed and stored, {len(REAL)} already done" in log, log
    assert len(server.instances()) == count


@pytest.mark.realdata
@pytest.mark.slow
def test_dicomweb_worker_on_a_real_radiograph_with_the_bundled_model(server, capture):
    flag, url = endpoint(server, "dicomweb")
    name = "RG3_J2KR.dcm"  # JPEG 2000, MONOCHROME1, and boxes at REAL_CONF
    if not (SAMPLES / name).is_file():
        pytest.skip(f"the DICOM samples are not at {SAMPLES}")
    data = (SAMPLES / name).read_bytes()
    inst = server.upload(data)
    source = pydicom.dcmread(io.BytesIO(data))
    fetched = pydicom.dcmread(io.BytesIO(pacs.DicomWeb(url, (USER, server.password)).fetch(
        pacs.Instance(source.SOPInstanceUID, source.StudyInstanceUID, source.SOPInstanceUID, ref=source.SeriesInstanceUID))))
    assert fetched.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID  # WADO-RS: as stored, not transcoded
    assert fetched.PixelData == source.PixelData

    code, log = run_worker(capture, url, "--conf", str(REAL_CONF), flag=flag)
    assert code == 0, log
    assert f"stored  instance {source.SOPInstanceUID} (CR): fracture suspected" in log
    assert "1 analysed and stored, 0 already done, 0 skipped, 0 failed" in log
    assert check_real_results(server, inference.Predictor(), name, inst["ID"]) > 0
    count = len(server.instances())
    code, log = run_worker(capture, url, "--conf", str(REAL_CONF), flag=flag)
    assert code == 0 and "0 analysed and stored, 1 already done" in log, log
    assert len(server.instances()) == count
