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
import errno
import hashlib
import io
import json
import math
import re
import stat
import sys
import time
import zlib
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
    ``too_many_pixels`` and ``over_budget`` to 413 and everything else to 400/415):
    ``empty``, ``unsupported`` (not an image format we read), ``corrupt``
    (looks like a known format but cannot be decoded), ``too_many_pixels``
    (refused before decoding), ``over_budget`` (decoding would cost more memory
    or time than allowed; refused before decoding) and ``unsupported_compression``
    (a DICOM transfer syntax no installed decoder handles).
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


# What one image's decode may cost, checked from its header before any pixel is decoded (see `_check_memory`).
DEFAULT_MAX_MEMORY = 800 * 10**6
# Later stages a caller runs at the original size cost this much per pixel on top: the service's overlay
# (display_image + draw_overlay + encode_png; measured 13.3 B/px on a 16-bit gray image).
OVERLAY_BYTES_PER_PIXEL = 14
# Each progressive-JPEG scan re-walks every block (~2 ms per 4 MP scan): 10,000 tiny scans decoded for
# minutes. libjpeg's own progressive scripts use 6 (gray) to 10 (colour) scans.
MAX_JPEG_SCANS = 64
# Deflated DICOM (rare for images) is inflated at most this far: a 2 MB bomb inflates to 2 GB.
MAX_INFLATED_DICOM = 64 * 10**6
# pydicom reads (about one per element or sequence item) allowed for one file; a radiograph needs a few thousand.
MAX_DICOM_READS = 50_000
# A LUT sequence we parse holds a few LUTs of at most 65,536 16-bit entries; parsing costs ~30 bytes per byte.
MAX_LUT_SEQUENCE_BYTES = 10**6


def load_image(
    source: str | Path | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_memory: int = DEFAULT_MAX_MEMORY,
    extra_bytes_per_pixel: float = 0.0,
) -> LoadedImage:
    """Decode a radiograph from a path or bytes into a 2-D grayscale array.

    PNG, JPEG, TIFF and BMP (8 or 16 bit, gray or colour) and DICOM (recognized
    by its ``DICM`` preamble, whatever the file is called). Before anything is
    decoded, the header is checked against `max_pixels` and the memory the decode
    would need against `max_memory` (bytes; `extra_bytes_per_pixel` is what the
    caller will spend per original pixel afterwards, e.g. `OVERLAY_BYTES_PER_PIXEL`),
    and a progressive JPEG's scans against `MAX_JPEG_SCANS`. Only the first frame
    of a DICOM file is decoded. Colour becomes gray.
    A JPEG that ends early is completed with an end-of-image marker and
    decoded (``meta.repaired``). DICOM goes through the contract's display rule
    (see `Contract`) and comes back as uint8.

    Raises `ImageDecodeError` for every failure.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        data = _read_file(Path(source), max_memory)
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
            return _load_dicom(data, max_pixels, max_memory, extra_bytes_per_pixel)
        except ImageDecodeError:
            raise
        except Exception as err:  # noqa: BLE001 - pydicom parses lazily: a malformed element raises wherever it is read
            raise ImageDecodeError(f"the DICOM file is malformed ({type(err).__name__})", "corrupt") from None
    return _load_raster(data, fmt, max_pixels, max_memory, extra_bytes_per_pixel)


def _read_file(path: Path, max_memory: int) -> bytes:
    """The file's bytes; a FIFO or device is never opened (reading one blocks), a file over the budget never read."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ImageDecodeError(f"cannot read {path}: not a regular file", "unsupported")
        if info.st_size > max_memory:
            raise ImageDecodeError(f"{path} is {info.st_size / 1e6:.0f} MB, over the decode memory limit of "
                                   f"{max_memory / 1e6:.0f} MB", "over_budget")
        return path.read_bytes()
    except OSError as err:
        raise ImageDecodeError(f"cannot read {path}: {err.strerror or err}", "unsupported") from None


