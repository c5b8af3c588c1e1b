"""Bone-R's shared core: image loading, the harmonization contract, prediction.

Everything that touches a radiograph goes through this module: the offline
pre-processing (`scripts/preprocess.py`), training data preparation, every model
backend, the command-line predictor below, the FastAPI service and the overlays.
Importing it has no side effects: heavy libraries (pydicom, torch, the model
backends) load on first use.

    python inference.py --image xray.png --out prediction.png --json prediction.json

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent
WEIGHTS_DIR = ROOT / "weights"
DEFAULT_MODEL_NAME = "bone-r-default"
DEFAULT_MAX_PIXELS = 100_000_000
DISCLAIMER = (
    "Bone-R is a research and teaching tool, not a medical device and not a diagnosis. "
    "A clinician must read every radiograph."
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}


# --------------------------------------------------------------------------- errors


class ImageDecodeError(ValueError):
    """The one exception `load_image` raises: `str(err)` is a sentence for a person.

    `kind` says what went wrong, so callers can map it (the service maps
    ``too_many_pixels`` to 413 and everything else to 400/415):
    ``empty``, ``unsupported`` (not an image format we read), ``corrupt``
    (looks like a known format but cannot be decoded), ``too_many_pixels``
    (refused before decoding) and ``unsupported_compression`` (a DICOM transfer
    syntax no installed decoder handles).
    """

    def __init__(self, message: str, kind: str = "corrupt"):
        super().__init__(message)
        self.kind = kind


# --------------------------------------------------------------------------- contract


@dataclass(frozen=True)
class Contract:
    """The harmonization contract: what every image looks like to a model.

    It is data, recorded in the dataset manifest and in the model card, so that
    prediction reproduces exactly what training saw.

    - ``clahe_clip`` / ``clahe_grid``: OpenCV CLAHE clip limit and tile grid
      (grid × grid tiles); ``clahe_clip = 0`` disables CLAHE.
    - ``max_side``: images whose long side is larger are downscaled
      (aspect preserved, area interpolation); smaller images are never upscaled.
    - ``high_bit_rule``: how >8-bit PNG/TIFF data becomes 8-bit. ``minmax``
      stretches the image's own min..max to 0..255, so 12-bit data stored in
      16-bit containers keeps its full contrast (no clipping, no /256).
    - ``dicom_voi``: the DICOM display rule. ``standard``: Modality LUT
      (RescaleSlope/Intercept), then the VOI LUT Sequence if present, else the
      first WindowCenter/WindowWidth pair, else min..max; MONOCHROME1 inverted.
    """

    clahe_clip: float = 2.0
    clahe_grid: int = 8
    max_side: int = 1024
    high_bit_rule: str = "minmax"
    dicom_voi: str = "standard"
    version: int = 1

    def __post_init__(self):
        if not (self.clahe_clip >= 0 and math.isfinite(self.clahe_clip)):
            raise ValueError(f"clahe_clip must be a finite number >= 0, got {self.clahe_clip!r}")
        if int(self.clahe_grid) < 1:
            raise ValueError(f"clahe_grid must be >= 1, got {self.clahe_grid!r}")
        if int(self.max_side) < 32:
            raise ValueError(f"max_side must be >= 32, got {self.max_side!r}")
        if self.high_bit_rule != "minmax":
            raise ValueError(f"high_bit_rule must be 'minmax', got {self.high_bit_rule!r}")
        if self.dicom_voi != "standard":
            raise ValueError(f"dicom_voi must be 'standard', got {self.dicom_voi!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Contract:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown contract keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=True))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Contract:
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path} does not hold a contract mapping")
        return cls.from_dict(data)


# --------------------------------------------------------------------------- loading


@dataclass
class ImageMeta:
    """What `load_image` learned about the file besides its pixels."""

    format: str  # png, jpeg, tiff, bmp, dicom
    bit_depth: int  # bits per sample of the stored data (DICOM: BitsStored)
    width: int
    height: int
    channels: int  # channels in the file, before conversion to grayscale
    repaired: bool = False  # a truncated JPEG was completed before decoding
    dicom: dict[str, Any] = field(default_factory=dict)  # DICOM tags used, and the VOI rule applied

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the original image."""
        return self.width, self.height

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoadedImage(NamedTuple):
    pixels: np.ndarray  # 2-D grayscale: uint8, or uint16/float32 for high-bit PNG/TIFF
    meta: ImageMeta


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"BM", "bmp"),
)


