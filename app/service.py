"""The service's state: settings (`BONER_*`), the pool of predictors loaded in the lifespan, the admission counter,
and the analysis of one upload in a worker thread (decode, predict, draw). Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import ctypes
import logging
import math
import queue
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

import inference
from app import places
from app.schemas import ErrorResponse
from bone_r import DISCLAIMER, dicom_results
from bone_r.card import ModelCard
from bone_r.contract import to_uint8
from bone_r.detection import Prediction
from bone_r.draw import encode_png, overlay_for
from bone_r.image import (
    DEFAULT_MAX_MEMORY,
    DEFAULT_MAX_PIXELS,
    OVERLAY_BYTES_PER_PIXEL,
    ImageDecodeError,
    ImageMeta,
    LoadedImage,
    load_image,
)
from bone_r.modes import MODES
from bone_r.runs import ROOT, sha256_file

log = logging.getLogger("boner.service")


# Multipart framing around the file (boundaries, part headers) may add this much to the body.
MULTIPART_SLACK = 64 * 1024
# output=dicom draws the overlay, then holds it as the Secondary Capture's RGB pixels, their Part 10 bytes and the zip
# (estimated, 3 bytes per pixel each, plus highdicom's copy): per original pixel, on top of the decode.
DICOM_BYTES_PER_PIXEL = OVERLAY_BYTES_PER_PIXEL + 12


class Settings(BaseSettings):
    """Service settings, from `BONER_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="BONER_", extra="ignore")

    weights: Path | None = Field(None, description="model weights; default: the bundled model in weights/")
    backend: str | None = Field(None, description="detector backend; default: from the model card or file type")
    device: str = "cpu"
    max_upload_mb: float = Field(32.0, gt=0, description="largest accepted upload, in MB (10^6 bytes)")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="larger images are refused before decoding")
    max_image_memory_mb: float = Field(DEFAULT_MAX_MEMORY / 1e6, gt=0, description=(
        "memory one image's decode (and overlay) may need, estimated from its header before decoding; more gets 413"))
    max_buffered_mb: float = Field(256.0, gt=0, description=(
        "upload bytes held at once by requests still arriving, waiting or being analysed; past it, 503"))
    upload_timeout_s: float = Field(60.0, gt=0, description="the whole body must arrive within this; else 408")
    analysis_timeout_s: float = Field(60.0, gt=0, description=(
        "queue wait plus analysis; past it the work is cancelled and the answer is 503"))
    max_concurrency: int = Field(1, ge=1, le=64, description="images analysed at once (one model copy each)")
    queue_limit: int = Field(16, ge=0, description="requests allowed to wait beyond those running; more get 503")
    cors_origins: str = Field("", description="comma-separated allowed origins; empty: same-origin only")
    maps_api_key: SecretStr | None = Field(None, description="Google Places key; empty disables the clinics lookup")
    places_base_url: str = places.DEFAULT_BASE_URL
    places_timeout_s: float = Field(5.0, gt=0, le=60)
    places_radius_m: int = Field(10_000, ge=1, le=50_000)
    docs_dir: Path = ROOT / "docs"
    warmup: bool = Field(True, description="run one blank image through each model copy at startup")

    @field_validator("weights", "backend", "maps_api_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    @property
    def max_buffered_bytes(self) -> int:
        """At least one upload of the largest size always fits."""
        return max(int(self.max_buffered_mb * 1_000_000), self.max_upload_bytes + MULTIPART_SLACK)

    @property
    def api_key(self) -> str | None:
        return self.maps_api_key.get_secret_value() if self.maps_api_key else None

    @property
    def origins(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]


class ApiError(Exception):
    """Raised by handlers; becomes an `ErrorResponse` with this status."""

    def __init__(self, status: int, error: str, message: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.error, self.message, self.headers, self.extra = status, error, message, headers, extra


# An absolute POSIX path of two or more parts, quoted (may hold spaces) or bare; not the "//host/..." of a URL,
# not an API route such as /detect.
_ABSOLUTE_PATH = re.compile(r"""(?P<q>['"])(?P<quoted>/[^'"]+/[^'"]+)(?P=q)|(?<![\w/.:~-])(?P<bare>(?:/[^\s/'"`:,;()\[\]{}<>]+){2,}/?)""")


def names_not_paths(text: str) -> str:
    """`text` with every absolute path replaced by its file name: answers never show the server's layout."""
    def name(m: re.Match) -> str:
        if m["quoted"]:
            return f"{m['q']}{Path(m['quoted']).name}{m['q']}"
        return Path(m["bare"]).name
    return _ABSOLUTE_PATH.sub(name, text)


def error_response(status: int, error: str, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = ErrorResponse(error=error, message=message, status=status, **extra).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers)


