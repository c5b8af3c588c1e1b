"""Images: decoding PNG, JPEG, TIFF, BMP and DICOM into grayscale, within pixel and memory budgets; finding images in folders.

`load_image` is the one decoder of the project. Research and teaching tool, not a diagnosis.
"""
from __future__ import annotations

import errno
import io
import math
import re
import stat
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

from bone_r.contract import DICOM_VOI_RULES, Contract

DEFAULT_MAX_PIXELS = 100_000_000


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}


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
    reduced: int = 1  # decoded at 1/reduced of width x height (the contract's `reduced_decode` rule); 1: full size

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
    contract: Contract | None = None,
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
    decoded (``meta.repaired``). DICOM goes through `contract`'s display rule (`Contract.dicom_voi`)
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
    contract = contract or Contract()
    if fmt == "dicom":
        try:
            return _load_dicom(data, max_pixels, max_memory, extra_bytes_per_pixel, contract.dicom_voi, contract)
        except ImageDecodeError:
            raise
        except Exception as err:  # noqa: BLE001 - pydicom parses lazily: a malformed element raises wherever it is read
            raise ImageDecodeError(f"the DICOM file is malformed ({type(err).__name__})", "corrupt") from None
    return _load_raster(data, fmt, max_pixels, max_memory, extra_bytes_per_pixel, contract)


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


_REDUCED_GRAY = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


def _load_raster(data: bytes, fmt: str, max_pixels: int, max_memory: int, extra_bytes_per_pixel: float,
                 contract: Contract | None = None) -> LoadedImage:
    width, height, per_pixel = _raster_header(data, fmt)
    _check_pixels(width, height, max_pixels)
    _check_memory(f"{fmt.upper()} image", width, height, per_pixel, 2 * len(data), max_memory, extra_bytes_per_pixel)
    if fmt == "png" and not _png_chunks_fit(data):
        raise ImageDecodeError("the PNG is truncated or declares a chunk longer than the file", "corrupt")
    repaired = False
    if fmt == "jpeg" and _jpeg_is_truncated(data):
        data = data + b"\xff\xd9"
        repaired = True
    # the contract's reduced decoding: libjpeg's DCT scaling decodes 1/2, 1/4 or 1/8 of the pixels (gray, 8 bits)
    reduced = (contract or Contract()).decode_reduction(width, height) if fmt == "jpeg" else 1
    full_size = width, height
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED_GRAY.get(reduced, cv2.IMREAD_UNCHANGED))
    if arr is None or arr.size == 0:
        raise ImageDecodeError(f"the {fmt.upper()} data is corrupt and could not be decoded", "corrupt")
    if reduced > 1:
        gray = arr
        return LoadedImage(gray, ImageMeta(fmt, 8, *full_size, _jpeg_header(data)[2] or 1, repaired, reduced=reduced))
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


# DICOM pixel-data decoders per compression family, tried in this order; a package that is not installed is skipped
# and a decoder that fails hands over to the next. The order is measured (JOURNAL 2026-11-29, `scripts/bench_scale.py
# decoders`): the decoder with the least CPU time whose pixels are identical to pylibjpeg's (the decoder before) comes
# first: imagecodecs is 5.6x faster on JPEG-lossless and ties pylibjpeg on JPEG 2000 (both OpenJPEG); GDCM decodes
# JPEG 2000 on two threads (faster only when a core is idle, ~20% more CPU). For lossy JPEG only pylibjpeg gives those
# pixels (the others round the inverse DCT differently, by 1), so it stays first there. pydicom's own choice is never
# used for these families: installing GDCM would silently change it (it prefers GDCM).
DICOM_DECODERS: dict[str, tuple[str, ...]] = {
    "jpeg_lossless": ("imagecodecs", "gdcm", "pylibjpeg"),
    "jpeg_lossy": ("pylibjpeg", "pillow", "gdcm", "imagecodecs"),
    "jpegls": ("imagecodecs", "pyjpegls", "pylibjpeg", "gdcm"),
    "jpeg2000": ("imagecodecs", "pylibjpeg", "gdcm", "pillow"),
}


def dicom_family(tsuid: Any) -> str | None:
    """The compression family of a transfer syntax (a key of `DICOM_DECODERS`), or None (native, RLE, unknown)."""
    import pydicom.uid as uids

    if tsuid in (uids.JPEGLossless, uids.JPEGLosslessSV1):
        return "jpeg_lossless"
    if tsuid in uids.JPEGTransferSyntaxes:
        return "jpeg_lossy"
    if tsuid in uids.JPEGLSTransferSyntaxes:
        return "jpegls"
    if tsuid in uids.JPEG2000TransferSyntaxes or str(tsuid).startswith("1.2.840.10008.1.2.4.20"):  # with HTJ2K
        return "jpeg2000"
    return None


def _plain_gray(ds: Any) -> bool:
    """One unsigned sample of 8 or 16 bits: the layout the frame-level decoders below return as pydicom would."""
    return (int(ds.get("SamplesPerPixel", 1) or 1) == 1 and int(ds.get("PixelRepresentation", 0) or 0) == 0
            and int(ds.get("BitsAllocated", 16) or 16) in (8, 16))