def sniff_format(data: bytes) -> str | None:
    """The format of `data` from its content (never its file name), or None."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def load_image(source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode a radiograph from a path or bytes into a 2-D grayscale array.

    PNG, JPEG, TIFF and BMP (8 or 16 bit, gray or colour) and DICOM (recognized
    by its ``DICM`` preamble, whatever the file is called). The pixel count is
    checked from the header before anything is decoded. Colour becomes gray.
    A JPEG that ends early is completed with an end-of-image marker and
    decoded (``meta.repaired``). DICOM goes through the contract's display rule
    (see `Contract`) and comes back as uint8.

    Raises `ImageDecodeError` for every failure.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as err:
            raise ImageDecodeError(f"cannot read {source}: {err.strerror or err}", "unsupported") from None
    if not data:
        raise ImageDecodeError("the file is empty", "empty")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageDecodeError(
            "not an image we can read: expected PNG, JPEG, TIFF, BMP or DICOM (with the DICM preamble)",
            "unsupported",
        )
    if fmt == "dicom":
        try:
            return _load_dicom(data, max_pixels)
        except ImageDecodeError:
            raise
        except Exception as err:  # noqa: BLE001 - pydicom parses lazily: a malformed element raises wherever it is read
            raise ImageDecodeError(f"the DICOM file is malformed ({type(err).__name__})", "corrupt") from None
    return _load_raster(data, fmt, max_pixels)


def _check_pixels(width: int, height: int, max_pixels: int, what: str = "image") -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"the {what} header declares an empty size {width}x{height}", "corrupt")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"the {what} is {width}x{height} = {width * height / 1e6:.1f} MP, over the limit of "
            f"{max_pixels / 1e6:.1f} MP; it was refused before decoding",
            "too_many_pixels",
        )


def _raster_header(data: bytes, fmt: str) -> tuple[int, int]:
    """Width and height from the header alone: no pixel data is read.

    The format's PIL plugin is used directly (not `Image.open`) so that our own
    pixel limit, not PIL's global one, decides what is too large.
    """
    from PIL import BmpImagePlugin, JpegImagePlugin, PngImagePlugin, TiffImagePlugin

    plugin = {"png": PngImagePlugin.PngImageFile, "jpeg": JpegImagePlugin.JpegImageFile,
              "tiff": TiffImagePlugin.TiffImageFile, "bmp": BmpImagePlugin.BmpImageFile}[fmt]
    try:
        with plugin(io.BytesIO(data)) as im:
            return im.size
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad headers
        raise ImageDecodeError(f"the {fmt.upper()} header is unreadable ({type(err).__name__})", "corrupt") from None


def _jpeg_is_truncated(data: bytes) -> bool:
    return not data.rstrip(b"\x00").endswith(b"\xff\xd9")


def _png_chunks_fit(data: bytes) -> bool:
    """Whether every PNG chunk's declared length fits in the data.

    OpenCV allocates what a chunk declares: a 2 kB file claiming a 3 GB IDAT cost
    3 GB of memory and seconds of CPU (found by tests/test_fuzz_load_image.py).
    A PNG that ends early never decodes anyway, so refusing it first changes no answer.
    """
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        if length > len(data) - pos - 12:
            return False
        if data[pos + 4 : pos + 8] == b"IEND":
            return True
        pos += 12 + length
    return True


def _load_raster(data: bytes, fmt: str, max_pixels: int) -> LoadedImage:
    width, height = _raster_header(data, fmt)
    _check_pixels(width, height, max_pixels)
    if fmt == "png" and not _png_chunks_fit(data):
        raise ImageDecodeError("the PNG is truncated or declares a chunk longer than the file", "corrupt")
    repaired = False
    if fmt == "jpeg" and _jpeg_is_truncated(data):
        data = data + b"\xff\xd9"
        repaired = True
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.size == 0:
        raise ImageDecodeError(f"the {fmt.upper()} data is corrupt and could not be decoded", "corrupt")
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    gray = _to_gray(arr)
    if gray.dtype == np.uint8:
        bit_depth = 8
    elif gray.dtype == np.uint16:
        bit_depth = 16
    else:
        gray = gray.astype(np.float32)
        bit_depth = 32
    height, width = gray.shape
    return LoadedImage(gray, ImageMeta(fmt, bit_depth, width, height, channels, repaired))


def _to_gray(arr: np.ndarray) -> np.ndarray:
    """OpenCV channel order (BGR/BGRA) in, one channel out; alpha is ignored."""
    if arr.ndim == 2:
        return arr
    channels = arr.shape[2]
    if channels == 1:
        return arr[:, :, 0]
    if channels == 2:  # gray + alpha
        return arr[:, :, 0]
    if arr.dtype not in (np.uint8, np.uint16, np.float32):
        arr = arr.astype(np.float32)
    code = cv2.COLOR_BGRA2GRAY if channels == 4 else cv2.COLOR_BGR2GRAY
    return cv2.cvtColor(arr[:, :, :4] if channels > 4 else arr, code)


def _dicom_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1] (LINEAR, LINEAR_EXACT, SIGMOID)."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width < 1:  # LINEAR requires width >= 1
        raise ValueError("window width below 1")
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _first(value: Any) -> float:
    """The first of a multi-valued DICOM number (the default per PS3.3), as float."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return float(value[0])
    return float(value)