# ImageDecodeError.kind -> (status, error word)
DECODE_STATUS = {
    "too_many_pixels": (413, "too_many_pixels"),
    "over_budget": (413, "decode_budget_exceeded"),
    "unsupported": (415, "unsupported_media_type"),
    "unsupported_compression": (415, "unsupported_compression"),
    "empty": (400, "empty_file"),
    "corrupt": (400, "undecodable_image"),
}


@dataclass
class ServiceState:
    """What the lifespan builds: the model copies, the worker pool, the admission and upload-bytes counters."""

    settings: Settings
    predictors: queue.Queue | None = None  # one Predictor per worker (Ultralytics models are not thread-safe)
    info: inference.Predictor | None = None  # the first copy, for /health
    load_error: str | None = None
    backend: str | None = None
    weights_info: dict[str, str] | None = None
    card_summary: dict[str, Any] | None = None
    identity: dict[str, str] | None = None  # the model's name and version, as DICOM results name it
    executor: ThreadPoolExecutor | None = None
    capacity: int = 1
    inflight: int = 0  # admitted requests: running + waiting; touched on the event loop only
    buffered: int = 0  # upload bytes held by requests arriving, waiting or running (see `Upload`); event loop only
    avg_job_s: float = 1.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ready(self) -> bool:
        return self.predictors is not None

    def try_admit(self) -> bool:
        if self.inflight >= self.capacity:
            return False
        self.inflight += 1
        return True

    def release(self) -> None:
        self.inflight = max(0, self.inflight - 1)

    def retry_after_s(self) -> int:
        workers = self.settings.max_concurrency
        return max(1, math.ceil(self.avg_job_s * self.inflight / workers))

    def record_job(self, seconds: float) -> None:
        with self.lock:
            self.avg_job_s = 0.8 * self.avg_job_s + 0.2 * seconds


