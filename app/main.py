"""Bone-R's FastAPI service: `POST /detect`, `GET /health`, and the docs viewer at `/`.

    make serve                     # or: python -m uvicorn app.main:app --host 127.0.0.1 --port 8000
    BONER_WEIGHTS=runs/x/weights/best.pt make serve

Settings come from `BONER_*` environment variables (see `Settings`). The model
loads in the lifespan, never at import; when it cannot load (no bundled model yet)
the service still starts, `/health` says "unavailable" and why, and `/detect`
answers 503 with the same reason. Inference runs in a small thread pool behind a
bounded admission counter: past it, requests get 503 with Retry-After instead of
piling up in memory. A request is admitted only once its body has arrived (within
`upload_timeout_s`, against a budget of buffered upload bytes), so slow clients
starve no one; each image's decode is refused (413) when its estimated memory is
over `max_image_memory_mb`; and the work stops at its next stage when the client
hangs up or `analysis_timeout_s` passes. With `output=dicom` a DICOM upload gets its results as DICOM (a zip of an
SR and an annotated Secondary Capture in the source's study: `bone_r.dicom_results`). It imports `inference`,
`models` and `bone_r` only.

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import logging
import math
import queue
import re
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Mount
from starlette.types import Scope

import inference
from app import places
from app.schemas import DetectResponse, ErrorResponse, HealthResponse
from bone_r import dicom_results

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("boner.service")

# Multipart framing around the file (boundaries, part headers) may add this much to the body.
MULTIPART_SLACK = 64 * 1024
# output=dicom draws the overlay, then holds it as the Secondary Capture's RGB pixels, their Part 10 bytes and the zip
# (estimated, 3 bytes per pixel each, plus highdicom's copy): per original pixel, on top of the decode.
DICOM_BYTES_PER_PIXEL = inference.OVERLAY_BYTES_PER_PIXEL + 12


class Settings(BaseSettings):
    """Service settings, from `BONER_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="BONER_", extra="ignore")

    weights: Path | None = Field(None, description="model weights; default: the bundled model in weights/")
    backend: str | None = Field(None, description="detector backend; default: from the model card or file type")
    device: str = "cpu"
    max_upload_mb: float = Field(32.0, gt=0, description="largest accepted upload, in MB (10^6 bytes)")
    max_pixels: int = Field(inference.DEFAULT_MAX_PIXELS, ge=1, description="larger images are refused before decoding")
    max_image_memory_mb: float = Field(inference.DEFAULT_MAX_MEMORY / 1e6, gt=0, description=(
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


# --------------------------------------------------------------------------- the model pool


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


def _return_freed_buffers_to_the_os() -> None:
    """Have glibc give every freed allocation over 1 MB back to the OS (its own mmap, unmapped on free).

    By default glibc raises that threshold to the size of the last large buffer freed (up to 32 MB), so
    upload-sized buffers then come from the heap and stay there: RSS kept ~60 MB after each large upload.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixing it also stops the adjusting)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _warm_up(predictor: inference.Predictor) -> None:
    blank = inference.LoadedImage(np.zeros((256, 256), np.uint8), inference.ImageMeta("png", 8, 256, 256, 1))
    predictor.predict_loaded(blank, "warm-up")


def card_summary(predictor: inference.Predictor) -> dict[str, Any]:
    """What /health shows of the model card; built at startup, so a malformed card fails there, not per request."""
    card = predictor.card or {}
    classes = card.get("classes") or card.get("names") or ["fracture"]
    if isinstance(classes, dict):  # Ultralytics' {index: name}
        classes = list(classes.values())
    imgsz = card.get("imgsz")
    return {
        "present": predictor.card is not None,
        "name": str(card["name"]) if card.get("name") is not None else None,
        "classes": [str(c) for c in classes],
        "imgsz": int(imgsz) if imgsz is not None else None,
        "thresholds": {m: dict(zip(("threshold", "source"), predictor.threshold(m))) for m in inference.MODES},
        "contract": predictor.contract.to_dict(),
    }


def _load_predictors(settings: Settings, state: ServiceState, injected: inference.Predictor | None) -> None:
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
        state.weights_info = {"name": Path(first.weights).name, "sha256_prefix": inference.sha256_file(first.weights)[:12]}
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


def create_app(settings: Settings | None = None, predictor: inference.Predictor | None = None) -> FastAPI:
    """The service. `predictor` injects a ready model (tests); otherwise `settings` say what to load."""
    settings = settings or Settings()
    state = ServiceState(settings=settings, capacity=settings.max_concurrency + settings.queue_limit)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        places.install_log_redaction()
        _return_freed_buffers_to_the_os()
        state.executor = ThreadPoolExecutor(max_workers=settings.max_concurrency, thread_name_prefix="boner-infer")
        try:
            await asyncio.get_running_loop().run_in_executor(state.executor, _load_predictors, settings, state, predictor)
            log.info("model ready: %s (%s)", state.info.name if state.info else "?", state.backend)
        except Exception as err:  # noqa: BLE001 - any load failure leaves a running, honest service
            state.predictors = None
            hint = " (for the service: set BONER_WEIGHTS=PATH)" if isinstance(err, FileNotFoundError) else ""
            log.error("the model could not be loaded: %s%s", err, hint)  # the operator's log keeps the full paths
            state.load_error = names_not_paths(f"the model could not be loaded: {err}{hint}")
        try:
            yield
        finally:
            state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="Bone-R",
        version="0.1.0",
        summary="Find and localize fractures on plain radiographs (research tool, not a diagnosis).",
        description=inference.DISCLAIMER,
        lifespan=lifespan,
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.state.service = state
    if settings.origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.origins, allow_methods=["GET", "POST"], allow_headers=["*"])
    _install_error_handlers(app)
    _add_routes(app, state)
    docs_dir = Path(settings.docs_dir)
    if (docs_dir / "index.html").is_file():
        # Mounted last, and blind to the API's paths: a wrong method on /detect gets the route's 405 (Allow: POST),
        # not the file server's (Allow: GET, HEAD).
        api_paths = {route.path for route in app.routes if hasattr(route, "path")}
        app.router.routes.append(_DocsMount("/", app=StaticFiles(directory=docs_dir, html=True), name="docs", api_paths=api_paths))
    else:
        @app.get("/", include_in_schema=False)
        async def no_viewer() -> JSONResponse:
            return JSONResponse({"message": f"no viewer here ({docs_dir.name}/index.html is missing); the API is at "
                                            "/detect and /health",
                                 "openapi": "/openapi.json"})
    return app


class _DocsMount(Mount):
    """The static viewer at `/`, which never claims a path that belongs to the API."""

    def __init__(self, *args: Any, api_paths: set[str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.api_paths = api_paths

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope.get("path") in self.api_paths:
            return Match.NONE, {}
        return super().matches(scope)


# --------------------------------------------------------------------------- errors


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.error, err.message, err.headers, **err.extra)

    @app.exception_handler(RequestValidationError)
    async def invalid_params(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = []
        for e in err.errors():
            loc = [str(p) for p in e.get("loc", ()) if p not in ("query", "body")]
            problems.append({"param": ".".join(loc) or "request", "message": str(e.get("msg", "invalid"))})
        text = "; ".join(f"{p['param']}: {p['message']}" for p in problems) or "invalid request parameters"
        return error_response(422, "invalid_parameters", f"invalid request parameters ({text})", errors=problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        words = {404: "not_found", 405: "method_not_allowed"}
        return error_response(err.status_code, words.get(err.status_code, "http_error"), str(err.detail), err.headers)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "the upload is empty, not multipart, or an image that cannot be decoded"},
    408: {"model": ErrorResponse, "description": "the upload did not arrive within upload_timeout_s"},
    413: {"model": ErrorResponse, "description": "the upload is over the size limit, the image over the pixel limit, or "
                                                 "its decode over the memory budget (decompression bombs, scan bombs)"},
    415: {"model": ErrorResponse, "description": "not an image format we read (PNG, JPEG, TIFF, BMP, DICOM), "
                                                 "or a DICOM compression no installed decoder handles"},
    422: {"model": ErrorResponse, "description": "invalid parameters (unknown mode, conf outside [0, 1], bad lat/lng, no file)"},
    503: {"model": ErrorResponse, "description": "the model is unavailable, the service is saturated, or the analysis "
                                                 "passed analysis_timeout_s (see Retry-After)",
          "headers": {"Retry-After": {"description": "seconds to wait (saturation and timeout)", "schema": {"type": "integer"}}}},
}

DICOM_RESPONSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "the prediction (JSON); with output=dicom, a zip of bone-r-sr.dcm and bone-r-overlay.dcm",
    "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}}}}

DETECT_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary",
                                "description": "a radiograph: PNG, JPEG, TIFF, BMP or DICOM (recognized by content)"}},
    }}},
}


# --------------------------------------------------------------------------- analysis (worker thread)


def consult_for(prediction: inference.Prediction) -> dict[str, str]:
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

    prediction: inference.Prediction | None = None
    png: bytes | None = None
    dicom: bytes | None = None  # output=dicom: the zip of the results
    error: tuple[int, str, str] | None = None  # status, error word, message


def _analyse(state: ServiceState, data: bytes, filename: str, mode: str, conf: float | None, overlay: bool,
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
            loaded = inference.load_image(data, max_pixels=settings.max_pixels,
                                          max_memory=int(settings.max_image_memory_mb * 1e6),
                                          extra_bytes_per_pixel=DICOM_BYTES_PER_PIXEL if dicom else
                                          inference.OVERLAY_BYTES_PER_PIXEL if overlay else 0)
        except inference.ImageDecodeError as err:
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
            return _dicom_results(state, data, loaded, prediction)
        png = None
        if overlay and not cancelled.is_set():
            t1 = time.perf_counter()
            png = inference.encode_png(inference.overlay_for(prediction, loaded))
            prediction.timings_ms["overlay_ms"] = (time.perf_counter() - t1) * 1e3
        return Outcome(prediction, png)
    except Exception as err:  # noqa: BLE001 - a decoder or model failure is about this request, never the service's end
        log.exception("analysis failed")
        return Outcome(error=(500, "internal_error", f"the analysis failed unexpectedly ({type(err).__name__}); "
                                                     "see the server log"))
    finally:
        state.predictors.put(predictor)
        state.record_job(time.perf_counter() - started)


def _dicom_results(state: ServiceState, data: bytes, loaded: inference.LoadedImage, prediction: inference.Prediction) -> Outcome:
    """The SR and the annotated image of `prediction` (`bone_r.dicom_results`), zipped; a source that cannot hold them
    (no StudyInstanceUID, say) is the upload's fault: 400."""
    import io
    import zipfile

    t0 = time.perf_counter()
    record = prediction.to_record() | {"model": state.identity, "disclaimer": inference.DISCLAIMER}
    try:
        overlay, sr = dicom_results.build_results(dicom_results.read_header(data), record, inference.to_uint8(loaded.pixels))
    except ValueError as err:
        return Outcome(error=(400, "unsupported_dicom", str(err)))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("bone-r-sr.dcm", dicom_results.to_bytes(sr))
        zf.writestr("bone-r-overlay.dcm", dicom_results.to_bytes(overlay))
    prediction.timings_ms["dicom_ms"] = (time.perf_counter() - t0) * 1e3
    return Outcome(prediction, dicom=buf.getvalue())


# --------------------------------------------------------------------------- upload


class _BodyTooLarge(Exception):
    pass


class _OverBudget(Exception):
    pass


class Upload:
    """The bytes one request holds against `max_buffered_mb`, from its first chunk until its work ends.

    A request takes a queue slot only once its whole body has arrived (see `detect`), so the bytes of the
    bodies still arriving are what this bounds; slow clients hold little of it. Event loop only.
    """

    def __init__(self, state: ServiceState):
        self.state, self.bytes = state, 0

    def hold(self, n: int) -> None:
        if self.state.buffered + n > self.state.settings.max_buffered_bytes:
            raise _OverBudget
        self.state.buffered += n
        self.bytes += n

    def release(self) -> None:
        self.state.buffered = max(0, self.state.buffered - self.bytes)
        self.bytes = 0


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the upload is larger than the limit of {limit / 1e6:g} MB")


def _busy(state: ServiceState, what: str) -> ApiError:
    retry = state.retry_after_s()
    return ApiError(503, "busy", f"the service is busy ({what}); retry in {retry} s",
                    headers={"Retry-After": str(retry)}, retry_after_s=retry)


async def _read_upload(request: Request, limit: int, upload: Upload) -> tuple[bytes, str]:
    """The `file` part's bytes, counting while the body streams in; nothing past `limit` is buffered."""
    body_limit = limit + MULTIPART_SLACK
    received = 0

    async def limited() -> AsyncIterator[bytes]:
        nonlocal received
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise _BodyTooLarge
            upload.hold(len(chunk))
            yield chunk

    parser = MultiPartParser(request.headers, limited(), max_files=1, max_fields=8)
    # The file ends up in memory anyway (the decoder takes bytes): spooling it to disk first only costs time.
    parser.spool_max_size = body_limit
    try:
        form = await parser.parse()
    except _BodyTooLarge:
        raise _too_large(limit) from None
    except _OverBudget:
        raise _busy(upload.state, "too many uploads in progress") from None
    except MultiPartException as err:
        raise ApiError(400, "bad_multipart", f"the multipart body could not be parsed ({err})") from None
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client closed the connection during the upload") from None
    try:
        file = form.get("file")
        if file is None:
            raise ApiError(422, "invalid_parameters", "no `file` field in the multipart body; send the image as `file`",
                           errors=[{"param": "file", "message": "field required"}])
        if not isinstance(file, UploadFile):
            raise ApiError(422, "invalid_parameters", "the `file` field must be a file upload, not a text field",
                           errors=[{"param": "file", "message": "expected a file"}])
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise _too_large(limit)
        return data, (file.filename or "")[:200]
    finally:
        await form.close()


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up. The body has been read, so the next message can only be the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)


async def _outcome(state: ServiceState, request: Request, job: Any, cancelled: threading.Event) -> Outcome:
    """The job's outcome; when the deadline passes or the client hangs up first, the work is cancelled (a queued
    job never starts, a running one stops at its next stage; its slot frees when it does) and an ApiError raised."""
    timeout_s = state.settings.analysis_timeout_s
    result = asyncio.wrap_future(job)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({result, watcher}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if result in done:
        return result.result()
    cancelled.set()
    job.cancel()
    if watcher in done:
        raise ApiError(400, "client_disconnected", "the client closed the connection before the answer")
    retry = state.retry_after_s()
    raise ApiError(503, "analysis_timeout", f"the analysis did not finish within {timeout_s:g} s (the service may "
                   f"be busy, or the image is very large); retry in {retry} s",
                   headers={"Retry-After": str(retry)}, retry_after_s=retry)


# --------------------------------------------------------------------------- routes


def _add_routes(app: FastAPI, state: ServiceState) -> None:
    settings = state.settings

    @app.get("/health", response_model=HealthResponse, tags=["service"], summary="Model, thresholds and service status")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok" if state.ready else "unavailable",
            "reason": None if state.ready else (state.load_error or "the model is still loading"),
            "backend": state.backend,
            "detector": state.info.name if state.info is not None else None,
            "weights": state.weights_info,
            "model_card": state.card_summary if state.ready else None,
            "clinics_lookup_enabled": bool(settings.api_key),
            "modes": list(inference.MODES),
            "limits": {"max_upload_mb": settings.max_upload_mb, "max_pixels": settings.max_pixels,
                       "max_image_memory_mb": settings.max_image_memory_mb, "max_buffered_mb": settings.max_buffered_mb,
                       "max_concurrency": settings.max_concurrency, "queue_limit": settings.queue_limit,
                       "upload_timeout_s": settings.upload_timeout_s, "analysis_timeout_s": settings.analysis_timeout_s},
            "disclaimer": inference.DISCLAIMER,
        }

    @app.post(
        "/detect",
        response_model=DetectResponse,
        responses={**ERROR_RESPONSES, **DICOM_RESPONSE},
        tags=["detect"],
        summary="Find and localize fractures on one radiograph",
        description=(
            "Upload one radiograph as multipart field `file` (PNG, JPEG, TIFF, BMP or DICOM, recognized by content). "
            "Boxes are in the original image's pixels. `mode` picks the operating threshold from the model card; "
            "`conf` overrides it. With `overlay=true` the annotated image comes back as base64 PNG in "
            "`overlay_png_base64`. With `lat`/`lng`, a configured Maps key and a finding, `nearby_clinics` lists up to "
            "5 orthopedic clinics. With `output=dicom` (a DICOM upload only) the answer is instead a zip "
            "(application/zip) of two DICOM files in the source's study: `bone-r-sr.dcm`, a Comprehensive 3D SR "
            "(TID 1500: one finding per box, its region in the source's pixels) and `bone-r-overlay.dcm`, a Secondary "
            "Capture with the boxes burned in. " + inference.DISCLAIMER
        ),
        openapi_extra={"requestBody": DETECT_BODY},
    )
    async def detect(
        request: Request,
        mode: Literal["screening", "balanced", "specific"] = Query(
            "balanced", description="operating point: thresholds chosen on the validation split (model card)"),
        conf: float | None = Query(None, ge=0, le=1, allow_inf_nan=False,
                                   description="score threshold in [0, 1]; overrides `mode`"),
        overlay: bool = Query(False, description="also return the annotated image (base64 PNG)"),
        lat: float | None = Query(None, ge=-90, le=90, allow_inf_nan=False, description="latitude, given with lng, for nearby clinics"),
        lng: float | None = Query(None, ge=-180, le=180, allow_inf_nan=False, description="longitude, given with lat, for nearby clinics"),
        output: Literal["json", "dicom"] = Query("json", description=(
            "`dicom`: answer a DICOM upload with a zip of an SR and an annotated image (see above) instead of JSON")),
    ) -> Any:
        t_start = time.perf_counter()
        if (lat is None) != (lng is None):
            missing = "lng" if lng is None else "lat"
            raise ApiError(422, "invalid_parameters", "give both lat and lng, or neither",
                           errors=[{"param": missing, "message": "required when the other coordinate is given"}])
        if not state.ready:
            raise ApiError(503, "model_unavailable", state.load_error or "the model is still loading")
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise ApiError(415, "unsupported_media_type",
                           "send the image as multipart/form-data with a `file` field "
                           f"(got content type {content_type[:80]!r})")
        limit = settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                declared_bytes = int(declared)
            except ValueError:
                raise ApiError(400, "bad_request", "the Content-Length header is not a number") from None
            if declared_bytes > limit + MULTIPART_SLACK:
                raise ApiError(413, "payload_too_large", f"the upload is larger than the limit of {limit / 1e6:g} MB")
        # The body is read before the request takes a queue slot (slow clients hold none), within a time limit
        # and against the budget of buffered upload bytes.
        upload = Upload(state)
        try:
            t_read = time.perf_counter()
            try:
                data, filename = await asyncio.wait_for(_read_upload(request, limit, upload), settings.upload_timeout_s)
            except TimeoutError:
                raise ApiError(408, "upload_timeout", f"the upload did not arrive within {settings.upload_timeout_s:g} s"
                               ) from None
            read_ms = (time.perf_counter() - t_read) * 1e3
            if output == "dicom" and inference.sniff_format(data) != "dicom":
                raise ApiError(415, "unsupported_media_type", "output=dicom needs a DICOM upload (a Part 10 file with "
                               "the DICM preamble); other images get JSON")
            if not state.try_admit():
                raise _busy(state, f"{state.inflight} requests in progress")
            loop = asyncio.get_running_loop()
            cancelled = threading.Event()
            submitted = time.perf_counter()
            job = state.executor.submit(_analyse, state, data, filename, mode, conf, overlay, submitted, cancelled,
                                        output == "dicom")
        except BaseException:
            upload.release()
            raise
        del data  # the job has it

        def free() -> None:  # the slot and the bytes free when the work ends, not when this coroutine does
            state.release()
            upload.release()

        job.add_done_callback(lambda _: _call_soon(loop, free))
        outcome = await _outcome(state, request, job, cancelled)
        if outcome.error:
            raise ApiError(*outcome.error)
        prediction, png = outcome.prediction, outcome.png
        if outcome.dicom is not None:
            return Response(outcome.dicom, media_type="application/zip", headers={
                "Content-Disposition": 'attachment; filename="bone-r-results.zip"',
                "X-Bone-R-Fracture-Detected": "true" if prediction.fracture_detected else "false"})

        clinics = await _clinics(settings, prediction, lat, lng)
        timings = dict(prediction.timings_ms)
        timings["read_ms"] = read_ms
        timings["total_ms"] = (time.perf_counter() - t_start) * 1e3
        meta = prediction.meta
        return {
            "filename": filename,
            "image": {"width": meta.width, "height": meta.height, "format": meta.format, "bit_depth": meta.bit_depth,
                      "channels": meta.channels, "repaired": meta.repaired, "dicom": meta.dicom},
            "image_size": [prediction.width, prediction.height],
            "mode": prediction.mode,
            "threshold": prediction.threshold,
            "threshold_source": prediction.threshold_source,
            "fracture_detected": prediction.fracture_detected,
            "detections": [d.to_dict() for d in prediction.detections],
            "consult": consult_for(prediction),
            "disclaimer": inference.DISCLAIMER,
            "nearby_clinics": clinics,
            "model": {"backend": state.backend, "detector": state.info.name,
                      "weights": state.weights_info["name"] if state.weights_info else None},
            "timings_ms": {k: round(v, 2) for k, v in timings.items()},
            "overlay_png_base64": base64.b64encode(png).decode("ascii") if png is not None else None,
        }

    # The same routes with a trailing slash (else /health/ reached the static docs/health file, /detect/ gave 405).
    app.add_api_route("/health/", health, methods=["GET"], response_model=HealthResponse, include_in_schema=False)
    app.add_api_route("/detect/", detect, methods=["POST"], response_model=DetectResponse, responses=ERROR_RESPONSES,
                      include_in_schema=False)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:  # the loop closed at shutdown: nothing left to release
        pass


async def _clinics(settings: Settings, prediction: inference.Prediction, lat: float | None, lng: float | None) -> dict[str, Any]:
    if not prediction.fracture_detected:
        return places.unavailable("nothing was detected, so no clinics lookup was made")
    if not settings.api_key:
        return places.unavailable("the clinics lookup is not configured on this server (no Maps API key)")
    if lat is None or lng is None:
        return places.unavailable("no location was given (lat and lng)")
    return await places.find_nearby_clinics(
        lat, lng, api_key=settings.api_key, base_url=settings.places_base_url,
        timeout_s=settings.places_timeout_s, radius_m=settings.places_radius_m)


app = create_app()