def _load_dicom(data: bytes, max_pixels: int) -> LoadedImage:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as err:  # noqa: BLE001
        raise ImageDecodeError(f"the DICOM file is unreadable ({type(err).__name__})", "corrupt") from None
    if "PixelData" not in ds:
        raise ImageDecodeError("the DICOM file holds no image (no PixelData)", "corrupt")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise ImageDecodeError("the DICOM file lacks valid Rows/Columns", "corrupt") from None
    _check_pixels(cols, rows, max_pixels, "DICOM image")
    if frames * samples > 64:
        raise ImageDecodeError(f"the DICOM file has {frames} frames x {samples} samples; only radiographs are read", "unsupported")
    file_meta = getattr(ds, "file_meta", None)
    tsuid = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        pixels = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - the pixel handlers raise various types
        syntax = f"{tsuid.name} ({tsuid})" if tsuid is not None else "unknown"
        try:
            compressed = tsuid is not None and tsuid.is_compressed
        except ValueError:  # the UID is not a transfer syntax at all
            compressed = False
        if compressed:
            raise ImageDecodeError(
                f"the DICOM pixel data uses the compressed transfer syntax {syntax}, which no installed "
                "decoder can read (Bone-R installs pylibjpeg for JPEG, JPEG-LS and JPEG 2000; RLE is built in)",
                "unsupported_compression",
            ) from None
        raise ImageDecodeError(f"the DICOM pixel data could not be decoded ({type(err).__name__}, syntax {syntax})", "corrupt") from None
    if pixels.ndim == (4 if samples > 1 else 3):
        # radiographs: the first frame (pydicom returns every frame the data holds, even past NumberOfFrames)
        pixels = pixels[0]
    tags: dict[str, Any] = {
        "TransferSyntaxUID": str(tsuid) if tsuid is not None else None,
        "PhotometricInterpretation": photometric,
        "BitsStored": int(ds.get("BitsStored", 0) or 0),
        "Modality": str(ds.get("Modality", "")),
        "BodyPartExamined": str(ds.get("BodyPartExamined", "")),
    }
    if pixels.ndim == 3 and pixels.shape[2] >= 3:  # colour DICOM (pydicom returns RGB)
        pixels = cv2.cvtColor(np.ascontiguousarray(pixels[:, :, :3]).astype(np.float32), cv2.COLOR_RGB2GRAY)
        photometric = "RGB"
    elif pixels.ndim == 3:  # 2 samples per pixel: not a radiograph layout; keep the first
        pixels = pixels[:, :, 0]
    if pixels.shape != (rows, cols):
        raise ImageDecodeError(f"the DICOM pixel data ({pixels.shape}) does not match its Rows x Columns ({rows}x{cols})", "corrupt")
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        for key, default in (("RescaleSlope", 1), ("RescaleIntercept", 0)):
            value = float(ds.get(key, default) or default)
            tags[key] = value if math.isfinite(value) else None  # JSON has no NaN or infinity
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    if not np.isfinite(values).all():
        raise ImageDecodeError("the DICOM rescale (RescaleSlope/Intercept) gives non-finite pixel values", "corrupt")

    display = None
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        try:
            lut_item = ds.VOILUTSequence[0]
            bits = int(lut_item.LUTDescriptor[2])
            # A VOI LUT is indexed by integer values: round the modality output first.
            lut_out = np.asarray(apply_voi(np.round(values).astype(np.int64), ds, index=0), dtype=np.float64)
            display = np.clip(lut_out / float(2**bits - 1), 0.0, 1.0)
            tags["voi"] = "lut"
            tags["VOILUTDescriptor"] = [int(v) for v in lut_item.LUTDescriptor]
        except Exception:  # noqa: BLE001 - a broken LUT falls through to the window
            display = None
            tags["voi_lut_error"] = "the VOI LUT Sequence could not be applied"
    if display is None and "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
            if not (math.isfinite(center) and math.isfinite(width)):
                raise ValueError("non-finite window")
            function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
            if center + width / 2 < values.min() or center - width / 2 > values.max():
                # A window that misses every stored value gives a blank image (seen in real files).
                raise ValueError("window outside the data")
            display = _dicom_window(values, center, width, function)
            n_windows = len(ds.WindowCenter) if type(ds.WindowCenter).__name__ == "MultiValue" else 1
            tags.update(voi="window", WindowCenter=center, WindowWidth=width, VOILUTFunction=function, windows_in_file=n_windows)
        except (ValueError, TypeError, ZeroDivisionError):
            display = None
            tags["window_error"] = "WindowCenter/WindowWidth invalid or outside the pixel data; min-max used"
    if display is None:
        lo, hi = float(values.min()), float(values.max())
        display = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
        tags["voi"] = "minmax"
    if photometric == "MONOCHROME1":
        display = 1.0 - display
    gray = np.round(display * 255.0).astype(np.uint8)
    meta = ImageMeta("dicom", tags["BitsStored"] or 8, cols, rows, samples, dicom=tags)
    return LoadedImage(gray, meta)


# --------------------------------------------------------------------------- harmonize