def _first_frame(ds: Any) -> bytes:
    from pydicom.encaps import generate_frames

    return next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))


def _imagecodecs_frame(ds: Any, family: str) -> np.ndarray | None:
    """The first frame through imagecodecs (libjpeg-turbo, CharLS, OpenJPEG), or None where it does not apply."""
    if not _plain_gray(ds):
        return None
    try:
        import imagecodecs
    except ImportError:
        return None
    decode = {"jpeg_lossless": imagecodecs.jpeg8_decode, "jpeg_lossy": imagecodecs.jpeg8_decode,
              "jpegls": imagecodecs.jpegls_decode, "jpeg2000": imagecodecs.jpeg2k_decode}[family]
    arr = decode(_first_frame(ds))
    dtype = np.uint8 if int(ds.get("BitsAllocated", 16) or 16) == 8 else np.uint16
    if arr.shape != (int(ds.Rows), int(ds.Columns)) or arr.dtype.itemsize > np.dtype(dtype).itemsize:
        return None
    return arr.astype(dtype, copy=False)


def j2k_reduced_frame(ds: Any, level: int) -> np.ndarray | None:
    """The first JPEG 2000 frame decoded `level` resolution levels down (OpenJPEG's reduce, through Pillow), with
    pydicom's bit shift; None where that does not apply (signed or colour data, too few levels)."""
    if not _plain_gray(ds):
        return None
    from PIL import Image

    frame = _first_frame(ds)
    start = frame.find(b"\xff\x4f\xff\x51")
    if start < 0 or len(frame) < start + 44:
        return None
    ssiz = frame[start + 42]
    if ssiz & 0x80:  # signed samples
        return None
    precision = (ssiz & 0x7F) + 1
    try:
        with Image.open(io.BytesIO(frame)) as im:
            im.reduce = level
            im.load()
            arr = np.array(im)
    except Exception:  # noqa: BLE001 - fewer resolution levels than asked, or a codestream Pillow refuses
        return None
    bits = int(ds.get("BitsAllocated", 16) or 16)
    arr = arr.astype(np.uint8 if bits == 8 else np.uint16, copy=False)
    if arr.dtype == np.uint16 and precision < 16:
        np.right_shift(arr, 16 - precision, out=arr)  # Pillow widens N-bit samples to 16 bits
    return arr


def decode_dicom_frame(ds: Any, decoder: str) -> np.ndarray:
    """The first frame of `ds` through one named decoder (a `DICOM_DECODERS` entry); raises if it cannot."""
    from pydicom.pixels import pixel_array

    family = dicom_family(ds.file_meta.TransferSyntaxUID)
    if decoder == "imagecodecs":
        arr = _imagecodecs_frame(ds, family) if family else None
        if arr is None:
            raise ValueError("imagecodecs does not apply to this frame")
        return arr
    return pixel_array(ds, index=0, decoding_plugin=decoder)


def _decode_dicom_pixels(ds: Any, tsuid: Any, reduction: int) -> tuple[np.ndarray, str, int]:
    """(first frame, decoder used, reduction applied): the reduced JPEG 2000 decode when the contract allows it,
    else the first `DICOM_DECODERS` entry that is installed and succeeds, else pydicom's own (native, RLE)."""
    from pydicom.pixels import get_decoder, pixel_array

    family = dicom_family(tsuid)
    if family == "jpeg2000" and reduction > 1:
        arr = j2k_reduced_frame(ds, reduction.bit_length() - 1)
        if arr is not None:
            return arr, "pillow-reduced", reduction
    if family is None:
        return pixel_array(ds, index=0), "pydicom", 1
    try:
        plugins = set(get_decoder(tsuid).available_plugins)
    except Exception:  # noqa: BLE001 - no pydicom decoder for this syntax at all
        plugins = set()
    error: Exception | None = None
    for name in DICOM_DECODERS[family]:
        if name != "imagecodecs" and name not in plugins:
            continue
        try:
            return decode_dicom_frame(ds, name), name, 1
        except Exception as err:  # noqa: BLE001 - the next decoder may read it; the last error is reported
            error = err
    if error is None:
        error = RuntimeError("no installed decoder")
    raise error


def _load_dicom(data: bytes, max_pixels: int, max_memory: int, extra_bytes_per_pixel: float, voi_rule: str = "standard",
                contract: Contract | None = None) -> LoadedImage:
    if voi_rule not in DICOM_VOI_RULES:  # "standard" is the only DICOM display rule so far: the steps below
        raise ValueError(f"unknown DICOM display rule {voi_rule!r}; known: {list(DICOM_VOI_RULES)}")
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi

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
        pixels, decoder, reduced = _decode_dicom_pixels(ds, tsuid, (contract or Contract()).decode_reduction(cols, rows))
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
    tags["decoder"] = decoder
    if pixels.shape != (-(-rows // reduced), -(-cols // reduced)):
        raise ImageDecodeError(f"the DICOM pixel data ({pixels.shape}) does not match its Rows x Columns ({rows}x{cols})"
                               + (f" reduced {reduced}x" if reduced > 1 else ""), "corrupt")
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
    meta = ImageMeta("dicom", tags["BitsStored"] or 8, cols, rows, samples, dicom=tags, reduced=reduced)
    return LoadedImage(gray, meta)


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
