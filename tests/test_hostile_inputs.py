"""Hostile inputs (issue 16): decompression, scan and parse bombs are refused before they cost memory or time,
only the first DICOM frame is decoded, and the command line's folder mode survives odd folder entries.

The bombs come from scripts/hostile_inputs.py (built from code). `traced_peak` measures what Python and
NumPy allocate (both report to tracemalloc), so "refused before decoding" is checked by its cost, not only
by its message. The service-side cases (slow clients, deadlines, held memory) are in tests/test_service.py.
"""

from __future__ import annotations

import json
import os
import time
import tracemalloc
import warnings

import numpy as np
import pytest
from test_service import assert_error, make_client, post

import bone_r.image
import inference
from bone_r.image import OVERLAY_BYTES_PER_PIXEL, ImageDecodeError, load_image
from bone_r.synthetic import encode, make_phantom
from fakes import write_fake_model
from scripts import hostile_inputs as hostile

pytestmark = pytest.mark.timeout(120)


def traced_peak(fn, *args, **kwargs):
    """(result or the ImageDecodeError raised, peak MB traced while `fn` ran)."""
    tracemalloc.start()
    try:
        result = fn(*args, **kwargs)
    except ImageDecodeError as err:
        result = err
    finally:
        peak = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
    return result, peak


def refused(data: bytes, kind: str = "over_budget", **kwargs) -> ImageDecodeError:
    """`load_image(data)` raised `kind` within 5 s (timed untraced: tracing slows parsing), allocating < 80 MB."""
    t0 = time.perf_counter()
    with pytest.raises(ImageDecodeError) as raised:
        load_image(data, **kwargs)
    seconds = time.perf_counter() - t0
    assert raised.value.kind == kind, str(raised.value)
    err, peak = traced_peak(load_image, data, **kwargs)
    assert seconds < 5 and peak < 80, (seconds, peak)
    return err


# --------------------------------------------------------------------------- decode budget (load_image)


def test_j2k_dicom_with_40_frames_behind_numberofframes_1_is_refused_before_decoding():
    data = hostile.j2k_frames_dicom(side=10_000, frames=40, declared=1)  # ~7 kB
    assert len(data) < 10_000
    err = refused(data)
    assert "10000x10000" in str(err) and "MB" in str(err)


def test_j2k_single_frame_bomb_is_refused_before_decoding():
    refused(hostile.j2k_frames_dicom(side=10_000, frames=1))


def test_only_the_first_frame_is_decoded():
    """40 frames present, NumberOfFrames=1: one frame decoded (pydicom alone decodes all 40)."""
    loaded, peak = traced_peak(load_image, hostile.j2k_frames_dicom(side=1500, frames=40))
    assert not isinstance(loaded, Exception), loaded
    assert loaded.pixels.shape == (1500, 1500)
    assert peak < 60, f"{peak:.0f} MB traced: more than one 2.25 MB frame was decoded"  # 40 frames: >= 90 MB


def test_a_compressed_frame_larger_than_its_tags_is_refused():
    data = hostile._retag(hostile.j2k_frames_dicom(side=4000, frames=1), 64)
    err = refused(data, "corrupt")
    assert "4000x4000" in str(err) and "64x64" in str(err)


@pytest.mark.parametrize("inflated_mb", [300, 2000])
def test_deflated_dicom_bomb_is_refused_while_inflating(inflated_mb):
    data = hostile.deflated_dicom(inflated_mb)  # 0.3 / 1.9 MB on the wire
    assert len(data) < inflated_mb * 1e6 / 500
    err = refused(data)
    assert "inflates to more than" in str(err)


def test_progressive_jpeg_scan_bomb_is_refused_before_decoding():
    data = hostile.progressive_jpeg(side=1000, scans=3000)
    err = refused(data)
    assert "3000 progressive scans" in str(err)