def harmonized_size(width: int, height: int, contract: Contract) -> tuple[int, int]:
    """(width, height) of the harmonized image for an original of this size."""
    long_side = max(width, height)
    if long_side <= contract.max_side:
        return width, height
    scale = contract.max_side / long_side
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_uint8(gray: np.ndarray) -> np.ndarray:
    """8-bit data passes through; wider data is min..max stretched (`Contract.high_bit_rule`)."""
    if gray.dtype == np.uint8:
        return gray
    lo, hi = float(gray.min()), float(gray.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return np.zeros(gray.shape, np.uint8)
    scaled = (gray.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def harmonize(gray: np.ndarray, contract: Contract | None = None) -> np.ndarray:
    """The 3-channel uint8 image a model sees, from `load_image`'s grayscale.

    Downscale to the contract's long side (area interpolation, aspect kept),
    bring high-bit data to 8 bits, CLAHE, then gray -> RGB (three equal channels).
    """
    contract = contract or Contract()
    if gray.ndim != 2:
        raise ValueError(f"harmonize expects a 2-D grayscale array, got shape {gray.shape}")
    height, width = gray.shape
    new_w, new_h = harmonized_size(width, height, contract)
    if (new_w, new_h) != (width, height):
        # Resize before the 8-bit mapping: cheaper, and area averaging keeps the precision.
        gray = cv2.resize(gray, (new_w, new_h), interpolation=cv2.INTER_AREA)
    gray = to_uint8(gray)
    if contract.clahe_clip > 0:
        clahe = cv2.createCLAHE(clipLimit=float(contract.clahe_clip), tileGridSize=(contract.clahe_grid, contract.clahe_grid))
        gray = clahe.apply(gray)
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)


def scale_boxes_to_original(boxes: np.ndarray, harmonized_wh: tuple[int, int], original_wh: tuple[int, int]) -> np.ndarray:
    """Map xyxy boxes on the harmonized image back to original pixels (clipped to the image)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    sx = original_wh[0] / harmonized_wh[0]
    sy = original_wh[1] / harmonized_wh[1]
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]] * sx, 0, original_wh[0])
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]] * sy, 0, original_wh[1])
    return boxes


def scale_boxes_to_harmonized(boxes: np.ndarray, original_wh: tuple[int, int], harmonized_wh: tuple[int, int]) -> np.ndarray:
    """The inverse of `scale_boxes_to_original` (for drawing or for training targets)."""
    return scale_boxes_to_original(boxes, original_wh, harmonized_wh)


# --------------------------------------------------------------------------- detections


@dataclass
class Detection:
    """One finding: box ``xyxy`` in original-image pixels, score in [0, 1]."""

    xyxy: tuple[float, float, float, float]
    score: float
    label: str = "fracture"
    model: str = ""
    hints: dict[str, Any] | None = None

    def __post_init__(self):
        box = tuple(float(v) for v in self.xyxy)
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            raise ValueError(f"xyxy must be 4 finite numbers, got {self.xyxy!r}")
        if box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"xyxy must have x2 >= x1 and y2 >= y1, got {box}")
        self.xyxy = box
        self.score = float(self.score)
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score must lie in [0, 1], got {self.score}")

    def to_dict(self) -> dict[str, Any]:
        out = {"xyxy": [round(v, 2) for v in self.xyxy], "score": round(self.score, 5), "label": self.label, "model": self.model}
        if self.hints is not None:
            out["hints"] = self.hints
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Detection:
        if not isinstance(data, dict) or "xyxy" not in data or "score" not in data:
            raise ValueError(f"a detection needs 'xyxy' and 'score', got {data!r}")
        return cls(
            xyxy=tuple(data["xyxy"]),
            score=data["score"],
            label=str(data.get("label", "fracture")),
            model=str(data.get("model", "")),
            hints=data.get("hints"),
        )


def guess_type_and_severity(detection: Detection, image_size: tuple[int, int]) -> dict[str, Any]:
    """Rule-based hints from the box alone. Always a best guess, never a diagnosis.

    A box says nothing certain about fracture type or severity; these rules only
    turn its shape, relative size and score into words a reader can check.

    ========================  =======================================  ==================================
    measure                   rule                                     hint
    ========================  =======================================  ==================================
    aspect = long/short side  aspect >= 2.5                            type "elongated line (oblique or
                                                                       spiral pattern possible)"
    relative area = box/img   area >= 0.15 (and aspect < 2.5)          type "extensive region
                                                                       (comminuted pattern possible)"
    otherwise                                                          type "focal (e.g. hairline,
                                                                       buckle or avulsion)"
    severity                  area >= 0.10, or area >= 0.03 and        "possibly severe"
                              score >= 0.70
                              area >= 0.02                             "moderate"
                              otherwise                                "mild or subtle"
    confidence words          score >= 0.70 "high", >= 0.40            "confidence"
                              "moderate", else "low"
    ========================  =======================================  ==================================
    """
    x1, y1, x2, y2 = detection.xyxy
    w, h = max(x2 - x1, 1e-6), max(y2 - y1, 1e-6)
    img_w, img_h = image_size
    aspect = max(w, h) / min(w, h)
    area = (w * h) / max(img_w * img_h, 1)
    if aspect >= 2.5:
        kind = "elongated line (oblique or spiral pattern possible)"
    elif area >= 0.15:
        kind = "extensive region (comminuted pattern possible)"
    else:
        kind = "focal (e.g. hairline, buckle or avulsion)"
    if area >= 0.10 or (area >= 0.03 and detection.score >= 0.70):
        severity = "possibly severe"
    elif area >= 0.02:
        severity = "moderate"
    else:
        severity = "mild or subtle"
    confidence = "high" if detection.score >= 0.70 else "moderate" if detection.score >= 0.40 else "low"
    return {
        "type": kind,
        "severity": severity,
        "confidence": confidence,
        "aspect_ratio": round(aspect, 2),
        "relative_area": round(area, 4),
        "best_guess": True,
        "note": "Best guess from the box's shape, size and score only; not a diagnosis.",
    }


# --------------------------------------------------------------------------- modes and model cards

MODES = ("screening", "balanced", "specific")
# Used only when a model has no card: deliberately generic, documented, and reported
# as "fallback" wherever a threshold is shown.
FALLBACK_THRESHOLDS = {"screening": 0.10, "balanced": 0.25, "specific": 0.50}


@dataclass(frozen=True)
class BoxRule:
    """One box per finding: what is done to a model's boxes (all classes together, highest score first) before
    anyone sees them. Chosen on the validation split (`evaluate.py --box-rule choose`) and kept in the model card
    under "box_rule", so every backend, the service and the evaluation apply the same rule.

    - `nms_iou`: a box whose IoU with a kept, higher-scoring box exceeds this goes (class-agnostic NMS);
    - `contained`: a box with at least this fraction of its area inside a kept, higher-scoring box goes;
    - `max_boxes`: at most this many boxes per image, the highest-scoring.

    Every step only looks at higher-scoring boxes, so applying the rule and then a score threshold gives the same
    boxes as thresholding first: evaluation at score >= 0.001 and prediction at a mode's threshold agree.
    """

    nms_iou: float | None = None
    contained: float | None = None
    max_boxes: int | None = None

    def __post_init__(self):
        for name in ("nms_iou", "contained"):
            value = getattr(self, name)
            if value is not None and not 0.0 < float(value) <= 1.0:
                raise ValueError(f"box rule: {name} must lie in (0, 1], got {value}")
        if self.max_boxes is not None and int(self.max_boxes) < 1:
            raise ValueError(f"box rule: max_boxes must be >= 1, got {self.max_boxes}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> BoxRule:
        data = dict(data or {})
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"box rule: unknown key(s) {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        parts = [f"NMS IoU {self.nms_iou}" if self.nms_iou else "", f"contained {self.contained}" if self.contained else "",
                 f"at most {self.max_boxes}" if self.max_boxes else ""]
        return ", ".join(p for p in parts if p) or "none"

    def keep(self, boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Indices of the boxes (xyxy) that stay, highest score first."""
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
        if not (self.nms_iou or self.contained):
            return order[: self.max_boxes]
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
        kept: list[int] = []
        for i in order:
            if self.max_boxes and len(kept) >= self.max_boxes:
                break
            if kept:
                k = np.array(kept)
                iw = np.clip(np.minimum(boxes[k, 2], boxes[i, 2]) - np.maximum(boxes[k, 0], boxes[i, 0]), 0, None)
                ih = np.clip(np.minimum(boxes[k, 3], boxes[i, 3]) - np.maximum(boxes[k, 1], boxes[i, 1]), 0, None)
                inter = iw * ih
                with np.errstate(invalid="ignore", divide="ignore"):
                    if self.nms_iou and np.any(inter / (area[k] + area[i] - inter) > self.nms_iou):
                        continue
                    if self.contained and area[i] > 0 and np.any(inter / area[i] >= self.contained):
                        continue
            kept.append(int(i))
        return np.array(kept, dtype=np.int64)

    def apply(self, detections: list[Detection]) -> list[Detection]:
        if not detections or self == BoxRule():
            return sorted(detections, key=lambda d: d.score, reverse=True)
        idx = self.keep(np.array([d.xyxy for d in detections]), np.array([d.score for d in detections]))
        return [detections[i] for i in idx]


