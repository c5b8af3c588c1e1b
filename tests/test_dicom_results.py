"""DICOM results (bone_r.dicom_results) on their own, and through the service's `/detect?output=dicom`."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient

import inference
from app.main import Settings, create_app
from bone_r import DISCLAIMER, dicom_results
from bone_r.card import ModelCard
from bone_r.synthetic import encode, make_dicom, make_phantom
from fakes import FakeDetector

RECORD = {
    "image_size": [200, 300], "mode": "balanced", "threshold": 0.4, "fracture_detected": True,
    "detections": [
        {"xyxy": [10.5, 20.25, 60.0, 90.0], "score": 0.3, "label": "fracture", "model": "m"},  # under the threshold
        {"xyxy": [100.0, 120.0, 150.5, 180.0], "score": 0.9, "label": "fracture", "model": "m",
         "hints": {"type": "focal (e.g. hairline, buckle or avulsion)", "severity": "moderate", "best_guess": True,
                   "note": "Best guess from the box's shape, size and score only; not a diagnosis."}},
    ],
    "model": {"name": "m", "version": "sha256:0123456789ab"},
    "disclaimer": DISCLAIMER,
}


def source(study: str | None = "1.2.3.4", rows: int = 300, cols: int = 200) -> pydicom.Dataset:
    ds = pydicom.dcmread(io.BytesIO(make_dicom(make_phantom(rows, cols, seed=1).pixels)))
    if study:
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = "1.2.3.4.5"
    ds.PatientOrientation = ["L", "F"]
    return ds


def display(rows: int = 300, cols: int = 200) -> np.ndarray:
    return np.full((rows, cols), 90, np.uint8)


def test_sr_holds_every_box_in_source_pixels_best_first_with_the_verdict_at_the_threshold():
    src = source()
    sr = pydicom.dcmread(io.BytesIO(dicom_results.to_bytes(dicom_results.build_sr(src, RECORD))))
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage and sr.StudyInstanceUID == src.StudyInstanceUID
    assert sr.SeriesDescription == dicom_results.SR_SERIES_DESCRIPTION
    tree = dicom_results.describe(sr)
    assert tree.index("Bone-R finding 1") < tree.index("Detector score: 0.9 1") < tree.index("Bone-R finding 2")
    assert f"POLYLINE (100, 120) (150.5, 120) (150.5, 180) (100, 180) (100, 120) on {src.SOPInstanceUID}" in tree
    assert f"POLYLINE (10.5, 20.25) (60, 20.25) (60, 90) (10.5, 90) (10.5, 20.25) on {src.SOPInstanceUID}" in tree
    assert "Fracture suspected above threshold: Yes" in tree and "Score threshold: 0.4 1" in tree
    assert "Fracture type (best guess, not a diagnosis): focal" in tree
    assert "Severity (best guess, not a diagnosis): moderate" in tree
    assert "Summary: Bone-R suspects a fracture: 1 region(s) scoring at least 0.400 (balanced mode)" in tree
    assert tree.count(f"Disclaimer: {DISCLAIMER}") == 3  # the image-level group and each finding
    assert "Algorithm Version: sha256:0123456789ab" in tree


def test_no_finding_report_and_the_same_uids_every_time():
    record = RECORD | {"detections": [RECORD["detections"][0]]}  # only a box under the threshold
    tree = dicom_results.describe(dicom_results.build_sr(source(), record))
    assert "Fracture suspected above threshold: No" in tree
    assert "Summary: No finding above threshold: Bone-R found no fracture scoring at least 0.400" in tree
    empty = dicom_results.describe(dicom_results.build_sr(source(), RECORD | {"detections": []}))
    assert "SCOORD" not in empty and "Highest detector score" not in empty and "No finding above threshold" in empty
    a, b = (dicom_results.result_uids("1.2", "1.2.3", RECORD) for _ in range(2))
    assert a == b and len({a.sr, a.overlay, a.sr_series, a.overlay_series}) == 4
    assert all(pydicom.uid.UID(u).is_valid for u in (a.sr, a.overlay, a.sr_series, a.overlay_series))
    assert dicom_results.result_uids("1.2", "1.2.3", RECORD | {"threshold": 0.5}).sr != a.sr  # another result
    assert dicom_results.result_uids("1.2", "1.2.4", RECORD).sr_series == a.sr_series  # one series per study


def test_overlay_is_a_secondary_capture_of_the_source_with_the_boxes_burned_in():
    src = source()
    sc = dicom_results.build_overlay(src, RECORD, display())
    sc = pydicom.dcmread(io.BytesIO(dicom_results.to_bytes(sc)))
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and sc.Modality == "OT"
    assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.BurnedInAnnotation == "YES"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert list(sc.PatientOrientation) == ["L", "F"]
    assert "not a diagnosis" in sc.SeriesDescription and DISCLAIMER in sc.ImageComments
    pixels = sc.pixel_array
    assert pixels.shape[1] == 200 and pixels.shape[0] > 300 and pixels.shape[2] == 3
    assert (pixels[:300] != 90).any(axis=2)[120:181, 100:151].any()  # drawn where the box is
    assert (pixels[:300, :, 0] == 90).all(axis=1)[250:].all()  # and nowhere else below the boxes' labels


def test_a_source_without_a_study_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="lacks StudyInstanceUID"):
        dicom_results.build_results(source(study=None), RECORD, display())


def test_model_identity_names_the_weights_by_content(tmp_path):
    weights = tmp_path / "w.onnx"
    weights.write_bytes(b"abc")
    assert dicom_results.model_identity(ModelCard(name="card-name"), weights) == {"name": "card-name", "version": "sha256:ba7816bf8f01"}
    assert dicom_results.model_identity(None, None, "det") == {"name": "det", "version": "unknown"}


# --------------------------------------------------------------------------- the service


@pytest.fixture
def client(tmp_path):
    # one box at the phantom's centre, 40% x 10% of the image, score 0.8
    predictor = inference.Predictor(detector=FakeDetector(None, boxes=[[0.5, 0.5, 0.4, 0.1, 0.8]]),
                                    card={"name": "fake", "thresholds": {"balanced": {"threshold": 0.5}}})
    with TestClient(create_app(Settings(docs_dir=tmp_path / "no-docs"), predictor=predictor)) as c:
        yield c


def test_detect_output_dicom_answers_a_zip_of_the_sr_and_the_overlay(client):
    src = source(rows=400, cols=300)
    buf = io.BytesIO()
    src.save_as(buf, enforce_file_format=True)
    response = client.post("/detect?output=dicom", files={"file": ("x.dcm", buf.getvalue(), "application/dicom")})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert response.headers["x-bone-r-fracture-detected"] == "true"
    with zipfile.ZipFile(io.BytesIO(response.content)) as zf:
        assert sorted(zf.namelist()) == ["bone-r-overlay.dcm", "bone-r-sr.dcm"]
        sr = pydicom.dcmread(io.BytesIO(zf.read("bone-r-sr.dcm")))
        overlay = pydicom.dcmread(io.BytesIO(zf.read("bone-r-overlay.dcm")))
    tree = dicom_results.describe(sr)
    # the fake's box, in the original's pixels: x 90..210, y 180..220 (300 x 400)
    assert f"POLYLINE (90, 180) (210, 180) (210, 220) (90, 220) (90, 180) on {src.SOPInstanceUID}" in tree
    assert "Detector score: 0.8 1" in tree and "Algorithm Name: Bone-R fake" in tree
    assert overlay.StudyInstanceUID == sr.StudyInstanceUID == src.StudyInstanceUID and overlay.Columns == 300


def test_detect_output_dicom_errors_are_json(client):
    png = encode(make_phantom(100, 80, seed=2).pixels, ".png")
    response = client.post("/detect?output=dicom", files={"file": ("x.png", png, "image/png")})
    assert response.status_code == 415 and response.json()["error"] == "unsupported_media_type"
    assert "DICOM upload" in response.json()["message"]
    no_study = make_dicom(make_phantom(100, 80, seed=2).pixels)  # make_dicom writes no StudyInstanceUID
    response = client.post("/detect?output=dicom", files={"file": ("x.dcm", no_study, "application/dicom")})
    assert response.status_code == 400 and response.json()["error"] == "unsupported_dicom"
    assert "StudyInstanceUID" in response.json()["message"]
    response = client.post("/detect?output=xml", files={"file": ("x.dcm", no_study, "application/dicom")})
    assert response.status_code == 422 and response.json()["error"] == "invalid_parameters"
    assert client.post("/detect", files={"file": ("x.dcm", no_study, "application/dicom")}).status_code == 200  # JSON as before
