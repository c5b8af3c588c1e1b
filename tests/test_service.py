"""The FastAPI service: every status code, DICOM, modes from the card, overlay, clinics, saturation.

The model is a fake detector (injected, or built through the real loading path by
registering a fake backend), so these tests need no deep-learning model; one slow
test runs an untrained YOLOv8n end to end.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import re
import threading
import time

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_places import SECRET, FakePlaces

import app.service as app_service
import inference
import models
from app.main import Settings, create_app
from bone_r import DISCLAIMER
from bone_r.detection import Detection
from bone_r.modes import FALLBACK_THRESHOLDS, MODES
from bone_r.synthetic import encode, make_dicom, make_phantom, to_8bit

CARD = {
    "name": "fake-card",
    "classes": ["fracture"],
    "thresholds": {"screening": {"threshold": 0.2}, "balanced": 0.5, "specific": {"threshold": 0.7}},
}
# fake detections as fractions of the harmonized image: (x1, y1, x2, y2), score
FAKE_BOXES = [((0.2, 0.3, 0.5, 0.6), 0.6), ((0.1, 0.1, 0.15, 0.12), 0.3)]


class FakeDetector:
    """Two boxes at known places of whatever image it gets; counts its calls."""

    name = "fake"

    def __init__(self, boxes=FAKE_BOXES):
        self.boxes = boxes
        self.calls = 0

    def predict(self, rgb, conf):
        self.calls += 1
        h, w = rgb.shape[:2]
        out = []
        for (x1, y1, x2, y2), score in self.boxes:
            if score >= conf:
                out.append(Detection((x1 * w, y1 * h, x2 * w, y2 * h), score, "fracture", self.name))
        return out


class FakeBackend(FakeDetector):
    """The same fake, built by `models.build_detector` from a weights path (the real loading path)."""

    def __init__(self, weights, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        self.name = "fake-test:model"


class BlockingDetector:
    """Holds every prediction until `release` is set, so saturation is deterministic."""

    name = "blocking"

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Event()

    def predict(self, rgb, conf):
        self.entered.set()
        assert self.release.wait(20), "the test never released the detector"
        return []


def make_client(tmp_path, detector=None, card=CARD, **settings):
    settings.setdefault("docs_dir", tmp_path / "no-docs")
    predictor = inference.Predictor(detector=detector or FakeDetector(), card=card)
    return TestClient(create_app(Settings(**settings), predictor=predictor))


@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path) as c:
        yield c


def png_bytes(height=200, width=160, seed=0, bits=16):
    return encode(make_phantom(height, width, seed=seed, bits=bits).pixels, ".png")


def post(client, data, query="", filename="x.png"):
    return client.post(f"/detect{query}", files={"file": (filename, data, "application/octet-stream")})


def assert_error(response, status, word=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and isinstance(body["message"], str) and body["message"]
    if word:
        assert body["error"] == word
    return body


# --------------------------------------------------------------------------- settings and health


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BONER_WEIGHTS", str(tmp_path / "w.pt"))
    monkeypatch.setenv("BONER_MAX_UPLOAD_MB", "5")
    monkeypatch.setenv("BONER_MAX_CONCURRENCY", "3")
    monkeypatch.setenv("BONER_CORS_ORIGINS", "http://a.test, http://b.test")
    monkeypatch.setenv("BONER_MAPS_API_KEY", SECRET)
    s = Settings()
    assert s.weights == tmp_path / "w.pt"
    assert s.max_upload_bytes == 5_000_000 and s.max_concurrency == 3
    assert s.origins == ["http://a.test", "http://b.test"]
    assert s.api_key == SECRET and SECRET not in repr(s)
    monkeypatch.setenv("BONER_MAPS_API_KEY", "")
    monkeypatch.setenv("BONER_WEIGHTS", "")
    s = Settings()
    assert s.api_key is None and s.weights is None
    assert Settings().max_upload_mb == 5
    monkeypatch.delenv("BONER_MAX_UPLOAD_MB")
    assert Settings().max_upload_mb == 32


def test_health_with_injected_model(client):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["reason"] is None
    assert body["detector"] == "fake"
    assert body["model_card"]["classes"] == ["fracture"]
    assert body["model_card"]["thresholds"] == {
        "screening": {"threshold": 0.2, "source": "model_card"},
        "balanced": {"threshold": 0.5, "source": "model_card"},
        "specific": {"threshold": 0.7, "source": "model_card"},
    }
    assert body["clinics_lookup_enabled"] is False
    assert body["limits"]["max_upload_mb"] == 32
    assert "not a diagnosis" in body["disclaimer"]


def test_model_loads_in_lifespan_from_weights_and_card(tmp_path, monkeypatch):
    """The real loading path: settings -> Predictor -> registry -> backend; card beside the weights."""
    monkeypatch.setitem(models._REGISTRY, "fake-test", "test_service:FakeBackend")
    weights = tmp_path / "tiny.pt"
    weights.write_bytes(b"not really a model" * 10)
    (tmp_path / "tiny.json").write_text(json.dumps(CARD | {"backend": "fake-test", "imgsz": 320}))
    app = create_app(Settings(weights=weights, docs_dir=tmp_path))
    assert app.state.service.predictors is None  # nothing loads at creation
    with TestClient(app) as c:
        body = c.get("/health").json()
        assert body["status"] == "ok"
        assert body["backend"] == "fake-test" and body["detector"] == "fake-test:model"
        assert body["weights"] == {"name": "tiny.pt", "sha256_prefix": hashlib.sha256(weights.read_bytes()).hexdigest()[:12]}
        assert body["model_card"]["imgsz"] == 320
        assert body["model_card"]["thresholds"]["specific"] == {"threshold": 0.7, "source": "model_card"}
        predictor = app.state.service.info
        assert predictor.detector.kwargs == {"device": "cpu", "imgsz": 320}
        assert predictor.detector.calls == 1  # the warm-up
        r = post(c, png_bytes())
        assert r.status_code == 200
        assert r.json()["model"] == {"backend": "fake-test", "detector": "fake-test:model", "weights": "tiny.pt"}


def test_missing_model_still_starts_and_says_why(tmp_path):
    missing = tmp_path / "nope.pt"
    with TestClient(create_app(Settings(weights=missing, docs_dir=tmp_path))) as c:
        health = c.get("/health")
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "unavailable"
        assert "nope.pt" in body["reason"] and body["model_card"] is None
        r = post(c, png_bytes())
        err = assert_error(r, 503, "model_unavailable")
        assert "nope.pt" in err["message"]


def test_malformed_card_makes_the_model_unavailable_not_a_500(tmp_path):
    bad = {"thresholds": {"balanced": {"value": 0.3}}}  # no "threshold" key
    with make_client(tmp_path, card=bad) as c:
        body = c.get("/health").json()
        assert body["status"] == "unavailable" and "model card is malformed" in body["reason"]
        assert_error(post(c, png_bytes()), 503, "model_unavailable")


# --------------------------------------------------------------------------- /detect: success


@pytest.mark.parametrize("kind", ["png16", "png8", "jpeg", "tiff", "dicom"])
def test_detect_formats_and_boxes_in_original_pixels(client, kind):
    ph = make_phantom(2000, 1500, seed=3)  # larger than max_side: boxes must be scaled back
    data = {
        "png16": lambda: encode(ph.pixels, ".png"),
        "png8": lambda: encode(to_8bit(ph.pixels), ".png"),
        "jpeg": lambda: encode(to_8bit(ph.pixels), ".jpg"),
        "tiff": lambda: encode(ph.pixels, ".tiff"),
        "dicom": lambda: make_dicom(ph.pixels, window=(2048, 4096)),
    }[kind]()
    r = post(client, data, "?mode=screening", filename="upload.bin")  # the name says nothing: content decides
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image_size"] == [1500, 2000]
    assert body["image"]["format"] == {"png16": "png", "png8": "png", "jpeg": "jpeg", "tiff": "tiff", "dicom": "dicom"}[kind]
    assert body["filename"] == "upload.bin"
    assert body["fracture_detected"] is True
    boxes = [d["xyxy"] for d in body["detections"]]
    assert boxes[0] == pytest.approx([300, 600, 750, 1200], abs=1.0)
    assert boxes[1] == pytest.approx([150, 200, 225, 240], abs=1.0)
    hints = body["detections"][0]["hints"]
    assert hints["best_guess"] is True and "not a diagnosis" in hints["note"]
    assert body["disclaimer"] == DISCLAIMER
    assert {"decode_ms", "harmonize_ms", "model_ms", "queue_ms", "read_ms", "total_ms"} <= set(body["timings_ms"])
    assert body["overlay_png_base64"] is None
    if kind == "dicom":
        assert body["image"]["dicom"]["voi"] == "window"
        assert body["image"]["bit_depth"] == 12


@pytest.mark.parametrize("mode, threshold, n_boxes", [("screening", 0.2, 2), ("balanced", 0.5, 1), ("specific", 0.7, 0)])
def test_mode_thresholds_come_from_the_model_card(client, mode, threshold, n_boxes):
    body = post(client, png_bytes(), f"?mode={mode}").json()
    assert body["mode"] == mode
    assert body["threshold"] == threshold and body["threshold_source"] == "model_card"
    assert len(body["detections"]) == n_boxes
    assert body["fracture_detected"] is (n_boxes > 0)
    assert all(d["score"] >= threshold for d in body["detections"])
    assert body["consult"]["level"] == ("routine-review" if n_boxes else "no-finding")


def test_default_mode_is_balanced_and_conf_overrides(client):
    assert post(client, png_bytes()).json()["mode"] == "balanced"
    body = post(client, png_bytes(), "?mode=specific&conf=0.25").json()
    assert body["threshold"] == 0.25 and body["threshold_source"] == "conf"
    assert len(body["detections"]) == 2


def test_without_a_card_the_fallback_thresholds_are_reported(tmp_path):
    with make_client(tmp_path, card=None) as c:
        body = post(c, png_bytes(), "?mode=specific").json()
    assert body["threshold"] == FALLBACK_THRESHOLDS["specific"]
    assert body["threshold_source"] == "fallback"


def test_severe_best_guess_asks_for_urgent_review(tmp_path):
    big = FakeDetector([((0.05, 0.05, 0.9, 0.9), 0.9)])  # a box covering most of the image
    with make_client(tmp_path, detector=big) as c:
        body = post(c, png_bytes()).json()
    assert body["detections"][0]["hints"]["severity"] == "possibly severe"
    assert body["consult"]["level"] == "urgent-review"
    assert "clinician" in body["consult"]["text"]


def test_overlay_is_a_png_of_the_original_size(client):
    raw = png_bytes(300, 240)
    body = post(client, raw, "?overlay=true&mode=screening").json()
    png = base64.b64decode(body["overlay_png_base64"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape[1] == 240 and img.shape[0] > 300  # the disclaimer band is added below
    # the first box is drawn (coloured pixels on its edge), the gray radiograph is not
    x1, y1 = int(0.2 * 240), int(0.3 * 300)
    edge = img[y1, x1 + 5 : x1 + 40].astype(int)
    assert (np.ptp(edge, axis=1) > 60).all()
    assert "overlay_ms" in body["timings_ms"]


# --------------------------------------------------------------------------- /detect: errors


@pytest.mark.parametrize("query, param", [
    ("?mode=fast", "mode"),
    ("?mode=", "mode"),
    ("?conf=1.5", "conf"),
    ("?conf=-0.1", "conf"),
    ("?conf=nan", "conf"),
    ("?conf=abc", "conf"),
    ("?lat=91&lng=0", "lat"),
    ("?lat=0&lng=-181", "lng"),
    ("?lat=10", "lng"),
    ("?lng=10", "lat"),
    ("?overlay=maybe", "overlay"),
])
def test_bad_parameters_are_422_with_a_message(client, query, param):
    body = assert_error(post(client, png_bytes(), query), 422, "invalid_parameters")
    assert param in [e["param"] for e in body["errors"]]
    assert param in body["message"]


def test_unknown_mode_is_not_a_silent_fallback(client):
    body = assert_error(post(client, png_bytes(), "?mode=Balanced"), 422)
    assert "screening" in body["message"]


def test_missing_file_is_422(client):
    assert_error(client.post("/detect", files={"image": ("x.png", png_bytes())}), 422, "invalid_parameters")
    assert_error(client.post("/detect", data={"file": "not a file"}, files={"other": ("a", b"1")}), 422)


def test_not_multipart_is_415(client):
    r = client.post("/detect", content=png_bytes(), headers={"content-type": "image/png"})
    assert "multipart/form-data" in assert_error(r, 415, "unsupported_media_type")["message"]
    assert_error(client.post("/detect"), 415)


def test_malformed_multipart_is_400(client):
    r = client.post("/detect", content=b"--xx\r\nnot really\r\n", headers={"content-type": "multipart/form-data"})
    assert_error(r, 400, "bad_multipart")
    r = client.post("/detect", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=xx"})
    assert r.status_code in (400, 422)  # the parser sees no part: no file
    assert r.json()["message"]


@pytest.mark.parametrize("data, status, word", [
    (b"", 400, "empty_file"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, 400, "undecodable_image"),
    (b"just some text, not an image", 415, "unsupported_media_type"),
    (b"%PDF-1.7\n" + b"0" * 200, 415, "unsupported_media_type"),
])
def test_undecodable_uploads(client, data, status, word):
    assert_error(post(client, data), status, word)


def test_truncated_jpeg_is_repaired_not_rejected(client):
    data = encode(to_8bit(make_phantom(200, 160).pixels), ".jpg")
    body = post(client, data[: int(len(data) * 0.7)]).json()
    assert body["image"]["repaired"] is True


def _mpeg2_dicom() -> bytes:
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(io.BytesIO(make_dicom(make_phantom(64, 48).pixels)))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no installed decoder
    ds.PixelData = encapsulate([b"\x00" * 100])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_with_a_compression_we_cannot_decode_is_415(client):
    body = assert_error(post(client, _mpeg2_dicom(), filename="scan.dcm"), 415, "unsupported_compression")
    assert "MPEG2" in body["message"] and "decoder" in body["message"]


def test_dicom_with_non_finite_tags_answers_strict_json(client):
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(make_dicom(make_phantom(64, 48).pixels, window=(100, 400), slope=1.0)))
    ds["RescaleSlope"].value = "NaN"
    ds["WindowCenter"].value = "inf"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    r = post(client, buf.getvalue())
    assert r.status_code == 200, r.text
    body = json.loads(r.text)  # strict JSON: no NaN or Infinity tokens
    assert "NaN" not in r.text and "Infinity" not in r.text
    assert body["image"]["dicom"]["voi"] == "minmax"


def test_dicom_rle_is_decoded(client):
    body = post(client, make_dicom(make_phantom(120, 100).pixels, compress="rle")).json()
    assert body["image"]["format"] == "dicom" and body["image_size"] == [100, 120]


def test_upload_over_the_limit_is_413(tmp_path):
    with make_client(tmp_path, max_upload_mb=0.05) as c:  # 50 kB
        big = np.random.default_rng(0).integers(0, 65535, (300, 300), dtype=np.uint16)
        data = encode(big, ".png")
        assert len(data) > 60_000
        body = assert_error(post(c, data), 413, "payload_too_large")
        assert "0.05 MB" in body["message"]
        assert post(c, png_bytes(64, 64)).status_code == 200  # under the limit still works


def test_upload_over_the_limit_without_content_length_is_413(tmp_path):
    """A chunked body (no Content-Length) is counted while it streams."""
    boundary = "bonerboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()

    def chunks():
        yield head
        for _ in range(40):
            yield b"\x00" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    with make_client(tmp_path, max_upload_mb=0.1) as c:
        r = c.post("/detect", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert_error(r, 413, "payload_too_large")


def _drive(client, app, headers, body_chunks):
    """Call the ASGI app directly; return (status, bytes of body it pulled)."""
    pulled = 0
    status = {}
    chunks = iter(body_chunks)

    async def receive():
        nonlocal pulled
        chunk = next(chunks)
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        if message["type"] == "http.response.start":
            status["code"] = message["status"]

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/detect", "raw_path": b"/detect", "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}

    async def run():
        await app(scope, receive, send)

    client.portal.call(run)
    return status.get("code"), pulled


def test_an_endless_upload_is_cut_at_the_limit(tmp_path):
    """Nothing past the limit is read: the body is an endless stream."""

    def endless():
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n"
        while True:
            yield b"\x00" * 65536

    with make_client(tmp_path, max_upload_mb=1) as c:
        code, pulled = _drive(c, c.app, [(b"content-type", b"multipart/form-data; boundary=b")], endless())
        assert code == 413
        assert 1_000_000 < pulled <= 1_000_000 + 64 * 1024 + 2 * 65536
        # a declared Content-Length over the limit is refused before a single byte is read
        code, pulled = _drive(c, c.app, [(b"content-type", b"multipart/form-data; boundary=b"),
                                         (b"content-length", b"50000000")], endless())
        assert (code, pulled) == (413, 0)
        assert c.app.state.service.inflight == 0


def test_too_many_pixels_is_413(tmp_path):
    with make_client(tmp_path, max_pixels=10_000) as c:
        body = assert_error(post(c, png_bytes(200, 160)), 413, "too_many_pixels")
        assert "MP" in body["message"]
        assert post(c, png_bytes(90, 100)).status_code == 200


@pytest.mark.parametrize("shape, dtype", [((1, 1), np.uint8), ((1, 3000), np.uint8), ((3000, 2), np.uint16),
                                          ((50, 50), np.uint16), ((7, 5), np.float32)])
def test_odd_but_valid_images_never_500(client, shape, dtype):
    arr = np.zeros(shape, dtype)  # constant images: nothing to stretch
    data = encode(arr, ".tiff" if dtype == np.float32 else ".png")
    r = post(client, data, "?overlay=true")
    assert r.status_code == 200, r.text
    assert r.json()["image_size"] == [shape[1], shape[0]]


def test_unknown_routes_and_methods_answer_json(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/detect"), 405, "method_not_allowed")


# --------------------------------------------------------------------------- saturation


def test_saturated_service_answers_503_with_retry_after(tmp_path):
    detector = BlockingDetector()
    with make_client(tmp_path, detector=detector, max_concurrency=1, queue_limit=1) as c:
        state = c.app.state.service
        results = []

        def call():
            results.append(post(c, png_bytes(64, 64)).status_code)

        threads = [threading.Thread(target=call) for _ in range(2)]
        for t in threads:
            t.start()
        assert detector.entered.wait(10)
        deadline = time.monotonic() + 10
        while state.inflight < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.inflight == 2  # one running, one waiting: the queue is full
        r = post(c, png_bytes(64, 64))
        body = assert_error(r, 503, "busy")
        retry = int(r.headers["retry-after"])
        assert retry >= 1 and body["retry_after_s"] == retry
        detector.release.set()
        for t in threads:
            t.join(20)
        assert results == [200, 200]
        deadline = time.monotonic() + 5
        while state.inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.inflight == 0
        assert post(c, png_bytes(64, 64)).status_code == 200  # capacity is back


def test_failed_requests_free_their_slot(tmp_path):
    with make_client(tmp_path, max_concurrency=1, queue_limit=0) as c:
        for _ in range(3):
            assert_error(post(c, b"junk"), 415)
            assert_error(post(c, png_bytes(), "?mode=nope"), 422)
        assert c.app.state.service.inflight == 0
        assert post(c, png_bytes()).status_code == 200


# --------------------------------------------------------------------------- hostile clients (issue 16)


def _multipart(data: bytes) -> bytes:
    return (b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n' + data + b"\r\n--b--\r\n")


async def _call(app, body: bytes, *, stall_after: int | None = None, hang_up: asyncio.Event | None = None,
                query: bytes = b"") -> int:
    """One request straight into the ASGI app, as a server would deliver it; returns its status.

    The client sends `body` whole, or only its first `stall_after` bytes and then nothing (a slow client). Once the
    body is sent the client waits, as a real connection does, and hangs up when `hang_up` is set.
    """
    status: dict[str, int] = {}
    messages = [{"type": "http.request", "body": body[:stall_after] if stall_after is not None else body,
                 "more_body": stall_after is not None}]

    async def receive():
        if messages:
            return messages.pop(0)
        if stall_after is None and hang_up is not None:
            await hang_up.wait()
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # a stalled body, or a client that just waits for its answer

    async def send(message):
        if message["type"] == "http.response.start":
            status["code"] = message["status"]

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/detect", "raw_path": b"/detect", "query_string": query, "root_path": "",
             "headers": [(b"content-type", b"multipart/form-data; boundary=b")], "client": ("127.0.0.1", 5000),
             "server": ("testserver", 80)}
    await app(scope, receive, send)
    return status["code"]


async def _until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return condition()


def test_slow_uploads_do_not_starve_others(tmp_path):
    """Clients that send headers and a few bytes take no queue slot, and are cut off at the upload timeout."""
    with make_client(tmp_path, max_concurrency=1, queue_limit=1, upload_timeout_s=1.5) as c:
        body = _multipart(png_bytes(64, 64))

        async def scenario():
            stalled = [asyncio.ensure_future(_call(c.app, body, stall_after=70)) for _ in range(5)]
            await asyncio.sleep(0.2)
            t0 = time.perf_counter()
            normal = await asyncio.wait_for(_call(c.app, body), 10)
            took = time.perf_counter() - t0
            return normal, took, await asyncio.wait_for(asyncio.gather(*stalled), 10)

        normal, took, stalled = c.portal.call(scenario)
        assert normal == 200 and took < 1.3  # answered before the stalled clients' timeout
        assert stalled == [408] * 5
        assert c.app.state.service.inflight == 0 and c.app.state.service.buffered == 0


def test_buffered_upload_bytes_are_bounded(tmp_path):
    """Bodies still arriving count against max_buffered_mb: past it a new upload gets 503, not memory."""
    with make_client(tmp_path, max_upload_mb=0.2, max_buffered_mb=0.3, upload_timeout_s=1.0) as c:
        body = _multipart(bytes(190_000))

        async def scenario():
            first = asyncio.ensure_future(_call(c.app, body, stall_after=180_000))  # holds 180 kB, then stalls
            await asyncio.sleep(0.3)
            second = await asyncio.wait_for(_call(c.app, body, stall_after=180_000), 5)
            return second, await asyncio.wait_for(first, 5)

        second, first = c.portal.call(scenario)
        assert (second, first) == (503, 408)
        assert c.app.state.service.buffered == 0
        assert post(c, png_bytes(64, 64)).status_code == 200


class CountingBlockingDetector(BlockingDetector):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def predict(self, rgb, conf):
        self.calls += 1
        return super().predict(rgb, conf)


def test_a_client_that_hangs_up_frees_its_place_and_its_work_is_not_done(tmp_path):
    detector = CountingBlockingDetector()
    with make_client(tmp_path, detector=detector, max_concurrency=1, queue_limit=2) as c:
        state = c.app.state.service
        body = _multipart(png_bytes(64, 64))

        async def scenario():
            first = asyncio.ensure_future(_call(c.app, body))
            assert await _until(detector.entered.is_set)
            hang_up = asyncio.Event()
            second = asyncio.ensure_future(_call(c.app, body, hang_up=hang_up))  # queued behind the first
            assert await _until(lambda: state.inflight == 2)
            hang_up.set()
            freed = await _until(lambda: state.inflight == 1)
            detector.release.set()
            return freed, await asyncio.wait_for(first, 10), await asyncio.wait_for(second, 10)

        freed, first, second = c.portal.call(scenario)
        assert freed, "the queued request of a client that hung up kept its slot"
        assert (first, second) == (200, 400)
        assert detector.calls == 1  # the second image was never analysed


def test_the_analysis_deadline_answers_503_and_stops_the_work(tmp_path, monkeypatch):
    detector = BlockingDetector()
    overlays = []
    monkeypatch.setattr(app_service, "overlay_for", lambda *a, **k: overlays.append(1) or np.zeros((8, 8, 3), np.uint8))
    with make_client(tmp_path, detector=detector, analysis_timeout_s=0.5) as c:
        release = threading.Timer(6, detector.release.set)
        release.start()
        t0 = time.perf_counter()
        r = post(c, png_bytes(64, 64), "?overlay=true")
        took = time.perf_counter() - t0
        detector.release.set()
        release.cancel()
        body = assert_error(r, 503, "analysis_timeout")
        assert took < 3 and body["retry_after_s"] == int(r.headers["retry-after"]) >= 1
        deadline = time.monotonic() + 5
        while c.app.state.service.inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.app.state.service.inflight == 0
        assert overlays == []  # the cancelled work stopped before its overlay
        assert post(c, png_bytes(64, 64)).status_code == 200


def test_failed_requests_keep_no_memory(tmp_path):
    """An error answer leaves nothing behind (a reference cycle through the future kept each failed upload)."""
    import gc
    import tracemalloc

    import psutil

    junk = _multipart(b"not an image " + bytes(3_000_000))
    broken = _multipart(png_bytes(300, 300)[:-2000] + bytes(3_000_000))  # a PNG that fails to decode

    async def failures(n: int) -> list[int]:  # straight into the app: the test client keeps cycles of its own
        return [await _call(c.app, body) for _ in range(n) for body in (junk, broken)]

    with make_client(tmp_path) as c:
        assert c.portal.call(failures, 2) == [415, 400] * 2  # warm-up: imports, allocator pools
        gc.collect()
        rss = psutil.Process().memory_info().rss
        gc.disable()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            assert c.portal.call(failures, 6) == [415, 400] * 6
            c.app.state.service.executor.submit(lambda: None).result()  # the worker has dropped its last job's arguments
            kept = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            gc.enable()
        grown = psutil.Process().memory_info().rss - rss
    assert kept < 3_000_000, f"{kept / 1e6:.0f} MB still referenced after 12 failed 3 MB uploads"
    assert grown < 20_000_000, f"RSS grew {grown / 1e6:.0f} MB over 12 failed 3 MB uploads"


def test_decode_budget_counts_the_overlay(tmp_path):
    from scripts.hostile_inputs import png_bomb

    bomb = png_bomb(side=3000)  # 16-bit RGBA: ~17 bytes per pixel to decode, +14 with the overlay
    with make_client(tmp_path, max_image_memory_mb=250) as c:
        assert post(c, bomb).status_code == 200
        body = assert_error(post(c, bomb, "?overlay=true"), 413, "decode_budget_exceeded")
        assert "250 MB" in body["message"]
        assert c.get("/health").json()["limits"]["max_image_memory_mb"] == 250


def test_answers_show_names_not_paths(tmp_path):
    missing = tmp_path / "private-folder" / "nope.pt"
    with TestClient(create_app(Settings(weights=missing, docs_dir=tmp_path / "no-docs"))) as c:
        answers = [c.get("/health").text, post(c, png_bytes()).text, c.get("/").text]
    assert "nope.pt" in answers[0] and "nope.pt" in answers[1]
    for text in answers:
        assert str(tmp_path) not in text and "private-folder" not in text, text


def test_trailing_slash_routes_are_the_api_not_the_docs(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.html").write_text("<html><body>viewer</body></html>")
    (docs / "health").write_text('{"status": "static"}')
    (docs / "detect").mkdir()
    (docs / "detect" / "index.html").write_text("<html>not the API</html>")
    with make_client(tmp_path, docs_dir=docs) as c:
        assert c.get("/health/").json()["status"] == "ok"
        r = c.post("/detect/", files={"file": ("x.png", png_bytes(), "application/octet-stream")})
        assert r.status_code == 200 and r.json()["image_size"] == [160, 200]
        assert c.get("/health").json()["status"] == "ok"


def test_corrupt_rle_dicom_is_bad_input_not_a_missing_decoder(client):
    from scripts.hostile_inputs import corrupt_rle_dicom

    body = assert_error(post(client, corrupt_rle_dicom()), 400, "undecodable_image")
    assert "RLE" in body["message"]


# --------------------------------------------------------------------------- nearby clinics through /detect


@pytest.fixture
def places_server():
    with FakePlaces() as fake:
        yield fake


def clinics_client(tmp_path, places_server, detector=None, timeout_s=2.0):
    return make_client(tmp_path, detector=detector, maps_api_key=SECRET, places_base_url=places_server.base_url,
                       places_timeout_s=timeout_s)


def test_clinics_listed_when_detected_with_key_and_location(tmp_path, places_server):
    with clinics_client(tmp_path, places_server) as c:
        assert c.get("/health").json()["clinics_lookup_enabled"] is True
        r = post(c, png_bytes(), "?lat=48.137&lng=11.575")
    body = r.json()
    clinics = body["nearby_clinics"]
    assert clinics["available"] is True and len(clinics["results"]) == 5
    assert clinics["results"][0]["name"] == "Ortho Clinic 0"
    assert SECRET not in r.text
    assert places_server.requests[0]["query"]["location"] == ["48.137000,11.575000"]


def test_no_lookup_without_a_finding_or_a_location(tmp_path, places_server):
    with clinics_client(tmp_path, places_server) as c:
        body = post(c, png_bytes(), "?mode=specific&lat=1&lng=2").json()
        assert body["fracture_detected"] is False
        assert body["nearby_clinics"]["available"] is False and "nothing was detected" in body["nearby_clinics"]["reason"]
        body = post(c, png_bytes()).json()
        assert "no location" in body["nearby_clinics"]["reason"]
    assert places_server.requests == []


def test_no_lookup_without_a_key(client):
    body = post(client, png_bytes(), "?lat=1&lng=2").json()
    assert body["fracture_detected"] is True
    assert body["nearby_clinics"] == {"available": False, "reason": body["nearby_clinics"]["reason"], "source": None,
                                      "results": [], "attribution": None}
    assert "not configured" in body["nearby_clinics"]["reason"]


@pytest.mark.parametrize("behaviour, words", [("timeout", "did not answer"), ("http500", "HTTP 500"),
                                              ("denied", "REQUEST_DENIED")])
def test_clinics_failures_keep_the_detection_and_hide_the_key(tmp_path, places_server, caplog, behaviour, words):
    places_server.behaviour = behaviour
    caplog.set_level(logging.DEBUG)
    # short only where the timeout is the point: a loaded CI machine may take longer than 0.3 s to answer at all
    with clinics_client(tmp_path, places_server, timeout_s=0.3 if behaviour == "timeout" else 10.0) as c:
        r = post(c, png_bytes(), "?lat=1&lng=2")
    assert r.status_code == 200
    body = r.json()
    assert body["fracture_detected"] is True
    assert body["nearby_clinics"]["available"] is False
    assert words in body["nearby_clinics"]["reason"]
    assert SECRET not in r.text and "127.0.0.1" not in r.text
    assert SECRET not in caplog.text


# --------------------------------------------------------------------------- viewer and schema


def test_root_serves_the_viewer_with_the_upload_form(tmp_path):
    docs = tmp_path / "docs"
    (docs / "data").mkdir(parents=True)
    (docs / "index.html").write_text('<html><body><form id="upload-form"></form><script src="upload.js"></script></body></html>')
    (docs / "upload.js").write_text("// js")
    (docs / "data" / "bench.json").write_text('{"ok": true}')
    with make_client(tmp_path, docs_dir=docs) as c:
        r = c.get("/")
        assert r.status_code == 200 and 'id="upload-form"' in r.text
        assert c.get("/upload.js").status_code == 200
        assert c.get("/data/bench.json").json() == {"ok": True}
        assert c.get("/health").json()["status"] == "ok"  # the API wins over files
        wrong = c.request("OPTIONS", "/detect")  # the route's 405, not the file server's
        assert_error(wrong, 405)
        assert wrong.headers["allow"] == "POST"
        assert c.post("/").status_code == 405
        assert post(c, png_bytes()).status_code == 200


def test_repository_viewer_has_a_safe_upload_form():
    """The contract with docs/: a form with id upload-form whose script posts to /detect, text never parsed as HTML."""
    from bone_r.runs import ROOT

    html = (ROOT / "docs" / "index.html").read_text()
    assert 'id="upload-form"' in html
    scripts = "".join(p.read_text() for p in (ROOT / "docs").glob("*.js"))
    assert "/detect" in scripts
    for sink in (r"\.innerHTML\s*=", r"\.outerHTML\s*=", r"insertAdjacentHTML", r"document\.write"):
        assert not re.search(sink, scripts + html), sink


def test_without_a_viewer_root_points_to_the_api(client):
    r = client.get("/")
    assert r.status_code == 200 and "/detect" in r.json()["message"]


def test_openapi_schema_documents_every_answer(client):
    spec = client.get("/openapi.json").json()
    detect = spec["paths"]["/detect"]["post"]
    assert set(detect["responses"]) >= {"200", "400", "413", "415", "422", "503"}
    body = detect["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["file"] and body["properties"]["file"]["format"] == "binary"
    params = {p["name"]: p for p in detect["parameters"]}
    assert set(params) == {"mode", "conf", "overlay", "lat", "lng", "output"}
    assert params["mode"]["schema"]["enum"] == list(MODES)
    assert params["output"]["schema"]["enum"] == ["json", "dicom"]
    assert set(detect["responses"]["200"]["content"]) == {"application/json", "application/zip"}  # output=dicom: a zip
    schemas = spec["components"]["schemas"]
    assert schemas["DetectResponse"]["examples"] and schemas["HealthResponse"]["examples"]
    assert detect["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "Retry-After" in detect["responses"]["503"]["headers"]


def test_health_answers_while_inference_runs(tmp_path):
    """Inference is off the event loop: /health is answered while a prediction is blocked."""
    detector = BlockingDetector()
    with make_client(tmp_path, detector=detector) as c:
        worker = threading.Thread(target=lambda: post(c, png_bytes(64, 64)))
        worker.start()
        assert detector.entered.wait(10)
        t0 = time.perf_counter()
        assert c.get("/health").status_code == 200
        assert time.perf_counter() - t0 < 2
        detector.release.set()
        worker.join(20)


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_untrained_yolo_end_to_end(tmp_path, monkeypatch):
    """The real Ultralytics path: an untrained YOLOv8n from its yaml (offline), served and called."""
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    pytest.importorskip("ultralytics")
    from ultralytics import YOLO

    weights = tmp_path / "yolov8n-untrained.pt"
    YOLO("yolov8n.yaml").save(str(weights))
    (tmp_path / "yolov8n-untrained.json").write_text(json.dumps({"imgsz": 320, "thresholds": {"balanced": 0.001}}))
    with TestClient(create_app(Settings(weights=weights, docs_dir=tmp_path))) as c:
        health = c.get("/health").json()
        assert health["status"] == "ok", health
        assert health["backend"] == "yolo"
        for data in (png_bytes(400, 300), make_dicom(make_phantom(128, 96).pixels), encode(np.zeros((1, 1), np.uint8), ".png")):
            r = post(c, data, "?overlay=true")
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["threshold"] == 0.001
            for det in body["detections"]:
                x1, y1, x2, y2 = det["xyxy"]
                assert 0 <= x1 <= x2 <= body["image_size"][0] and 0 <= y1 <= y2 <= body["image_size"][1]


# --------------------------------------------------------------------------- schemathesis (bounded)


def test_schemathesis_bounded_run(tmp_path):
    """Property-based calls from the OpenAPI schema: no 5xx, documented codes, bodies match the schema."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    with make_client(tmp_path, card=CARD) as c:
        schema = schemathesis.openapi.from_asgi("/openapi.json", c.app)
        failures = []

        statuses = set()
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} == {"/health", "/detect"}
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                if mode is GenerationMode.NEGATIVE and operation.path == "/health":
                    continue  # no parameters to break

                @settings(max_examples=30, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                @given(case=operation.as_strategy(generation_mode=mode))
                def check(case):
                    response = case.call()
                    statuses.add((case.path, response.status_code))
                    try:
                        # Random bytes fit the schema's "binary" yet are no image: 4xx is right for them.
                        case.validate_response(response, excluded_checks=[schemathesis.checks.positive_data_acceptance])
                    except Exception as err:  # noqa: BLE001 - collect and report all at once
                        failures.append(f"{mode} {case.method} {case.path} {case.query}: {err}")  # noqa: B023 - runs in this iteration
                    assert response.status_code < 500, response.text

                t0 = time.perf_counter()
                check()
                assert time.perf_counter() - t0 < 60
        assert not failures, "\n".join(failures[:5])
        assert ("/health", 200) in statuses and ("/detect", 422) in statuses


def test_asyncio_is_not_blocked_by_places_timeouts(tmp_path, places_server):
    """The lookup is awaited, not run on a blocking client (a stalled Places server cannot freeze the loop):
    /health is answered while a /detect waits on a Places server that takes 1.5 s to answer."""
    places_server.behaviour = "timeout"  # answers after 1.5 s, within the 3 s the service waits
    with clinics_client(tmp_path, places_server, timeout_s=3.0) as c:
        done = threading.Event()
        results = []

        def detect():
            results.append(post(c, png_bytes(), "?lat=1&lng=2"))
            done.set()

        worker = threading.Thread(target=detect)
        worker.start()
        deadline = time.monotonic() + 10
        while not places_server.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert places_server.requests, "the lookup never reached the Places server"
        assert c.get("/health").status_code == 200
        assert not done.is_set(), "/health waited for the stalled Places lookup: it blocks the event loop"
        worker.join(20)
    assert results[0].status_code == 200
    assert results[0].json()["nearby_clinics"]["available"] is True  # the slow answer still arrived