def card_path_for(weights: str | Path) -> Path:
    """The model card that belongs to a weights file: same folder and stem, `.json`."""
    weights = Path(weights)
    return weights.with_suffix(".json")


def load_model_card(weights: str | Path | None) -> dict[str, Any] | None:
    """The weights' model card as a dict, or None when there is none."""
    if weights is None:
        return None
    path = card_path_for(weights)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"model card {path} is not valid JSON: {err}") from None
    if not isinstance(card, dict):
        raise ValueError(f"model card {path} must hold a JSON object")
    return card


def resolve_threshold(mode: str, card: dict[str, Any] | None = None, conf: float | None = None) -> tuple[float, str]:
    """(threshold, where it came from) for an operating mode.

    ``conf`` overrides the mode. Otherwise the model card's
    ``thresholds[mode]`` (chosen on the validation split), else
    `FALLBACK_THRESHOLDS`. An unknown mode is an error, never a silent default.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if conf is not None:
        conf = float(conf)
        if not 0.0 <= conf <= 1.0:
            raise ValueError(f"conf must lie in [0, 1], got {conf}")
        return conf, "conf"
    thresholds = (card or {}).get("thresholds") or {}
    if mode in thresholds:
        entry = thresholds[mode]
        return float(entry["threshold"] if isinstance(entry, dict) else entry), "model_card"
    return FALLBACK_THRESHOLDS[mode], "fallback"


def default_weights() -> Path:
    """The bundled default model; a clear error when it is missing."""
    for suffix in (".onnx", ".pt"):
        path = WEIGHTS_DIR / f"{DEFAULT_MODEL_NAME}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no bundled model found at {display_path(WEIGHTS_DIR / DEFAULT_MODEL_NAME)}.onnx (or .pt); "
        "pass --weights PATH to a trained model (e.g. runs/<name>/weights/best.pt from train.py)"
    )


def display_path(path: Path | str) -> str:
    """A path relative to the repository when inside it: cards, reports and messages never carry this machine's layout."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def set_threads(threads: int) -> None:
    """Cap torch, OpenMP/MKL and the ONNX backend's new sessions (`BONE_R_ORT_THREADS`) at `threads` CPU threads.

    Call before models load. On a small shared CPU, more threads than idle cores make every OpenMP op wait for
    the busiest core (10-30x slower next to a training run), so long jobs take a --threads option.
    """
    import contextlib
    import os

    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "BONE_R_ORT_THREADS"):
        os.environ[key] = str(threads)
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # inter-op pools can only be sized before first use
        torch.set_num_interop_threads(max(1, min(threads, 2)))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- prediction


@dataclass
class Prediction:
    """What one image produced: the record every output format is written from."""

    image: str
    width: int
    height: int
    mode: str
    threshold: float
    threshold_source: str
    detections: list[Detection]
    timings_ms: dict[str, float]
    meta: ImageMeta | None = None

    @property
    def fracture_detected(self) -> bool:
        return any(d.score >= self.threshold for d in self.detections)

    def to_record(self) -> dict[str, Any]:
        """The `inference.py --json` entry that `evaluate.py --predictions` reads."""
        return {
            "image": self.image,
            "image_size": [self.width, self.height],
            "fracture_detected": self.fracture_detected,
            "mode": self.mode,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "detections": [d.to_dict() for d in self.detections],
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
        }