def _check_pixels(width: int, height: int, max_pixels: int, what: str = "image") -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"the {what} header declares an empty size {width}x{height}", "corrupt")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"the {what} is {width}x{height} = {width * height / 1e6:.1f} MP, over the limit of "
            f"{max_pixels / 1e6:.1f} MP; it was refused before decoding",
            "too_many_pixels",
        )


def _check_memory(what: str, width: int, height: int, per_pixel: float, held: int, max_memory: int,
                  extra_bytes_per_pixel: float) -> None:
    """Refuse a decode whose estimated peak memory is over `max_memory`, before it starts.

    The estimate is `held` (the file's bytes and the decoder's copies of them) plus, per pixel, the decode's
    working arrays (`per_pixel`, measured per format) and the caller's later stages. A decompression bomb
    is small on the wire but large here, whatever its ratio.
    """
    need = held + width * height * (per_pixel + extra_bytes_per_pixel)
    if need > max_memory:
        raise ImageDecodeError(
            f"decoding this {what} ({width}x{height}) would need about {need / 1e6:,.0f} MB of memory, over the limit "
            f"of {max_memory / 1e6:,.0f} MB; it was refused before decoding",
            "over_budget",
        )


# Start-of-frame markers (not DHT 0xC4, JPG 0xC8, DAC 0xCC), with JPEG-LS's 0xF7; the progressive ones
_SOF_MARKERS = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7}
_PROGRESSIVE_SOF = {0xC2, 0xC6, 0xCA, 0xCE}


_JPEG_FILL = re.compile(rb"\xff+")  # fill bytes before a marker
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # the end of a scan's data: 0xFF not stuffed, not a restart
_MAX_JPEG_SEGMENTS = 10_000  # a JPEG has tens; millions of empty segments would keep this walk busy


def _jpeg_header(data: bytes) -> tuple[int, int, int, int, bool]:
    """(width, height, components, scans, progressive) of a JPEG (or JPEG-LS) stream, from its markers alone.

    Each scan's entropy-coded data is skipped to the next marker (inside it 0xFF is always followed
    by 0x00 or a restart marker), so the scan count is exact. A stream that ends early just ends the walk.
    """
    width = height = components = scans = segments = 0
    progressive = False
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:  # extraneous bytes before a marker: libjpeg skips them with a warning
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
        pos = _JPEG_FILL.match(data, pos).end() - 1
        marker = data[pos + 1] if pos + 1 < end else 0xD9
        if marker == 0xD9:  # end of image
            break
        segments += 1
        if segments > _MAX_JPEG_SEGMENTS:
            raise ImageDecodeError(f"the JPEG has more than {_MAX_JPEG_SEGMENTS:,} marker segments; it was refused",
                                   "over_budget")
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        if marker in _SOF_MARKERS and pos + 10 <= end:
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            components = data[pos + 9]
            progressive = marker in _PROGRESSIVE_SOF
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            scans += 1
            found = _JPEG_MARKER.search(data, pos)
            pos = found.start() if found else end
    return width, height, components, scans, progressive


def _check_jpeg_scans(scans: int, what: str = "JPEG") -> None:
    if scans > MAX_JPEG_SCANS:
        raise ImageDecodeError(
            f"the {what} has {scans} progressive scans (at most {MAX_JPEG_SCANS} are read; each one re-decodes the "
            "whole image); it was refused before decoding",
            "over_budget",
        )


