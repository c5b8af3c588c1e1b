"""`load_image`: every format, the DICOM display rule, and every failure."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from bone_r.image import ImageDecodeError, load_image, sniff_format
from bone_r.synthetic import encode, make_dicom, make_phantom, to_8bit, truncated_jpeg

SHARED_DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom-samples"


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(256, 200, seed=3)


def test_png_8bit_roundtrip(phantom):
    px8 = to_8bit(phantom.pixels)
    gray, meta = load_image(encode(px8, ".png"))
    assert gray.dtype == np.uint8 and np.array_equal(gray, px8)
    assert (meta.format, meta.bit_depth, meta.size, meta.repaired) == ("png", 8, (200, 256), False)


def test_png_16bit_keeps_dynamic_range(phantom):
    gray, meta = load_image(encode(phantom.pixels, ".png"))
    assert gray.dtype == np.uint16 and meta.bit_depth == 16
    assert np.array_equal(gray, phantom.pixels)  # no clipping, no /256
    assert gray.max() < 4096  # 12 bits used of 16: left as stored, stretched later by harmonize


def test_path_and_bytes_agree(tmp_path, phantom):
    path = tmp_path / "x.png"
    path.write_bytes(encode(phantom.pixels, ".png"))
    a, _ = load_image(path)
    b, _ = load_image(path.read_bytes())
    assert np.array_equal(a, b)


@pytest.mark.parametrize("ext", [".tif", ".bmp", ".jpg"])
def test_other_formats(ext, phantom):
    px = to_8bit(phantom.pixels)
    gray, meta = load_image(encode(px, ext))
    assert gray.shape == px.shape and gray.dtype == np.uint8
    assert meta.format == {".tif": "tiff", ".bmp": "bmp", ".jpg": "jpeg"}[ext]
    assert np.abs(gray.astype(int) - px).mean() < 3  # JPEG is lossy; the others exact
    if ext != ".jpg":
        assert np.array_equal(gray, px)


def test_tiff_16bit(phantom):
    gray, meta = load_image(encode(phantom.pixels, ".tif"))
    assert gray.dtype == np.uint16 and np.array_equal(gray, phantom.pixels) and meta.bit_depth == 16


def test_colour_becomes_gray(phantom):
    px = to_8bit(phantom.pixels)
    bgr = np.dstack([px, px, px])
    bgr[0, 0] = (255, 0, 0)  # one pure blue pixel
    gray, meta = load_image(encode(bgr, ".png"))
    assert gray.ndim == 2 and meta.channels == 3
    assert np.array_equal(gray[1:], px[1:])
    assert gray[0, 0] == round(0.114 * 255)  # ITU-R BT.601 luma of pure blue


def test_truncated_jpeg_is_repaired_and_flagged(phantom):
    data = truncated_jpeg(phantom.pixels, keep=0.6)
    full, _ = load_image(encode(to_8bit(phantom.pixels), ".jpg"))
    gray, meta = load_image(data)
    assert meta.repaired is True
    assert gray.shape == full.shape
    top = gray.shape[0] // 4  # the rows that were fully transmitted decode as before
    assert np.abs(gray[:top].astype(int) - full[:top]).max() <= 1


def test_complete_jpeg_not_flagged(phantom):
    _, meta = load_image(encode(to_8bit(phantom.pixels), ".jpg"))
    assert meta.repaired is False


def test_format_from_content_not_name(tmp_path, phantom):
    path = tmp_path / "scan.jpg"  # a DICOM file with a misleading name
    path.write_bytes(make_dicom(phantom.pixels))
    _, meta = load_image(path)
    assert meta.format == "dicom"
    assert sniff_format(b"\x89PNG\r\n\x1a\n....") == "png"


# ----------------------------------------------------------------------------- DICOM


def _expected_window(values, center, width):
    return np.round(np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255).astype(np.uint8)


def test_dicom_no_window_is_minmax(phantom):
    gray, meta = load_image(make_dicom(phantom.pixels))
    v = phantom.pixels.astype(float)
    expected = np.round((v - v.min()) / (v.max() - v.min()) * 255).astype(np.uint8)
    assert np.array_equal(gray, expected)
    assert meta.dicom["voi"] == "minmax" and meta.bit_depth == 12


def test_dicom_rescale_then_window(phantom):
    gray, meta = load_image(make_dicom(phantom.pixels, slope=2.0, intercept=-100.0, window=(3000.0, 4000.0)))
    values = phantom.pixels.astype(float) * 2.0 - 100.0
    assert np.array_equal(gray, _expected_window(values, 3000.0, 4000.0))
    assert meta.dicom["RescaleSlope"] == 2.0 and meta.dicom["voi"] == "window"


def test_dicom_multi_valued_window_uses_first(phantom):
    gray, meta = load_image(make_dicom(phantom.pixels, window=([2000.0, 1000.0], [4000.0, 2000.0])))
    assert np.array_equal(gray, _expected_window(phantom.pixels.astype(float), 2000.0, 4000.0))
    assert meta.dicom["windows_in_file"] == 2 and meta.dicom["WindowCenter"] == 2000.0


def test_dicom_voi_lut_sequence_wins_over_window(phantom):
    lut = (np.linspace(0, 1, 4096) ** 0.5 * 65535).round().astype(int)  # a gamma LUT, 16-bit out
    gray, meta = load_image(make_dicom(phantom.pixels, voi_lut=lut, window=(2000.0, 4000.0)))
    expected = np.round(lut[np.clip(phantom.pixels, 0, 4095)] / 65535 * 255).astype(np.uint8)
    assert meta.dicom["voi"] == "lut"
    assert np.abs(gray.astype(int) - expected).max() <= 1


def test_dicom_monochrome1_is_inverted(phantom):
    mono2, _ = load_image(make_dicom(phantom.pixels, window=(2000.0, 4000.0)))
    mono1, meta = load_image(make_dicom(phantom.pixels, window=(2000.0, 4000.0), photometric="MONOCHROME1"))
    assert meta.dicom["PhotometricInterpretation"] == "MONOCHROME1"
    assert np.abs(mono1.astype(int) - (255 - mono2.astype(int))).max() <= 1


def test_dicom_window_missing_the_data_falls_back(phantom):
    gray, meta = load_image(make_dicom(phantom.pixels, window=(60000.0, 100.0)))
    assert meta.dicom["voi"] == "minmax" and "window_error" in meta.dicom
    assert gray.min() == 0 and gray.max() == 255


@pytest.mark.parametrize("syntax", ["rle", "jpeg2000"])
def test_dicom_compressed_decodes(phantom, syntax):
    plain, _ = load_image(make_dicom(phantom.pixels, window=(2000.0, 4000.0)))
    gray, meta = load_image(make_dicom(phantom.pixels, window=(2000.0, 4000.0), compress=syntax))
    assert np.array_equal(gray, plain)  # both syntaxes are lossless
    assert meta.dicom["TransferSyntaxUID"] != "1.2.840.10008.1.2.1"


def _resaved(data: bytes, syntax: str, fragments: list[bytes] | None = None) -> bytes:
    """`data` saved again with another transfer syntax (pydicom deflates on writing), or with these fragments."""
    import io

    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = syntax
    if fragments is not None:
        ds.PixelData = encapsulate(fragments)
        ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_deflated_decodes_like_the_plain_file(phantom):
    plain = make_dicom(phantom.pixels, window=(2000.0, 4000.0))
    deflated = _resaved(plain, "1.2.840.10008.1.2.1.99")
    assert len(deflated) < len(plain)
    gray, meta = load_image(deflated)
    assert np.array_equal(gray, load_image(plain).pixels)
    assert meta.dicom["TransferSyntaxUID"] == "1.2.840.10008.1.2.1.99"


def test_dicom_jpeg_baseline_frame_decodes(phantom):
    px = to_8bit(phantom.pixels)
    frame = encode(px, ".jpg")
    gray, meta = load_image(_resaved(make_dicom(px), "1.2.840.10008.1.2.4.50", [frame]))
    same = load_image(make_dicom(load_image(frame).pixels)).pixels  # OpenCV's decode, same display rule
    assert meta.dicom["TransferSyntaxUID"] == "1.2.840.10008.1.2.4.50"
    assert np.abs(gray.astype(int) - same).mean() < 1  # two libjpeg builds: IDCT rounding differs


def test_dicom_corrupt_data_in_a_decodable_syntax_is_corrupt_not_unsupported():
    data = _resaved(make_dicom(np.zeros((64, 64), np.uint8)), "1.2.840.10008.1.2.5", [b"\x01\x00\x00\x00" + b"\xff" * 60])
    with pytest.raises(ImageDecodeError) as err:  # RLE Lossless: pydicom's own decoder is always there
        load_image(data)
    assert err.value.kind == "corrupt" and "RLE" in str(err.value)


def test_dicom_undecodable_compression_is_refused_clearly(phantom):
    import io

    import pydicom
    from pydicom.encaps import encapsulate

    data = make_dicom(phantom.pixels)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder installed
    ds.PixelData = encapsulate([b"\xff\x0a" + b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(ImageDecodeError) as err:
        load_image(buf.getvalue())
    assert err.value.kind == "unsupported_compression"
    assert "MPEG2" in str(err.value) and "1.2.840.10008.1.2.4.100" in str(err.value)


# ----------------------------------------------------------------------------- failures


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, followed by a little pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")


def test_bomb_refused_before_decoding():
    data = _png_header_only(20_000, 20_000)  # 400 MP claimed in a tiny file
    t0 = time.perf_counter()
    with pytest.raises(ImageDecodeError) as err:
        load_image(data)
    assert err.value.kind == "too_many_pixels" and "400.0 MP" in str(err.value)
    assert time.perf_counter() - t0 < 0.5


def test_pixel_limit_is_configurable(phantom):
    data = encode(phantom.pixels, ".png")
    with pytest.raises(ImageDecodeError) as err:
        load_image(data, max_pixels=1000)
    assert err.value.kind == "too_many_pixels"
    assert load_image(data, max_pixels=256 * 200).pixels.shape == (256, 200)


def test_dicom_bomb_refused_from_tags(phantom):
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(make_dicom(phantom.pixels)))
    ds.Rows, ds.Columns = 60000, 60000
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(ImageDecodeError) as err:
        load_image(buf.getvalue())
    assert err.value.kind == "too_many_pixels"


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"", "empty"),
        (b"hello, this is not an image" * 10, "unsupported"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "corrupt"),
        (b"\xff\xd8\xff\xe0" + b"\x13" * 200, "corrupt"),
        (b"\x00" * 128 + b"DICM" + b"\x00" * 40, "corrupt"),
    ],
    ids=["empty", "garbage", "png-header-garbage", "jpeg-garbage", "dicom-garbage"],
)
def test_bad_bytes_raise_the_documented_error(data, kind):
    with pytest.raises(ImageDecodeError) as err:
        load_image(data)
    assert err.value.kind == kind
    assert str(err.value)[0].islower() or str(err.value)[0].isupper()  # a sentence, not an empty message


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError) as err:
        load_image(tmp_path / "nope.png")
    assert "cannot read" in str(err.value)


def test_dicom_without_preamble_is_not_taken_for_dicom(phantom):
    with pytest.raises(ImageDecodeError) as err:
        load_image(make_dicom(phantom.pixels, preamble=False))
    assert err.value.kind == "unsupported" and "DICM" in str(err.value)


# ----------------------------------------------------------------------------- real files


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason="../shared/data/dicom-samples not present")
@pytest.mark.parametrize(
    "name, photometric, voi",
    [
        ("RG2_JPLL.dcm", "MONOCHROME2", "window"),  # JPEG Lossless
        ("RG3_J2KR.dcm", "MONOCHROME1", "window"),  # JPEG 2000, inverted
        ("NM_Kakadu44_SOTmarkerincons.dcm", "MONOCHROME2", "window"),
        ("JPEG2KLossless_1s_1f_u_16_16.dcm", "MONOCHROME2", "minmax"),  # its window misses the data
        ("cr_cspine_6154.dcm", "MONOCHROME1", "window"),
        ("Fake_MONOHR1.dcm", "MONOCHROME1", "minmax"),
    ],
)
def test_real_dicom_samples(name, photometric, voi):
    gray, meta = load_image(SHARED_DICOM / name)
    assert gray.dtype == np.uint8 and gray.shape == (meta.height, meta.width)
    assert meta.dicom["PhotometricInterpretation"] == photometric and meta.dicom["voi"] == voi
    assert gray.std() > 5  # a real picture, not a blank


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason="../shared/data/dicom-samples not present")
def test_real_monochrome1_relabel_is_the_inverse():
    chest = sorted(SHARED_DICOM.glob("1.2.276.*.dcm"))[0]
    a, _ = load_image(chest)
    b, _ = load_image(SHARED_DICOM / "Fake_MONOHR1.dcm")
    assert np.array_equal(b, 255 - a)


def test_cv2_decodes_what_we_encode():
    # guard against an OpenCV build without PNG/JPEG/TIFF codecs
    for ext in (".png", ".jpg", ".tif", ".bmp"):
        assert cv2.imdecode(np.frombuffer(encode(np.zeros((8, 8), np.uint8), ext), np.uint8), cv2.IMREAD_UNCHANGED) is not None
