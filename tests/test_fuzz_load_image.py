"""Property/fuzz test of `load_image` on random and mutated bytes.

Seeds are small PNG (8/16-bit), JPEG (baseline, progressive), TIFF, BMP and DICOM
files (uncompressed, RLE, JPEG 2000, deflated, windowed, VOI LUT, MONOCHROME1), so
the decode budget's header walks are fuzzed too. Mutations flip, insert, delete and truncate
bytes and overwrite the header fields that size the decode (PNG IHDR, DICOM
Rows/Columns/Bits/Frames). Whatever the input, `load_image` must return a sane
2-D image or raise `ImageDecodeError` with a known kind: no other exception, no
crash, no hang (a Hypothesis deadline per case, a thread timeout per test).

CI runs a fixed, derandomized budget; a longer random run:

    BONER_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -q tests/test_fuzz_load_image.py
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import time
import zlib
from datetime import timedelta
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bone_r.contract import harmonize
from bone_r.image import ImageDecodeError, load_image
from bone_r.synthetic import encode, make_dicom, make_phantom, to_8bit

KINDS = {"empty", "unsupported", "corrupt", "too_many_pixels", "over_budget", "unsupported_compression"}
MAX_PIXELS = 1_000_000  # keeps every accepted decode small
LONG_RUN = int(os.environ.get("BONER_FUZZ_EXAMPLES", "0"))
EXAMPLES = LONG_RUN or 150

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=3),  # a case slower than this is a failure (hangs are caught by the timeout below)
    derandomize=not LONG_RUN,  # CI: the same cases every run; a long run explores
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
pytestmark = pytest.mark.timeout(max(120, EXAMPLES // 4), method="thread")


@pytest.fixture(autouse=True)
def peak_memory_guard():
    """Small files must not make a decoder allocate much (the peak RSS, which a freed allocation still shows)."""
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kb) / 1024
    assert grown_mb < 512, f"peak memory grew by {grown_mb:.0f} MB while decoding files of a few kB"


@cache
def seeds() -> dict[str, bytes]:
    ph16 = make_phantom(40, 32, seed=1).pixels
    ph8 = to_8bit(ph16)
    return {
        "png8": encode(ph8, ".png"),
        "png16": encode(ph16, ".png"),
        "png_rgb": encode(np.dstack([ph8, ph8, ph8]), ".png"),
        "jpeg": encode(ph8, ".jpg"),
        "tiff16": encode(ph16, ".tiff"),
        "bmp": encode(ph8, ".bmp"),
        "dicom": make_dicom(ph16),
        "dicom_rle": make_dicom(ph16, compress="rle"),
        "dicom_window": make_dicom(ph16, window=(2048, 4096), photometric="MONOCHROME1", slope=0.5, intercept=10),
        "dicom_lut": make_dicom(ph16, voi_lut=np.linspace(0, 65535, 4096).astype(np.uint16)),
        "dicom8": make_dicom(ph8),
        # the paths of the decode budget: codestream headers, scans, inflating
        "dicom_j2k": make_dicom(ph16, compress="jpeg2000"),
        "dicom_deflated": _deflated(make_dicom(ph16)),
        "jpeg_progressive": _progressive(ph8),
    }


def _progressive(pixels: np.ndarray) -> bytes:
    import cv2

    return cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()


def _deflated(data: bytes) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def check(data: bytes) -> None:
    """The property: a sane image, or ImageDecodeError with a known kind and a message."""
    try:
        loaded = load_image(data, max_pixels=MAX_PIXELS)
    except ImageDecodeError as err:
        assert err.kind in KINDS, err.kind
        assert str(err).strip(), "an error needs a message for a person"
        return
    pixels, meta = loaded
    assert isinstance(pixels, np.ndarray) and pixels.ndim == 2
    assert pixels.dtype in (np.uint8, np.uint16, np.float32)
    assert pixels.shape == (meta.height, meta.width)
    assert 0 < pixels.size <= MAX_PIXELS
    assert meta.format in {"png", "jpeg", "tiff", "bmp", "dicom"}
    json.dumps(meta.to_dict(), allow_nan=False)  # the service and the CLI write it as strict JSON
    # what the service does next must not fail either
    rgb = harmonize(pixels)
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8


def test_seeds_decode():
    for name, data in seeds().items():
        loaded = load_image(data, max_pixels=MAX_PIXELS)
        assert loaded.pixels.shape == (40, 32), name


# --------------------------------------------------------------------------- mutations


@st.composite
def mutated(draw, names=None) -> bytes:
    name = draw(st.sampled_from(sorted(names or seeds())))
    data = bytearray(seeds()[name])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            for offset in range(draw(st.integers(1, 8))):
                if pos + offset < len(data):
                    data[pos + offset] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[pos:]
        else:  # duplicate a slice in place (repeated chunks and tags)
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 256))]
    return bytes(data)


def _png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)


@st.composite
def png_header_lies(draw) -> bytes:
    """A PNG whose IHDR declares any size, depth and colour type (with a valid CRC, so decoders believe it)."""
    data = seeds()[draw(st.sampled_from(["png8", "png16", "png_rgb"]))]
    width = draw(st.one_of(st.integers(0, 64), st.integers(0, 2**31 - 1)))
    height = draw(st.one_of(st.integers(0, 64), st.integers(0, 2**31 - 1)))
    depth = draw(st.sampled_from([1, 2, 4, 8, 16, 3, 0, 255]))
    ctype = draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7]))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, ctype, 0, 0, draw(st.sampled_from([0, 1])))
    return data[:8] + _png_chunk(b"IHDR", ihdr) + data[33:]


# (group, element) of the DICOM attributes that size or shape the pixel decode
DICOM_FIELDS = {
    "Rows": (0x0028, 0x0010), "Columns": (0x0028, 0x0011), "BitsAllocated": (0x0028, 0x0100),
    "BitsStored": (0x0028, 0x0101), "HighBit": (0x0028, 0x0102), "PixelRepresentation": (0x0028, 0x0103),
    "SamplesPerPixel": (0x0028, 0x0002),
}


@st.composite
def dicom_header_lies(draw) -> bytes:
    """A DICOM file with one or more US sizing attributes overwritten (explicit VR little endian)."""
    data = bytearray(seeds()[draw(st.sampled_from(["dicom", "dicom_window", "dicom_lut", "dicom8"]))])
    for field_name in draw(st.lists(st.sampled_from(sorted(DICOM_FIELDS)), min_size=1, max_size=3, unique=True)):
        group, element = DICOM_FIELDS[field_name]
        tag = struct.pack("<HH", group, element) + b"US" + struct.pack("<H", 2)
        pos = data.find(tag)
        if pos >= 0:
            value = draw(st.one_of(st.integers(0, 70), st.integers(0, 65535)))
            data[pos + 8 : pos + 10] = struct.pack("<H", value)
    return bytes(data)


@st.composite
def dicom_extra_attributes(draw) -> bytes:
    """Valid files with odd attributes set through pydicom: frames, photometric, rescale, windows."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(seeds()["dicom"]))
    ds.NumberOfFrames = draw(st.sampled_from([0, 1, 2, 65, 10**6]))
    ds.PhotometricInterpretation = draw(st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", ""]))
    odd = ["NaN", "inf", "-inf"]  # DS strings that parse to non-finite floats
    ds.RescaleSlope = draw(st.sampled_from([1, 0, -1, 1e-30, 1e30, *odd]))
    ds.RescaleIntercept = draw(st.sampled_from([0, -1024, 1e30, *odd]))
    ds.WindowCenter = draw(st.sampled_from([0, 2048, -1e9, 1e9, *odd]))
    ds.WindowWidth = draw(st.sampled_from([0, 1, 0.5, -10, 4096, 1e9, *odd]))
    ds.VOILUTFunction = draw(st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID", "BOGUS"]))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --------------------------------------------------------------------------- the properties


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    check(data)


@FUZZ
@given(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"\x00" * 128 + b"DICM"]),
       st.binary(max_size=2048))