def _raster_header(data: bytes, fmt: str) -> tuple[int, int, float]:
    """Width, height and the decode's peak working bytes per pixel, from the header alone: no pixel data is read.

    The format's PIL plugin is used directly (not `Image.open`) so that our own
    pixel limit, not PIL's global one, decides what is too large.
    """
    from PIL import BmpImagePlugin, JpegImagePlugin, PngImagePlugin, TiffImagePlugin

    plugin = {"png": PngImagePlugin.PngImageFile, "jpeg": JpegImagePlugin.JpegImageFile,
              "tiff": TiffImagePlugin.TiffImageFile, "bmp": BmpImagePlugin.BmpImageFile}[fmt]
    try:
        with plugin(io.BytesIO(data)) as im:
            width, height = im.size
            coefficients = 0
            if fmt == "png":  # IHDR: bit depth, colour type; palette and gray+alpha come back as BGR(A)
                channels, sample = {0: 1, 2: 3}.get(data[25], 4), 2 if data[24] == 16 else 1
            elif fmt == "tiff":
                bits = im.tag_v2.get(258, 8)
                bits = max(bits) if isinstance(bits, tuple) else bits
                channels, sample = int(im.tag_v2.get(277, 1)), max(1, -(-int(bits) // 8))
            elif fmt == "jpeg":
                *_, components, scans, progressive = _jpeg_header(data)
                _check_jpeg_scans(scans)
                channels, sample = (1 if components == 1 else 3), 1
                coefficients = 2 * components if progressive else 0  # libjpeg keeps every DCT coefficient (int16)
            else:  # bmp
                channels, sample = 4, 1
    except ImageDecodeError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad headers
        raise ImageDecodeError(f"the {fmt.upper()} header is unreadable ({type(err).__name__})", "corrupt") from None
    decoded = channels * sample
    gray = (sample if sample in (1, 2) else 4) if channels > 1 or sample not in (1, 2) else 0
    # Measured: OpenCV holds the decoded image twice while decoding, then the gray copy sits beside it.
    return width, height, max(2 * decoded + coefficients, decoded + gray) + 1


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


def _load_raster(data: bytes, fmt: str, max_pixels: int, max_memory: int, extra_bytes_per_pixel: float) -> LoadedImage:
    width, height, per_pixel = _raster_header(data, fmt)
    _check_pixels(width, height, max_pixels)
    _check_memory(f"{fmt.upper()} image", width, height, per_pixel, 2 * len(data), max_memory, extra_bytes_per_pixel)
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
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1] (LINEAR, LINEAR_EXACT, SIGMOID), in place on `values` (float64).

    In place because the float64 copies are most of what a large DICOM costs; the arithmetic and its order are
    those of the formulas, so the result is the same to the bit. Invalid widths raise before anything changes.
    """
    if function in ("SIGMOID", "LINEAR_EXACT"):
        if not width > 0:  # both require width > 0: 0 binarised the image (and gave NaN for SIGMOID)
            raise ValueError("window width must be above 0")
    elif width < 1:  # LINEAR requires width >= 1
        raise ValueError("window width below 1")
    if function == "SIGMOID":  # 1 / (1 + exp(-4 (x - c) / w))
        values -= center
        values *= -4.0
        values /= width
        np.exp(values, out=values)
        values += 1.0
        return np.divide(1.0, values, out=values)
    if function == "LINEAR_EXACT":  # (x - c) / w + 0.5
        values -= center
        values /= width
    else:  # (x - (c - 0.5)) / (w - 1) + 0.5
        values -= center - 0.5
        values /= width - 1
    values += 0.5
    return np.clip(values, 0.0, 1.0, out=values)


def _first(value: Any) -> float:
    """The first of a multi-valued DICOM number (the default per PS3.3), as float."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return float(value[0])
    return float(value)


# The only elements pydicom parses (besides the file meta): a file of millions of tiny elements otherwise costs
# seconds and ~250 bytes each, and patient data is never read at all.
_DICOM_TAGS = [
    "SpecificCharacterSet", "Modality", "BodyPartExamined", "SamplesPerPixel", "PhotometricInterpretation",
    "NumberOfFrames", "PlanarConfiguration", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "WindowCenter", "WindowWidth", "RescaleIntercept", "RescaleSlope", "RescaleType",
    "VOILUTFunction", "ModalityLUTSequence", "VOILUTSequence", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "PixelData",
]


def _dicom_stream(data: bytes, cap: int) -> tuple[bytes, str | None]:
    """The bytes pydicom should read, and the original transfer syntax when they had to be inflated.

    pydicom inflates a Deflated Explicit VR Little Endian dataset without any limit (and then reads it from
    a buffer of its own). Here it is inflated 1 MB at a time, refused past `cap`, and put behind a file meta
    that says Explicit VR Little Endian, so that the same bounded reading applies to it.
    """
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.filewriter import write_file_meta_info

    fp = io.BytesIO(data)
    read_preamble(fp, False)
    meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                        stop_when=lambda tag, vr, length: tag >> 16 != 2)
    syntax = meta.get("TransferSyntaxUID")
    if syntax != pydicom.uid.DeflatedExplicitVRLittleEndian:
        return data, None
    inflater, parts, total = zlib.decompressobj(-zlib.MAX_WBITS), [], 0
    view = memoryview(data)[fp.tell():]
    for start in range(0, len(view), 1 << 16):
        chunk = view[start : start + (1 << 16)]
        while chunk:
            parts.append(inflater.decompress(chunk, 1 << 20))
            total += len(parts[-1])
            if total > cap:
                raise ImageDecodeError(
                    f"the deflated DICOM file inflates to more than {cap / 1e6:.0f} MB (it is "
                    f"{len(data) / 1e6:.1f} MB on the wire); it was refused", "over_budget")
            chunk = inflater.unconsumed_tail
    file_meta = pydicom.dataset.FileMetaDataset(meta)
    file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_file_meta_info(header, file_meta, enforce_standard=False)
    return data[:132] + header.getvalue() + b"".join(parts), str(syntax)