class Predictor:
    """A detector plus its contract and thresholds: the one prediction path.

    `weights` defaults to the bundled model. The contract and the thresholds
    come from the weights' model card, so prediction sees what training saw;
    without a card the documented defaults are used (and reported as such).
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        backend: str | None = None,
        device: str = "cpu",
        contract: Contract | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        detector: Any = None,
        card: dict[str, Any] | None = None,
    ):
        self.max_pixels = max_pixels
        if detector is not None:  # injected (tests, the ensemble)
            self.weights = Path(weights) if weights else None
            self.card = card
            self.detector = detector
        else:
            from models import build_detector, infer_backend

            self.weights = Path(weights) if weights else default_weights()
            if not self.weights.is_file():
                raise FileNotFoundError(f"weights not found: {self.weights}")
            self.card = card if card is not None else load_model_card(self.weights)
            name = backend or infer_backend(self.weights, self.card)
            imgsz = (self.card or {}).get("imgsz")
            kwargs = {"device": device}
            if imgsz:
                kwargs["imgsz"] = int(imgsz)
            self.detector = build_detector(name, self.weights, **kwargs)
        card_contract = (self.card or {}).get("contract")
        if contract is not None:
            self.contract = contract
        elif card_contract:
            self.contract = Contract.from_dict(card_contract)
        else:
            self.contract = Contract()
        self.box_rule = BoxRule.from_dict((self.card or {}).get("box_rule"))

    @property
    def name(self) -> str:
        return getattr(self.detector, "name", "detector")

    def threshold(self, mode: str = "balanced", conf: float | None = None) -> tuple[float, str]:
        return resolve_threshold(mode, self.card, conf)

    def predict_loaded(
        self, loaded: LoadedImage, image: str = "", mode: str = "balanced", conf: float | None = None,
        min_score: float | None = None, hints: bool = True, timings: dict[str, float] | None = None,
        contract: Contract | None = None,
    ) -> Prediction:
        """Predict on an already decoded image. `min_score` keeps lower boxes (evaluation uses 0.001);
        `contract` replaces the model's for this call (evaluation of an already harmonized tree)."""
        threshold, source = self.threshold(mode, conf)
        keep = threshold if min_score is None else min(min_score, threshold)
        timings = dict(timings or {})
        t0 = time.perf_counter()
        rgb = harmonize(loaded.pixels, contract or self.contract)
        t1 = time.perf_counter()
        raw = self.detector.predict(rgb, keep)
        t2 = time.perf_counter()
        meta = loaded.meta
        harmonized_wh = (rgb.shape[1], rgb.shape[0])
        detections = []
        if raw:
            boxes = scale_boxes_to_original(np.array([d.xyxy for d in raw]), harmonized_wh, meta.size)
            for det, box in zip(raw, boxes):
                if det.score < keep:
                    continue
                out = Detection(tuple(box), det.score, det.label, det.model or self.name)
                if hints:
                    out.hints = guess_type_and_severity(out, meta.size)
                detections.append(out)
        detections = self.box_rule.apply(detections)
        t3 = time.perf_counter()
        timings.update(harmonize_ms=(t1 - t0) * 1e3, model_ms=(t2 - t1) * 1e3, post_ms=(t3 - t2) * 1e3)
        return Prediction(image, meta.width, meta.height, mode, threshold, source, detections, timings, meta)

    def predict(self, source: str | Path | bytes, mode: str = "balanced", conf: float | None = None, **kw: Any) -> Prediction:
        """Decode, harmonize, detect, and map boxes back to original pixels."""
        t0 = time.perf_counter()
        loaded = load_image(source, max_pixels=self.max_pixels)
        decode_ms = (time.perf_counter() - t0) * 1e3
        name = "" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
        return self.predict_loaded(loaded, name, mode, conf, timings={"decode_ms": decode_ms}, **kw)


# --------------------------------------------------------------------------- drawing

# One palette for every overlay (Okabe-Ito, colour-blind safe), RGB.
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0), (204, 121, 167)]


def display_image(gray: np.ndarray) -> np.ndarray:
    """An RGB uint8 view of `load_image`'s grayscale for drawing on (no CLAHE)."""
    return cv2.cvtColor(to_uint8(gray), cv2.COLOR_GRAY2RGB)


def _hint_words(hints: dict[str, Any]) -> str:
    """A short best-guess line from `guess_type_and_severity`'s hints, e.g. "focal, mild or subtle (best guess)"."""
    kind = str(hints.get("type", "")).split(" (")[0]
    words = ", ".join(str(p) for p in (kind, hints.get("severity", "")) if p)
    return f"{words} (best guess)" if words else "best guess"