def test_magic_then_random_bytes(magic, tail):
    check(magic + tail)


@FUZZ
@given(mutated(["png8", "png16", "png_rgb", "jpeg", "tiff16", "bmp"]))
def test_mutated_rasters(data):
    check(data)


@FUZZ
@given(mutated(["dicom", "dicom_rle", "dicom_window", "dicom_lut", "dicom8"]))
def test_mutated_dicom(data):
    check(data)


@FUZZ
@given(png_header_lies())
def test_png_header_lies(data):
    check(data)


@FUZZ
@given(dicom_header_lies())
def test_dicom_header_lies(data):
    check(data)


@FUZZ
@given(dicom_extra_attributes())
def test_dicom_odd_attributes(data):
    check(data)


def test_png_chunk_longer_than_the_file_is_refused_cheaply():
    """Regression (found by this fuzzer): OpenCV allocated 3 GB for a 2 kB PNG whose IDAT claimed 3 GB."""
    data = seeds()["png8"]
    lie = data[:33] + struct.pack(">I", 0xC12E5A73) + data[37:]
    t0 = time.perf_counter()
    with pytest.raises(ImageDecodeError) as err:
        load_image(lie, max_pixels=MAX_PIXELS)
    assert err.value.kind == "corrupt"
    assert time.perf_counter() - t0 < 0.5


def test_huge_declared_sizes_are_refused_before_decoding():
    """Known answers for the size checks the fuzzers lean on."""
    data = seeds()["png8"]
    lie = data[:8] + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0)) + data[33:]
    with pytest.raises(ImageDecodeError) as err:
        load_image(lie, max_pixels=MAX_PIXELS)
    assert err.value.kind == "too_many_pixels"