def test_an_ordinary_progressive_jpeg_still_decodes():
    import cv2

    px = (make_phantom(300, 240).pixels >> 4).astype(np.uint8)
    data = cv2.imencode(".jpg", px, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    assert load_image(data).pixels.shape == (300, 240)


def test_dicom_jpeg_frame_scan_bomb_is_refused():
    from pydicom.encaps import encapsulate

    stream = hostile.progressive_jpeg(side=512, scans=3000)
    data = hostile.dicom(encapsulate([stream]), 512, 512, syntax="1.2.840.10008.1.2.4.50")
    err = refused(data)
    assert "DICOM JPEG frame" in str(err)


def test_16bit_rgba_png_bomb_is_refused_before_decoding():
    data = hostile.png_bomb(side=10_000)  # ~780 kB that decode to 800 MB
    assert len(data) < 1_000_000
    err = refused(data)
    assert "PNG image (10000x10000)" in str(err)


def test_the_budget_counts_what_the_caller_does_next():
    data = hostile.png_bomb(side=3000)  # ~17 bytes per pixel to decode
    assert load_image(data, max_memory=250_000_000).pixels.shape == (3000, 3000)
    refused(data, max_memory=250_000_000, extra_bytes_per_pixel=OVERLAY_BYTES_PER_PIXEL)


@pytest.mark.parametrize("build", [
    lambda: hostile.dense_elements_dicom(8),  # a million empty elements
    lambda: hostile.sequence_items_dicom(3),  # an undefined-length sequence of 375,000 items
], ids=["tiny-elements", "sequence-items"])
def test_dicom_parse_bombs_are_refused(build):
    err = refused(build())
    assert "elements or items" in str(err)


def test_a_huge_lut_sequence_is_refused_before_it_is_parsed():
    import struct

    items = struct.pack("<HHI", 0xFFFE, 0xE000, 0) * 250_000  # 2 MB of empty items in the VOI LUT Sequence
    voi = struct.pack("<HH2sHI", 0x0028, 0x3010, b"SQ", 0, len(items)) + items
    err = refused(hostile._before_pixel_data(hostile.dicom(bytes(64), 8, 8), voi), "corrupt")
    assert "VOILUTSequence" in str(err)


def test_a_file_over_the_budget_is_not_even_read(tmp_path):
    path = tmp_path / "big.png"
    with open(path, "wb") as fh:
        fh.truncate(50_000_000)  # sparse: 50 MB that cost nothing to write
    err = refused(path, max_memory=10_000_000)
    assert "50 MB" in str(err)


# --------------------------------------------------------------------------- the service: the harness's fast cases


FAST_CASES = [
    ("j2k-40-frames", lambda: hostile.j2k_frames_dicom(), 413, "decode_budget_exceeded"),
    ("deflate-300MB", lambda: hostile.deflated_dicom(300), 413, "decode_budget_exceeded"),
    ("progressive-3000-scans", lambda: hostile.progressive_jpeg(side=1000, scans=3000), 413, "decode_budget_exceeded"),
    ("png-16bit-rgba", lambda: hostile.png_bomb(), 413, "decode_budget_exceeded"),
    ("corrupt-rle", hostile.corrupt_rle_dicom, 400, "undecodable_image"),
    ("tiny-elements", lambda: hostile.dense_elements_dicom(8), 413, "decode_budget_exceeded"),
    ("zero-width-sigmoid", hostile.zero_width_window_dicom, 200, None),
]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with make_client(tmp_path_factory.mktemp("svc")) as c:
        yield c


@pytest.mark.parametrize("name, build, status, word", FAST_CASES, ids=[c[0] for c in FAST_CASES])
def test_service_answers_hostile_uploads_quickly(service, name, build, status, word):
    data = build()
    t0 = time.perf_counter()
    r = post(service, data, "?overlay=true")
    assert time.perf_counter() - t0 < 5
    if status == 200:
        assert r.status_code == 200, r.text
    else:
        assert_error(r, status, word)


# --------------------------------------------------------------------------- the command line's folder mode


@pytest.fixture
def weights(tmp_path):
    return write_fake_model(tmp_path / "m", [[0.5, 0.5, 0.2, 0.2, 0.8]])


def test_folder_overlays_never_overwrite_each_other(tmp_path, weights):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    png = encode(make_phantom(120, 100).pixels, ".png")
    for name in ("a.png", "a.jpg", "sub/a.png"):
        (folder / name).write_bytes(png if name.endswith("png") else encode((make_phantom(120, 100).pixels >> 4).astype(np.uint8), ".jpg"))
    out = tmp_path / "out"
    assert inference.main(["--image", str(folder), "--weights", str(weights), "--out", str(out)]) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == ["a.jpg.png", "a.png.png", "sub/a.png.png"]


def test_folder_odd_entries_are_reported_not_fatal(tmp_path, weights, capsys, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(make_phantom(120, 100).pixels, ".png"))
    (folder / "loop").symlink_to("loop")
    (folder / "dangling.png").symlink_to("missing.png")
    os.mkfifo(folder / "pipe.png")
    (folder / "locked").write_bytes(b"whatever")
    real_open = open

    def locked_open(path, *args, **kwargs):  # an unreadable file (permissions do not stop root)
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(bone_r.image, "open", locked_open, raising=False)  # where folders are scanned
    rc = inference.main(["--image", str(folder), "--weights", str(weights), "--json", str(tmp_path / "r.json"),
                         "--csv", str(tmp_path / "r.csv")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    records = {r["image"].rsplit("/", 1)[-1]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert records["a.png"]["fracture_detected"] is True
    for name, words in [("loop", "loops"), ("dangling.png", "dangling"), ("pipe.png", "not a regular file"),
                        ("locked", "Permission denied")]:
        assert words in records[name]["error"], records[name]
        assert name in err
    assert (tmp_path / "r.csv").read_text().count("skipped") == 4


@pytest.mark.timeout(20)
def test_a_fifo_given_as_the_image_is_refused_not_read(tmp_path, weights, capsys):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    assert inference.main(["--image", str(fifo), "--weights", str(weights), "--json", str(tmp_path / "r.json")]) == 1
    assert "not a regular file" in json.loads((tmp_path / "r.json").read_text())["error"]


# --------------------------------------------------------------------------- DICOM display corner cases


@pytest.mark.parametrize("function", ["SIGMOID", "LINEAR_EXACT"])
def test_zero_window_width_falls_back_to_minmax(function):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NaN cast warning either
        gray, meta = load_image(hostile.zero_width_window_dicom(function))
    assert meta.dicom["voi"] == "minmax" and "window_error" in meta.dicom
    assert len(np.unique(gray)) == 64  # the ramp, not a binarised image