def return_freed_buffers_to_the_os() -> None:
    """Have glibc give every freed allocation over 1 MB back to the OS (its own mmap, unmapped on free).

    By default glibc raises that threshold to the size of the last large buffer freed (up to 32 MB), so
    upload-sized buffers then come from the heap and stay there: RSS kept ~60 MB after each large upload.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixing it also stops the adjusting)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _warm_up(predictor: inference.Predictor) -> None:
    blank = LoadedImage(np.zeros((256, 256), np.uint8), ImageMeta("png", 8, 256, 256, 1))
    predictor.predict_loaded(blank, "warm-up")


def card_summary(predictor: inference.Predictor) -> dict[str, Any]:
    """What /health shows of the model card; built at startup, so a malformed card fails there, not per request."""
    card = predictor.card or ModelCard()
    return {
        "present": predictor.card is not None,
        "name": card.name,
        "classes": list(card.classes),
        "imgsz": card.imgsz,
        "thresholds": {m: dict(zip(("threshold", "source"), predictor.threshold(m))) for m in MODES},
        "contract": predictor.contract.to_dict(),
    }


def load_predictors(settings: Settings, state: ServiceState, injected: inference.Predictor | None) -> None:
    if injected is not None:
        copies = [injected] * settings.max_concurrency  # injected detectors handle their own thread safety
    else:
        copies = []
        for _ in range(settings.max_concurrency):
            copies.append(inference.Predictor(settings.weights, settings.backend, settings.device, max_pixels=settings.max_pixels))
        if settings.warmup:
            for predictor in copies:
                _warm_up(predictor)
    first = copies[0]
    if first.weights is not None and Path(first.weights).is_file():
        state.weights_info = {"name": Path(first.weights).name, "sha256_prefix": sha256_file(first.weights)[:12]}
    if settings.backend:
        state.backend = settings.backend
    elif first.weights is not None and injected is None:
        from models import infer_backend

        state.backend = infer_backend(first.weights, first.card)
    else:
        state.backend = getattr(first.detector, "backend", None) or first.name.split(":")[0]
    try:
        state.card_summary = card_summary(first)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the model card is malformed ({type(err).__name__}: {err})") from None
    pool: queue.Queue = queue.Queue()
    for predictor in copies:
        pool.put(predictor)
    state.identity = dicom_results.model_identity(first.card, first.weights, first.name)
    state.info, state.predictors = first, pool  # last: the service is ready only when all of it is


def consult_for(prediction: Prediction) -> dict[str, str]:
    """A careful next step derived from the finding and the best-guess severity; never a diagnosis."""
    flagged = [d for d in prediction.detections if d.score >= prediction.threshold]
    if not flagged:
        return {"level": "no-finding", "text": (
            f"Bone-R found nothing above the {prediction.mode} threshold ({prediction.threshold:.2f}). "
            "This does not rule out a fracture: many are subtle or hidden on a single view. "
            "If pain, swelling or loss of function persists, see a clinician.")}
    severe = any((d.hints or {}).get("severity") == "possibly severe" for d in flagged)
    if severe:
        return {"level": "urgent-review", "text": (
            "Bone-R flagged a possible fracture that it guesses could be severe (a best guess from the box alone). "
            "Have a clinician review this radiograph promptly; with severe pain, deformity, numbness, or a wound "
            "over the injury, seek emergency care.")}
    return {"level": "routine-review", "text": (
        "Bone-R flagged a possible fracture. Have a clinician (for example an orthopedic or emergency physician) "
        "review this radiograph; this is not a diagnosis.")}


@dataclass
class Outcome:
    """What a job hands back: a prediction, or an error as plain data.

    Never an exception: one travelling through the future kept the failed request's frames (and its
    upload, and the decoder's arrays) alive in a reference cycle until the next full garbage collection.
    """

    prediction: Prediction | None = None
    png: bytes | None = None
    dicom: bytes | None = None  # output=dicom: the zip of the results
    error: tuple[int, str, str] | None = None  # status, error word, message


def analyse(state: ServiceState, data: bytes, filename: str, mode: str, conf: float | None, overlay: bool,
             submitted: float, cancelled: threading.Event, dicom: bool = False) -> Outcome:
    """Decode, predict and draw one upload; checks `cancelled` between the stages (each one is bounded by the
    decode budget), so a request whose client left or whose deadline passed stops at the next stage."""
    gone = Outcome(error=(503, "cancelled", "the request was cancelled"))  # nobody reads it: the answer was given
    if cancelled.is_set():  # still queued when it was cancelled
        return gone
    started = time.perf_counter()
    predictor = state.predictors.get()
    try:
        t0 = time.perf_counter()
        settings = state.settings
        try:
            loaded = load_image(data, max_pixels=settings.max_pixels,
                                max_memory=int(settings.max_image_memory_mb * 1e6),
                                extra_bytes_per_pixel=DICOM_BYTES_PER_PIXEL if dicom else OVERLAY_BYTES_PER_PIXEL if overlay else 0,
                                contract=predictor.contract)
        except ImageDecodeError as err:
            status, word = DECODE_STATUS.get(err.kind, (400, "undecodable_image"))
            return Outcome(error=(status, word, str(err)))
        except Exception as err:  # noqa: BLE001 - any decoder failure is about this input, never a 500
            log.exception("unexpected decoder failure")
            return Outcome(error=(400, "undecodable_image", f"the image could not be decoded ({type(err).__name__})"))
        if cancelled.is_set():
            return gone
        timings = {"queue_ms": (started - submitted) * 1e3, "decode_ms": (time.perf_counter() - t0) * 1e3}
        prediction = predictor.predict_loaded(loaded, filename, mode, conf, timings=timings)
        if dicom:
            if cancelled.is_set():
                return gone
            return _dicom_results(state, data, loaded, prediction, predictor.contract)
        png = None
        if overlay and not cancelled.is_set():
            t1 = time.perf_counter()
            png = encode_png(overlay_for(prediction, loaded))
            prediction.timings_ms["overlay_ms"] = (time.perf_counter() - t1) * 1e3
        return Outcome(prediction, png)
    except Exception as err:  # noqa: BLE001 - a decoder or model failure is about this request, never the service's end
        log.exception("analysis failed")
        return Outcome(error=(500, "internal_error", f"the analysis failed unexpectedly ({type(err).__name__}); "
                                                     "see the server log"))
    finally:
        state.predictors.put(predictor)
        state.record_job(time.perf_counter() - started)


def _dicom_results(state: ServiceState, data: bytes, loaded: LoadedImage, prediction: Prediction, contract: Any) -> Outcome:
    """The SR and the annotated image of `prediction` (`bone_r.dicom_results`), zipped; a source that cannot hold them
    (no StudyInstanceUID, say) is the upload's fault: 400."""
    import io
    import zipfile

    t0 = time.perf_counter()
    record = prediction.to_record() | {"model": state.identity, "disclaimer": DISCLAIMER}
    try:
        overlay, sr = dicom_results.build_results(dicom_results.read_header(data), record, to_uint8(loaded.pixels, contract))
    except ValueError as err:
        return Outcome(error=(400, "unsupported_dicom", str(err)))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("bone-r-sr.dcm", dicom_results.to_bytes(sr))
        zf.writestr("bone-r-overlay.dcm", dicom_results.to_bytes(overlay))
    prediction.timings_ms["dicom_ms"] = (time.perf_counter() - t0) * 1e3
    return Outcome(prediction, dicom=buf.getvalue())
