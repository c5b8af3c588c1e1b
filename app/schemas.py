"""Response models of the Bone-R service (they make the OpenAPI schema complete), and the /detect answer built from
the Prediction (`detect_response`)."""

from __future__ import annotations

import base64
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bone_r import DISCLAIMER
from bone_r.modes import MODES


class ErrorResponse(BaseModel):
    """Every error: a machine word, a sentence for a person, and the HTTP status."""

    error: str = Field(description="short machine-readable code, e.g. payload_too_large")
    message: str = Field(description="what went wrong, for a person")
    status: int
    errors: list[dict[str, Any]] | None = Field(None, description="422 only: each invalid parameter and why")
    retry_after_s: int | None = Field(None, description="503 when saturated: seconds to wait (also the Retry-After header)")

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"error": "payload_too_large", "message": "the upload is larger than the limit of 32 MB", "status": 413},
    ]})


class Hints(BaseModel):
    """Best-guess type and severity words from the box alone (never a diagnosis)."""

    model_config = ConfigDict(extra="allow")
    type: str
    severity: str
    confidence: str
    aspect_ratio: float
    relative_area: float
    best_guess: bool = True
    note: str


class DetectionOut(BaseModel):
    xyxy: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in original-image pixels")
    score: float = Field(ge=0, le=1)
    label: str
    model: str
    hints: Hints | None = None


class ImageInfo(BaseModel):
    width: int
    height: int
    format: str = Field(description="png, jpeg, tiff, bmp or dicom (recognized by content)")
    bit_depth: int
    channels: int
    repaired: bool = Field(description="a truncated JPEG was completed before decoding")
    dicom: dict[str, Any] = Field(default_factory=dict, description="DICOM tags used for display (no patient data)")
    reduced: int = Field(1, description="decoded at 1/reduced of width x height (the model card's reduced_decode rule)")


class Consult(BaseModel):
    level: Literal["urgent-review", "routine-review", "no-finding"]
    text: str


class ClinicLocation(BaseModel):
    lat: float
    lng: float


class Clinic(BaseModel):
    name: str
    address: str
    rating: float | None = None
    location: ClinicLocation | None = None
    maps_url: str


class NearbyClinics(BaseModel):
    available: bool
    reason: str | None = Field(None, description="why no list is given (never holds the key or the request URL)")
    source: str | None = None
    results: list[Clinic] = Field(default_factory=list, max_length=5)
    attribution: str | None = None


class ModelRef(BaseModel):
    backend: str | None
    detector: str
    weights: str | None


class DetectResponse(BaseModel):
    filename: str
    image: ImageInfo
    image_size: list[int] = Field(min_length=2, max_length=2, description="[width, height] of the original image")
    mode: Literal[MODES]
    threshold: float
    threshold_source: str = Field(description="conf (the caller's), model_card, or fallback (no card)")
    fracture_detected: bool
    detections: list[DetectionOut]
    consult: Consult
    disclaimer: str
    nearby_clinics: NearbyClinics
    model: ModelRef
    timings_ms: dict[str, float]
    overlay_png_base64: str | None = Field(None, description="with overlay=true: the annotated image as base64 PNG")

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "filename": "wrist.png",
        "image": {"width": 1760, "height": 2140, "format": "png", "bit_depth": 16, "channels": 1, "repaired": False, "dicom": {}},
        "image_size": [1760, 2140],
        "mode": "balanced",
        "threshold": 0.31,
        "threshold_source": "model_card",
        "fracture_detected": True,
        "detections": [{
            "xyxy": [812.4, 1033.0, 940.2, 1101.7], "score": 0.72, "label": "fracture", "model": "onnx:bone-r-default",
            "hints": {"type": "focal (e.g. hairline, buckle or avulsion)", "severity": "mild or subtle", "confidence": "high",
                      "aspect_ratio": 1.86, "relative_area": 0.0023, "best_guess": True,
                      "note": "Best guess from the box's shape, size and score only; not a diagnosis."},
        }],
        "consult": {"level": "routine-review", "text": "Bone-R flagged a possible fracture. Have a clinician review this radiograph."},
        "disclaimer": DISCLAIMER,
        "nearby_clinics": {"available": False, "reason": "no location was given (lat and lng)"},
        "model": {"backend": "onnx", "detector": "onnx:bone-r-default", "weights": "bone-r-default.onnx"},
        "timings_ms": {"read_ms": 4.1, "queue_ms": 0.2, "decode_ms": 61.0, "harmonize_ms": 9.8, "model_ms": 88.5,
                       "post_ms": 0.4, "total_ms": 171.3},
        "overlay_png_base64": None,
    }]})


