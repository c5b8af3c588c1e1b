"""DICOM decoder choice (`bone_r.image.DICOM_DECODERS`: the first installed decoder of a family decodes, every one
is pixel-identical to pylibjpeg, a missing package is skipped) and the contract's reduced-resolution decoding
(`Contract.reduced_decode`: JPEG DCT scaling, JPEG 2000 resolution levels), which keeps the decode budgets."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import bone_r.image as image_mod
from bone_r.contract import Contract
from bone_r.image import DICOM_DECODERS, ImageDecodeError, decode_dicom_frame, dicom_family, load_image
from bone_r.synthetic import encode, make_dicom, make_phantom, to_8bit
from fakes import write_fake_model

SHARED_DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom-samples"


def _dataset(data: bytes):
    import pydicom

    return pydicom.dcmread(io.BytesIO(data))


def _installed(ds) -> list[str]:
    from pydicom.pixels import get_decoder

    tsuid = ds.file_meta.TransferSyntaxUID
    plugins = set(get_decoder(tsuid).available_plugins)
    out = []
    for name in DICOM_DECODERS[dicom_family(tsuid)]:
        if name == "imagecodecs":
            try:
                import imagecodecs  # noqa: F401
            except ImportError:
                continue
        elif name not in plugins:
            continue
        out.append(name)
    return out


@pytest.mark.parametrize("compress", ["jpeg2000", "jpegls"])
def test_every_installed_decoder_is_exact_and_the_first_one_is_used(compress):
    stored = make_phantom(300, 240, seed=4).pixels
    data = make_dicom(stored, compress=compress)
    ds = _dataset(data)
    names = _installed(ds)
    assert names, "no decoder installed for " + compress
    for name in names:
        assert np.array_equal(decode_dicom_frame(ds, name), stored), name
    assert load_image(data).meta.dicom["decoder"] == names[0]


def test_a_missing_or_failing_decoder_hands_over_to_the_next(monkeypatch):
    stored = make_phantom(200, 160, seed=5).pixels
    data = make_dicom(stored, compress="jpeg2000")
    reference = load_image(data).pixels
    monkeypatch.setitem(sys.modules, "imagecodecs", None)  # import fails: not installed
    monkeypatch.setitem(DICOM_DECODERS, "jpeg2000", ("no-such-plugin", "imagecodecs", "pylibjpeg"))
    loaded = load_image(data)
    assert loaded.meta.dicom["decoder"] == "pylibjpeg" and np.array_equal(loaded.pixels, reference)

    real = image_mod.decode_dicom_frame
    monkeypatch.setitem(DICOM_DECODERS, "jpeg2000", ("pillow", "pylibjpeg"))
    monkeypatch.setattr(image_mod, "decode_dicom_frame",
                        lambda ds, name: (_ for _ in ()).throw(RuntimeError("broken")) if name == "pillow" else real(ds, name))
    loaded = load_image(data)
    assert loaded.meta.dicom["decoder"] == "pylibjpeg" and np.array_equal(loaded.pixels, reference)


@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason="../shared/data/dicom-samples not present")
@pytest.mark.parametrize("name", ["RG2_JPLL.dcm", "RG3_J2KR.dcm", "JPEG2KLossless_1s_1f_u_16_16.dcm", "Fake_MONOHR1.dcm",
                                  "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"])
def test_the_chosen_decoder_gives_pylibjpegs_pixels_on_real_files(name):
    """pylibjpeg decoded every sample before the choice existed: whatever decodes now gives the same pixels
    (for lossy JPEG the other decoders round the inverse DCT differently, off by 1)."""
    import pydicom

    ds = pydicom.dcmread(SHARED_DICOM / name)
    pixels, decoder, reduced = image_mod._decode_dicom_pixels(ds, ds.file_meta.TransferSyntaxUID, 1)
    assert reduced == 1 and decoder in DICOM_DECODERS[dicom_family(ds.file_meta.TransferSyntaxUID)]
    assert np.array_equal(pixels, decode_dicom_frame(ds, "pylibjpeg")), decoder


# ----------------------------------------------------------------------------- the contract rule


def test_reduced_decode_is_a_validated_contract_field_recorded_only_when_on(tmp_path):
    assert Contract().reduced_decode == 0 and "reduced_decode" not in Contract().to_dict()
    on = Contract(reduced_decode=512)
    assert on.to_dict()["reduced_decode"] == 512
    on.save(tmp_path / "c.json")
    assert Contract.load(tmp_path / "c.json") == on
    assert Contract.from_dict({k: v for k, v in Contract().to_dict().items()}) == Contract()  # old cards read as off
    for bad in (-1, 16, 1.5, True, "512"):
        with pytest.raises(ValueError):
            Contract(reduced_decode=bad)
    assert [on.decode_reduction(*s) for s in ((4096, 100), (2048, 3000), (1100, 900), (1023, 1023), (600, 400))] == [8, 4, 2, 1, 1]
    assert Contract().decode_reduction(8000, 8000) == 1


def test_reduced_jpeg_keeps_the_original_size_and_approximates_the_full_decode():
    pixels = to_8bit(make_phantom(2048, 1600, seed=6).pixels)
    data = encode(pixels, ".jpg")
    full = load_image(data)
    reduced = load_image(data, contract=Contract(reduced_decode=512))
    assert full.meta.reduced == 1 and full.pixels.shape == (2048, 1600)
    assert reduced.meta.reduced == 4 and reduced.pixels.shape == (512, 400) and reduced.pixels.dtype == np.uint8
    assert reduced.meta.size == full.meta.size == (1600, 2048)
    area = cv2.resize(full.pixels.astype(np.float32), (400, 512), interpolation=cv2.INTER_AREA)
    assert np.abs(area - reduced.pixels).mean() < 2.0
    png = load_image(encode(pixels, ".png"), contract=Contract(reduced_decode=512))  # PNG has no reduced decode
    assert png.meta.reduced == 1 and png.pixels.shape == (2048, 1600)


def test_reduced_jpeg2000_dicom_uses_resolution_levels():
    stored = make_phantom(1200, 1000, seed=7).pixels
    data = make_dicom(stored, compress="jpeg2000", window=(2000.0, 4000.0))  # a fixed display rule (min-max would
    full = load_image(data)  # stretch the reduced image's own, smoother, extremes)
    reduced = load_image(data, contract=Contract(reduced_decode=256))
    assert reduced.meta.reduced == 4 and reduced.meta.dicom["decoder"] == "pillow-reduced"
    assert reduced.pixels.shape == (300, 250) and reduced.meta.size == full.meta.size == (1000, 1200)
    area = cv2.resize(full.pixels.astype(np.float32), (250, 300), interpolation=cv2.INTER_AREA)
    assert np.abs(area - reduced.pixels).mean() < 3.0  # same display rule, same value scale (bit shift undone)
    rle = load_image(make_dicom(stored, compress="rle"), contract=Contract(reduced_decode=256))
    assert rle.meta.reduced == 1 and rle.pixels.shape == (1200, 1000)


def test_reduced_decoding_still_refuses_a_bomb_before_decoding(monkeypatch):
    def never(*a, **k):
        raise AssertionError("decoded although over budget")

    on = Contract(reduced_decode=256)
    jpeg = encode(np.zeros((3000, 3000), np.uint8), ".jpg")  # a few kB that decode to 9 MP
    monkeypatch.setattr(image_mod.cv2, "imdecode", never)
    with pytest.raises(ImageDecodeError) as err:
        load_image(jpeg, contract=on, max_pixels=4_000_000)
    assert err.value.kind == "too_many_pixels"
    with pytest.raises(ImageDecodeError) as err:
        load_image(jpeg, contract=on, max_memory=5_000_000)
    assert err.value.kind == "over_budget"
    dicom = make_dicom(np.zeros((2000, 2000), np.uint16), compress="jpeg2000")
    monkeypatch.setattr(image_mod, "j2k_reduced_frame", never)
    monkeypatch.setattr(image_mod, "decode_dicom_frame", never)
    with pytest.raises(ImageDecodeError) as err:
        load_image(dicom, contract=on, max_memory=10_000_000)
    assert err.value.kind == "over_budget"


def test_predictor_with_reduced_decoding_maps_boxes_to_original_pixels(tmp_path):
    from bone_r.draw import overlay_for
    from inference import Predictor

    data = encode(to_8bit(make_phantom(2000, 1600, seed=8).pixels), ".jpg")
    boxes = [[0.5, 0.5, 0.2, 0.1, 0.9]]
    plain = Predictor(write_fake_model(tmp_path / "a", boxes, contract={"max_side": 512}))
    reduced = Predictor(write_fake_model(tmp_path / "b", boxes, contract={"max_side": 512, "reduced_decode": 512}))
    a, b = plain.predict(data), reduced.predict(data)
    assert reduced.detector.seen_shapes == plain.detector.seen_shapes == [(512, 410, 3)]
    np.testing.assert_allclose(b.detections[0].xyxy, a.detections[0].xyxy, atol=4)
    loaded = load_image(data, contract=reduced.contract)
    assert loaded.meta.reduced == 2 and overlay_for(b, loaded).shape[1] == 1600  # drawn at the original size