class _CountedReads(io.BytesIO):
    """A file for pydicom that refuses more than `MAX_DICOM_READS` reads.

    Parsing costs per element, not per byte: millions of tiny elements, or sequence items (which pydicom
    parses even when they are not asked for), cost seconds and ~0.7 kB each. Every element is at least
    one read, so counting reads bounds both.
    """

    def __init__(self, data: bytes):
        super().__init__(data)
        self.reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        if self.reads > MAX_DICOM_READS:
            raise ImageDecodeError(f"the DICOM file has more than {MAX_DICOM_READS:,} elements or items to parse; "
                                   "it was refused", "over_budget")
        return super().read(size)


def _first_fragment(pixel_data: bytes) -> bytes:
    """The first fragment of encapsulated pixel data (after the Basic Offset Table item)."""
    from pydicom.encaps import generate_fragments

    fragments = generate_fragments(pixel_data)
    next(fragments, None)  # the Basic Offset Table
    return next(fragments, b"")


def _j2k_header(fragment: bytes) -> tuple[int, int, int]:
    """(width, height, components) from a JPEG 2000 codestream's SIZ marker (a JP2 wrapper is walked to its jp2c box)."""
    pos = 0
    if fragment[4:12] == b"jP  \r\n\x87\n":  # JP2 file format: boxes of length, type
        while pos + 8 <= len(fragment) and fragment[pos + 4 : pos + 8] != b"jp2c":
            size = int.from_bytes(fragment[pos : pos + 4], "big")
            if size == 1:
                size = int.from_bytes(fragment[pos + 8 : pos + 16], "big")
            if size < 8:
                break
            pos += size
        pos += 8
    if fragment[pos : pos + 4] != b"\xff\x4f\xff\x51" or len(fragment) < pos + 42:
        raise ImageDecodeError("the DICOM JPEG 2000 frame does not start with a codestream header (SIZ)", "corrupt")
    xsiz, ysiz, x0, y0 = (int.from_bytes(fragment[pos + 8 + 4 * i : pos + 12 + 4 * i], "big") for i in range(4))
    return xsiz - x0, ysiz - y0, int.from_bytes(fragment[pos + 40 : pos + 42], "big")