def draw_overlay(
    rgb: np.ndarray,
    detections: list[Detection],
    *,
    colors: dict[str, tuple[int, int, int]] | None = None,
    show_hints: bool = True,
    title: str | None = None,
    legend: list[str] | None = None,
) -> np.ndarray:
    """Boxes, scores and best-guess hints on a copy of `rgb`, with a legend and the disclaimer band.

    Boxes are in the image's pixels. Each model gets its own colour from `PALETTE`
    (or `colors`), in order of first appearance, and a legend entry; `legend` lists
    models to show (in that order) even when they have no box on this image. Labels
    sit on a dark plate above the box (else below or inside it) and are moved so
    that they never cover each other or the legend. The band added at the bottom
    says that this is a research tool, not a diagnosis.
    """
    canvas = np.ascontiguousarray(rgb.copy())
    if canvas.ndim == 2:
        canvas = cv2.cvtColor(canvas, cv2.COLOR_GRAY2RGB)
    h, w = canvas.shape[:2]
    unit = max(1.0, max(h, w) / 800.0)  # line and text scale for large radiographs
    thick = max(1, round(2 * unit))
    text_thick = max(1, round(unit))
    font = cv2.FONT_HERSHEY_SIMPLEX
    fscale = 0.5 * unit
    pad = max(2, round(3 * unit))
    models = list(dict.fromkeys([*(legend or []), *(d.model or "model" for d in detections)]))
    colors = dict(colors or {})
    for i, name in enumerate(models):
        colors.setdefault(name, PALETTE[i % len(PALETTE)])
    placed: list[tuple[int, int, int, int]] = []  # x1, y1, x2, y2 of every label plate and the legend

    def fitted(s: str, scale: float, width: float) -> tuple[float, int, int, int]:
        """The scale at which `s` fits `width` (never above `scale`), and the text's width, height, baseline."""
        (tw, th), base = cv2.getTextSize(s, font, scale, text_thick)
        if tw > width > 0:
            scale *= width / tw
            (tw, th), base = cv2.getTextSize(s, font, scale, text_thick)
        return scale, tw, th, base

    def plate(lines: list[tuple[str, tuple[int, int, int], float]], x: int, y: int) -> None:
        """Darken a plate under `lines` (text, colour, scale) with its top-left at (x, y), then write them."""
        sizes = [fitted(s, scale, w - 2 * pad) for s, _, scale in lines]
        bw = max(tw for _, tw, _, _ in sizes) + 2 * pad
        bh = sum(th + base + pad for _, _, th, base in sizes) + pad
        region = canvas[max(0, y):min(h, y + bh), max(0, x):min(w, x + bw)]
        region[:] = (region.astype(np.float32) * 0.3).astype(np.uint8)
        ty = y + pad
        for (s, color, _), (scale, _, th, base) in zip(lines, sizes):
            ty += th
            cv2.putText(canvas, s, (x + pad, ty), font, scale, color, text_thick, cv2.LINE_AA)
            ty += base + pad

    def plate_size(lines: list[tuple[str, tuple[int, int, int], float]]) -> tuple[int, int]:
        sizes = [fitted(s, scale, w - 2 * pad) for s, _, scale in lines]
        return max(tw for _, tw, _, _ in sizes) + 2 * pad, sum(th + base + pad for _, _, th, base in sizes) + pad

    def free(r: tuple[int, int, int, int]) -> bool:
        return not any(r[0] < q[2] and q[0] < r[2] and r[1] < q[3] and q[1] < r[3] for q in placed)

    for det in detections:
        x1, y1, x2, y2 = (int(round(v)) for v in det.xyxy)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colors[det.model or "model"], thick)
    # legend: in the corner that covers the least box area
    if models or title:
        entries = [(name, colors[name]) for name in models] + ([(title, (255, 255, 255))] if title else [])
        sizes = [fitted(s, fscale, w - 4 * pad - 12 * unit) for s, _ in entries]
        swatch = max(th for _, _, th, _ in sizes)
        lw = max(tw for _, tw, _, _ in sizes) + swatch + 4 * pad
        lh = sum(th + base + pad for _, _, th, base in sizes) + pad
        lw, lh = min(lw, w), min(lh, h)
        corners = [(0, 0), (w - lw, 0), (0, h - lh), (w - lw, h - lh)]

        def covered(x: int, y: int) -> float:
            return sum(max(0.0, min(x + lw, d.xyxy[2]) - max(x, d.xyxy[0])) * max(0.0, min(y + lh, d.xyxy[3]) - max(y, d.xyxy[1]))
                       for d in detections)

        lx, ly = min(corners, key=lambda c: covered(*c))  # ties: the first, top-left
        region = canvas[ly:ly + lh, lx:lx + lw]
        region[:] = (region.astype(np.float32) * 0.3).astype(np.uint8)
        ty = ly + pad
        for i, ((s, color), (scale, _, th, base)) in enumerate(zip(entries, sizes)):
            ty += th
            is_model = i < len(models)
            if is_model:
                cv2.rectangle(canvas, (lx + pad, ty - th), (lx + pad + swatch, ty), color, -1)
            tx = lx + pad + (swatch + pad if is_model else 0)
            cv2.putText(canvas, s, (tx, ty), font, scale, color if is_model else (255, 255, 255), text_thick, cv2.LINE_AA)
            ty += base + pad
        placed.append((lx, ly, lx + lw, ly + lh))
    # labels, best score first so the strongest finding gets the best place
    for det in sorted(detections, key=lambda d: d.score, reverse=True):
        x1, y1, x2, y2 = (int(round(v)) for v in det.xyxy)
        color = colors[det.model or "model"]
        lines = [(f"{det.label} {det.score:.2f}", color, fscale)]
        if show_hints and det.hints:
            lines.append((_hint_words(det.hints), color, fscale * 0.85))
        bw, bh = plate_size(lines)
        x = max(0, min(x1, w - bw))
        candidates = [y1 - thick - bh, y2 + thick + 1, y1 + thick + 1]
        candidates = [y for y in candidates if 0 <= y <= h - bh] or [max(0, min(y1, h - bh))]
        top = next((y for y in candidates if free((x, y, x + bw, y + bh))), None)
        if top is None:  # slide down (then up) from the preferred place until it is free
            start = candidates[0]
            steps = [start + k * bh // 2 for k in range(1, 2 * h // max(bh, 1) + 2)] + [start - k * bh // 2 for k in range(1, 2 * h // max(bh, 1) + 2)]
            top = next((y for y in steps if 0 <= y <= h - bh and free((x, y, x + bw, y + bh))), start)
        plate(lines, x, top)
        placed.append((x, top, x + bw, top + bh))
    # disclaimer band, bottom
    msg = "Research tool - not a diagnosis" + ("" if detections else " | no finding above threshold")
    scale, _, th, base = fitted(msg, fscale, w - 2 * pad)
    if scale < 0.3:  # too narrow for the whole sentence: the essential part, as large as it fits
        msg = "Not a diagnosis"
        scale, _, th, base = fitted(msg, fscale, w - 2 * pad)
    band_h = max(int(26 * unit), th + base + 2 * pad)
    band = np.full((band_h, w, 3), 40, np.uint8)
    cv2.putText(band, msg, (pad, (band_h + th) // 2 - 1), font, scale, (255, 255, 255), text_thick, cv2.LINE_AA)
    return np.vstack([canvas, band])


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def overlay_for(prediction: Prediction, loaded: LoadedImage, **kw: Any) -> np.ndarray:
    return draw_overlay(display_image(loaded.pixels), prediction.detections, **kw)


# --------------------------------------------------------------------------- CLI


def list_images(folder: Path) -> list[Path]:
    """Images under `folder` (recursively): known suffixes, plus suffix-less DICOM files."""
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(path)
        elif path.suffix == "":
            with open(path, "rb") as fh:
                if sniff_format(fh.read(132)) == "dicom":
                    found.append(path)
    return found


CSV_FIELDS = ["image", "fracture_detected", "mode", "threshold", "n_detections", "max_score", "rank", "x1", "y1", "x2", "y2", "score", "type_hint", "severity_hint", "error"]


def csv_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per detection (one row for an image without any)."""
    base = {
        "image": record["image"],
        "fracture_detected": record.get("fracture_detected", ""),
        "mode": record.get("mode", ""),
        "threshold": record.get("threshold", ""),
        "n_detections": len(record.get("detections", [])),
        "max_score": max((d["score"] for d in record.get("detections", [])), default=""),
        "error": record.get("error", ""),
    }
    dets = record.get("detections", [])
    if not dets:
        return [base]
    rows = []
    for rank, det in enumerate(dets, 1):
        hints = det.get("hints") or {}
        x1, y1, x2, y2 = det["xyxy"]
        rows.append(base | {"rank": rank, "x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": det["score"],
                            "type_hint": hints.get("type", ""), "severity_hint": hints.get("severity", "")})
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Find and localize fractures on radiographs (research tool, not a diagnosis).",
    )
    p.add_argument("--image", required=True, type=Path, help="an image (PNG/JPEG/TIFF/BMP/DICOM) or a folder of them")
    p.add_argument("--weights", type=Path, default=None, help="model weights (default: the bundled model in weights/)")
    p.add_argument("--backend", default=None, help="detector backend (default: from the model card or file type)")
    p.add_argument("--mode", default="balanced", choices=MODES, help="operating point (thresholds from the model card)")
    p.add_argument("--conf", type=float, default=None, help="score threshold in [0, 1], overriding --mode")
    p.add_argument("--out", type=Path, default=None, help="overlay PNG (a folder when --image is a folder)")
    p.add_argument("--json", type=Path, default=None, help="write the prediction(s) as JSON")
    p.add_argument("--csv", type=Path, default=None, help="write a flat table, one row per detection")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse images with more pixels")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.conf is not None and not 0 <= args.conf <= 1:
        print(f"error: --conf must lie in [0, 1], got {args.conf}", file=sys.stderr)
        return 2
    if not args.image.exists():
        print(f"error: {args.image} does not exist", file=sys.stderr)
        return 2
    folder = args.image.is_dir()
    images = list_images(args.image) if folder else [args.image]
    if not images:
        print(f"error: no images found in {args.image}", file=sys.stderr)
        return 2
    try:
        predictor = Predictor(args.weights, args.backend, args.device, max_pixels=args.max_pixels)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if folder and args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    records, failures = [], 0
    progress = images
    if folder:
        from tqdm import tqdm

        progress = tqdm(images, desc="predict", unit="img")
    for path in progress:
        try:
            t0 = time.perf_counter()
            loaded = load_image(path, max_pixels=args.max_pixels)
            decode_ms = (time.perf_counter() - t0) * 1e3
            pred = predictor.predict_loaded(loaded, str(path), args.mode, args.conf, timings={"decode_ms": decode_ms})
        except ImageDecodeError as err:
            failures += 1
            records.append({"image": str(path), "error": str(err)})
            print(f"error: {path}: {err}", file=sys.stderr)
            continue
        records.append(pred.to_record())
        if args.out:
            out = args.out / f"{path.stem}.png" if folder else args.out
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(encode_png(overlay_for(pred, loaded)))
        if not folder:
            verdict = "FRACTURE SUSPECTED" if pred.fracture_detected else "no fracture found"
            print(f"{path}: {verdict} ({len(pred.detections)} box(es) >= {pred.threshold:.3f}, mode {args.mode}, "
                  f"threshold from {pred.threshold_source})")
            for det in pred.detections:
                print(f"  {det.label} {det.score:.3f} at {[round(v) for v in det.xyxy]}  "
                      f"[{det.hints['type']}, {det.hints['severity']} - best guess]")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = records if folder else records[0]
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for rec in records:
                writer.writerows(csv_rows(rec))
    if folder:
        positives = sum(1 for r in records if r.get("fracture_detected"))
        print(f"{len(records) - failures} image(s) predicted, {positives} with a suspected fracture, {failures} failed")
    print(DISCLAIMER)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