class WeightsInfo(BaseModel):
    name: str
    sha256_prefix: str = Field(description="first 12 hex digits of the weights file's SHA-256")


class ThresholdInfo(BaseModel):
    threshold: float
    source: str


class CardSummary(BaseModel):
    present: bool = Field(description="a model card was found beside the weights")
    name: str | None = None
    classes: list[str]
    imgsz: int | None = None
    thresholds: dict[str, ThresholdInfo]
    contract: dict[str, Any]


class Limits(BaseModel):
    max_upload_mb: float
    max_pixels: int
    max_image_memory_mb: float = Field(description="memory one image's decode (and overlay) may need, estimated before decoding")
    max_buffered_mb: float = Field(description="upload bytes held at once by requests arriving, waiting or being analysed")
    max_concurrency: int
    queue_limit: int
    upload_timeout_s: float = Field(description="the whole body must arrive within this (else 408)")
    analysis_timeout_s: float = Field(description="queue wait plus analysis (else 503, and the work is cancelled)")


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    reason: str | None = Field(None, description="why the model is unavailable")
    backend: str | None = None
    detector: str | None = None
    weights: WeightsInfo | None = None
    model_card: CardSummary | None = None
    clinics_lookup_enabled: bool
    modes: list[str]
    limits: Limits
    disclaimer: str

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "status": "ok", "reason": None, "backend": "onnx", "detector": "onnx:bone-r-default",
        "weights": {"name": "bone-r-default.onnx", "sha256_prefix": "3f7a9c01d2e4"},
        "model_card": {"present": True, "name": "bone-r-default", "classes": ["fracture"], "imgsz": 512,
                       "thresholds": {"screening": {"threshold": 0.12, "source": "model_card"},
                                      "balanced": {"threshold": 0.31, "source": "model_card"},
                                      "specific": {"threshold": 0.55, "source": "model_card"}},
                       "contract": {"clahe_clip": 2.0, "clahe_grid": 8, "max_side": 1024, "high_bit_rule": "minmax",
                                    "dicom_voi": "standard", "version": 1}},
        "clinics_lookup_enabled": False,
        "modes": ["screening", "balanced", "specific"],
        "limits": {"max_upload_mb": 32.0, "max_pixels": 100000000, "max_image_memory_mb": 800.0, "max_buffered_mb": 256.0,
                   "max_concurrency": 1, "queue_limit": 16, "upload_timeout_s": 60.0, "analysis_timeout_s": 60.0},
        "disclaimer": DISCLAIMER,
    }]})


def detect_response(prediction: Any, *, consult: dict[str, str], clinics: dict[str, Any], model: dict[str, Any],
                    more_timings_ms: dict[str, float], overlay_png: bytes | None) -> dict[str, Any]:
    """The /detect answer (`DetectResponse`): the Prediction's own record (`Prediction.to_record`, what
    `inference.py --json` writes: image size, mode, threshold and its source, the verdict, the detections, the
    timings) with what only the service knows: the decoded image's facts, the consult words, nearby clinics, the
    model, the service's own timings and the overlay."""
    record = prediction.to_record()
    return {
        "filename": record["image"],
        "image": prediction.meta.to_dict(),
        **{key: record[key] for key in ("image_size", "mode", "threshold", "threshold_source", "fracture_detected", "detections")},
        "consult": consult,
        "disclaimer": DISCLAIMER,
        "nearby_clinics": clinics,
        "model": model,
        "timings_ms": record["timings_ms"] | {k: round(v, 2) for k, v in more_timings_ms.items()},
        "overlay_png_base64": base64.b64encode(overlay_png).decode("ascii") if overlay_png is not None else None,
    }