def _check_dicom_frame(ds: Any, tsuid: Any, rows: int, cols: int) -> int:
    """Check the first compressed frame's own header against Rows x Columns; the decode's extra bytes per pixel.

    The JPEG and JPEG 2000 decoders allocate what the codestream declares, so a frame larger than its tags
    is refused here, and a progressive JPEG's scans are counted as for a JPEG file.
    """
    import pydicom.uid as uids

    if tsuid in uids.JPEGTransferSyntaxes or tsuid in uids.JPEGLSTransferSyntaxes:
        width, height, components, scans, progressive = _jpeg_header(_first_fragment(ds.PixelData))
        _check_jpeg_scans(scans, "DICOM JPEG frame")
        extra = 2 * components if progressive else 0
    elif tsuid in uids.JPEG2000TransferSyntaxes or str(tsuid).startswith("1.2.840.10008.1.2.4.20"):  # with HTJ2K
        width, height, components = _j2k_header(_first_fragment(ds.PixelData))
        extra = 4 * components  # OpenJPEG decodes into 32-bit planes
    else:
        return 0
    if (width, height) != (cols, rows):
        raise ImageDecodeError(f"the DICOM compressed frame is {width}x{height} but its Columns x Rows say "
                               f"{cols}x{rows}", "corrupt")
    return extra


def _decoder_available(tsuid: Any) -> bool:
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(tsuid).is_available)
    except Exception:  # noqa: BLE001 - pydicom raises NotImplementedError for syntaxes it has no decoder for
        return False


