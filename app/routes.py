"""The routes: `GET /health`, `POST /detect` (the upload read within its limits, the job queued, the answer built
from the Prediction by `app.schemas.detect_response`), and the error handlers. Research and teaching tool, not a
diagnosis.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from app import places
from app.schemas import DetectResponse, ErrorResponse, HealthResponse, detect_response
from app.service import MULTIPART_SLACK, ApiError, Outcome, ServiceState, Settings, analyse, consult_for, error_response
from bone_r import DISCLAIMER
from bone_r.detection import Prediction
from bone_r.image import sniff_format
from bone_r.modes import MODES


def install_error_handlers(app: FastAPI) -> None:
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


def add_routes(app: FastAPI, state: ServiceState) -> None:
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
            "modes": list(MODES),
            "limits": {"max_upload_mb": settings.max_upload_mb, "max_pixels": settings.max_pixels,
                       "max_image_memory_mb": settings.max_image_memory_mb, "max_buffered_mb": settings.max_buffered_mb,
                       "max_concurrency": settings.max_concurrency, "queue_limit": settings.queue_limit,
                       "upload_timeout_s": settings.upload_timeout_s, "analysis_timeout_s": settings.analysis_timeout_s},
            "disclaimer": DISCLAIMER,
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
            "Capture with the boxes burned in. " + DISCLAIMER
        ),
        openapi_extra={"requestBody": DETECT_BODY},
    )
    async def detect(
        request: Request,
        mode: Literal[MODES] = Query(
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
            if output == "dicom" and sniff_format(data) != "dicom":
                raise ApiError(415, "unsupported_media_type", "output=dicom needs a DICOM upload (a Part 10 file with "
                               "the DICM preamble); other images get JSON")
            if not state.try_admit():
                raise _busy(state, f"{state.inflight} requests in progress")
            loop = asyncio.get_running_loop()
            cancelled = threading.Event()
            submitted = time.perf_counter()
            job = state.executor.submit(analyse, state, data, filename, mode, conf, overlay, submitted, cancelled,
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
        model = {"backend": state.backend, "detector": state.info.name,
                 "weights": state.weights_info["name"] if state.weights_info else None}
        return detect_response(prediction, consult=consult_for(prediction), clinics=clinics, model=model,
                               more_timings_ms={"read_ms": read_ms, "total_ms": (time.perf_counter() - t_start) * 1e3},
                               overlay_png=png)

    # The same routes with a trailing slash (else /health/ reached the static docs/health file, /detect/ gave 405).
    app.add_api_route("/health/", health, methods=["GET"], response_model=HealthResponse, include_in_schema=False)
    app.add_api_route("/detect/", detect, methods=["POST"], response_model=DetectResponse, responses=ERROR_RESPONSES,
                      include_in_schema=False)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:  # the loop closed at shutdown: nothing left to release
        pass


async def _clinics(settings: Settings, prediction: Prediction, lat: float | None, lng: float | None) -> dict[str, Any]:
    if not prediction.fracture_detected:
        return places.unavailable("nothing was detected, so no clinics lookup was made")
    if not settings.api_key:
        return places.unavailable("the clinics lookup is not configured on this server (no Maps API key)")
    if lat is None or lng is None:
        return places.unavailable("no location was given (lat and lng)")
    return await places.find_nearby_clinics(
        lat, lng, api_key=settings.api_key, base_url=settings.places_base_url,
        timeout_s=settings.places_timeout_s, radius_m=settings.places_radius_m)