def _load_dicom(data: bytes, max_pixels: int, max_memory: int, extra_bytes_per_pixel: float) -> LoadedImage:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi, pixel_array

    stream, deflated_syntax = _dicom_stream(data, min(MAX_INFLATED_DICOM, max_memory // 2))
    try:
        ds = pydicom.dcmread(_CountedReads(stream), specific_tags=_DICOM_TAGS)
    except ImageDecodeError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ImageDecodeError(f"the DICOM file is unreadable ({type(err).__name__})", "corrupt") from None
    if "PixelData" not in ds:
        raise ImageDecodeError("the DICOM file holds no image (no PixelData)", "corrupt")
    for keyword in ("ModalityLUTSequence", "VOILUTSequence"):
        raw = ds.get_item(keyword)  # still bytes: pydicom parses them on first access, past the read count
        if raw is not None and isinstance(raw.value, bytes) and len(raw.value) > MAX_LUT_SEQUENCE_BYTES:
            raise ImageDecodeError(f"the DICOM {keyword} is {len(raw.value) / 1e6:.1f} MB; a LUT sequence holds "
                                   f"at most {MAX_LUT_SEQUENCE_BYTES / 1e6:.0f} MB", "corrupt")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        sample_bytes = max(1, -(-int(ds.get("BitsAllocated", 16) or 16) // 8))
    except (AttributeError, TypeError, ValueError):
        raise ImageDecodeError("the DICOM file lacks valid Rows/Columns", "corrupt") from None
    _check_pixels(cols, rows, max_pixels, "DICOM image")
    if frames * samples > 64:
        raise ImageDecodeError(f"the DICOM file has {frames} frames x {samples} samples; only radiographs are read", "unsupported")
    file_meta = getattr(ds, "file_meta", None)
    tsuid = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    # Per pixel: the decoded frame twice (decoder output, array), the float64 values, a mask and the uint8 result;
    # colour adds float32 planes, a VOI LUT its int64 indices and float64 output (16-bit gray: 14 here, 12.1 measured).
    per_pixel = (2 * samples * sample_bytes + 10 + (16 if samples > 1 else 0) + (24 if "VOILUTSequence" in ds else 0)
                 + _check_dicom_frame(ds, tsuid, rows, cols))
    # held: the upload, what pydicom read (the inflated copy, when deflated) and pydicom's copy of the pixel data
    held = len(data) + (len(stream) if deflated_syntax else 0) + len(stream)
    _check_memory("DICOM image", cols, rows, per_pixel, held, max_memory, extra_bytes_per_pixel)
    try:
        # Only the first frame: pydicom decodes every frame the data holds, even past NumberOfFrames.
        pixels = pixel_array(ds, index=0)
    except Exception as err:  # noqa: BLE001 - the pixel handlers raise various types
        syntax = f"{tsuid.name} ({tsuid})" if tsuid is not None else "unknown"
        try:
            compressed = tsuid is not None and tsuid.is_compressed
        except ValueError:  # the UID is not a transfer syntax at all
            compressed = False
        if compressed and not _decoder_available(tsuid):
            raise ImageDecodeError(
                f"the DICOM pixel data uses the compressed transfer syntax {syntax}, which no installed "
                "decoder can read (Bone-R installs pylibjpeg for JPEG, JPEG-LS and JPEG 2000; RLE is built in)",
                "unsupported_compression",
            ) from None
        raise ImageDecodeError(f"the DICOM pixel data is corrupt and could not be decoded ({type(err).__name__}, "
                               f"syntax {syntax})", "corrupt") from None
    if pixels.ndim == (4 if samples > 1 else 3):  # a stack after all: keep the first frame
        pixels = pixels[0]
    tags: dict[str, Any] = {
        "TransferSyntaxUID": deflated_syntax or (str(tsuid) if tsuid is not None else None),
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
    del pixels  # from here on one float64 array is worked on in place
    if not values.flags.writeable:
        values = values.copy()
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
            n_windows = len(ds.WindowCenter) if type(ds.WindowCenter).__name__ == "MultiValue" else 1
            display = _dicom_window(values, center, width, function)  # last: it overwrites `values`
            tags.update(voi="window", WindowCenter=center, WindowWidth=width, VOILUTFunction=function, windows_in_file=n_windows)
        except (ValueError, TypeError, ZeroDivisionError):
            display = None
            tags["window_error"] = "WindowCenter/WindowWidth invalid or outside the pixel data; min-max used"
    if display is None:
        lo, hi = float(values.min()), float(values.max())
        values -= lo  # (x - lo) / (hi - lo), in place
        if hi > lo:
            values /= hi - lo
        display = values
        tags["voi"] = "minmax"
    if photometric == "MONOCHROME1":
        np.subtract(1.0, display, out=display)
    display *= 255.0
    gray = np.round(display, out=display).astype(np.uint8)
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

# Boxes are drawn in one place: bone_r.draw (labels outside their box, never over each other; the key and the
# disclaimer band below the image). PALETTE is its colour-blind-safe palette (Okabe-Ito), RGB.
from bone_r import draw as _draw  # noqa: E402

PALETTE = _draw.PALETTE


def display_image(gray: np.ndarray) -> np.ndarray:
    """An RGB uint8 view of `load_image`'s grayscale for drawing on (no CLAHE)."""
    return cv2.cvtColor(to_uint8(gray), cv2.COLOR_GRAY2RGB)


def draw_overlay(
    rgb: np.ndarray,
    detections: list[Detection],
    *,
    colors: dict[str, tuple[int, int, int]] | None = None,
    show_hints: bool = True,
    title: str | None = None,
    legend: list[str] | None = None,
    truth: list[tuple[float, float, float, float]] | None = None,
) -> np.ndarray:
    """Boxes, scores and best-guess hints on a copy of `rgb`; below it the key and the disclaimer band.

    `bone_r.draw.draw_overlay`: each model its own colour (`PALETTE`, or `colors`) and key
    entry (`legend` lists models to show even without a box here); `truth` boxes dashed;
    labels outside the box they name and never over each other, or numbered tags with
    the numbers listed in the key when the boxes are crowded. As wide as the image.
    """
    return _draw.draw_overlay(rgb, detections, colors=colors, show_hints=show_hints, title=title, legend=legend, truth=truth)


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def overlay_for(prediction: Prediction, loaded: LoadedImage, **kw: Any) -> np.ndarray:
    return draw_overlay(display_image(loaded.pixels), prediction.detections, **kw)


# --------------------------------------------------------------------------- CLI


def scan_folder(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Images under `folder` (recursively: known suffixes, plus suffix-less DICOM files), and the entries that
    could not be looked at, each with the reason: dangling or looping links, FIFOs, sockets and devices (never
    opened: reading a FIFO blocks), unreadable suffix-less files. Hidden files and directories' links are left out."""
    found: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for path in sorted(folder.rglob("*")):
        if path.name.startswith("."):
            continue
        try:
            mode = path.stat().st_mode  # follows links
        except OSError as err:
            if err.errno == errno.ELOOP:
                skipped.append((path, "a symbolic link that loops"))
            else:
                skipped.append((path, "a dangling symbolic link" if path.is_symlink() else f"cannot read ({err.strerror})"))
            continue
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            skipped.append((path, "not a regular file (a FIFO, socket or device)"))
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(path)
        elif path.suffix == "":
            try:
                with open(path, "rb") as fh:
                    head = fh.read(132)
            except OSError as err:
                skipped.append((path, f"cannot read ({err.strerror or err})"))
                continue
            if sniff_format(head) == "dicom":
                found.append(path)
    return found, skipped


def list_images(folder: Path) -> list[Path]:
    """Images under `folder` (recursively): known suffixes, plus suffix-less DICOM files (see `scan_folder`)."""
    return scan_folder(folder)[0]


def overlay_path(out: Path, folder: Path, image: Path) -> Path:
    """Where folder mode writes an image's overlay: its path below `folder` with ".png" added, so that
    a.png, a.jpg and sub/a.png get a.png.png, a.jpg.png and sub/a.png.png instead of overwriting each other."""
    relative = image.relative_to(folder)
    return out / relative.parent / f"{relative.name}.png"


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
    p.add_argument("--max-memory-mb", type=float, default=DEFAULT_MAX_MEMORY / 1e6,
                   help="refuse images whose decode (and overlay) would need more memory, estimated from the header")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.conf is not None and not 0 <= args.conf <= 1:
        print(f"error: --conf must lie in [0, 1], got {args.conf}", file=sys.stderr)
        return 2
    if not args.max_memory_mb > 0:
        print(f"error: --max-memory-mb must be above 0, got {args.max_memory_mb}", file=sys.stderr)
        return 2
    if not args.image.exists():
        print(f"error: {args.image} does not exist", file=sys.stderr)
        return 2
    folder = args.image.is_dir()
    images, skipped = scan_folder(args.image) if folder else ([args.image], [])
    if not images and not skipped:
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
    for path, reason in skipped:  # reported like any image that failed: a line here, a record in the JSON/CSV
        failures += 1
        records.append({"image": str(path), "error": f"skipped: {reason}"})
        print(f"error: {path}: skipped: {reason}", file=sys.stderr)
    progress = images
    if folder:
        from tqdm import tqdm

        progress = tqdm(images, desc="predict", unit="img")
    # the overlay is drawn at the original size: its memory is part of the decode budget
    overlay_cost = OVERLAY_BYTES_PER_PIXEL if args.out else 0
    for path in progress:
        try:
            t0 = time.perf_counter()
            loaded = load_image(path, max_pixels=args.max_pixels, max_memory=int(args.max_memory_mb * 1e6),
                                extra_bytes_per_pixel=overlay_cost)
            decode_ms = (time.perf_counter() - t0) * 1e3
            pred = predictor.predict_loaded(loaded, str(path), args.mode, args.conf, timings={"decode_ms": decode_ms})
        except ImageDecodeError as err:
            failures += 1
            records.append({"image": str(path), "error": str(err)})
            print(f"error: {path}: {err}", file=sys.stderr)
            continue
        records.append(pred.to_record())
        if args.out:
            out = overlay_path(args.out, args.image, path) if folder else args.out
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
