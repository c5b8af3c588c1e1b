"""Harmonization, the contract, box mapping, detections, hints, modes, the registry and the CLI."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

import inference
from bone_r.card import ModelCard
from bone_r.contract import Contract, harmonize, harmonized_size, scale_boxes
from bone_r.detection import BoxRule, Detection, Prediction, guess_type_and_severity
from bone_r.draw import overlay_for
from bone_r.image import load_image
from bone_r.modes import FALLBACK_THRESHOLDS, resolve_threshold
from bone_r.runs import ROOT
from bone_r.synthetic import encode, make_dicom, make_phantom, to_8bit
from fakes import write_fake_model
from inference import Predictor

# ----------------------------------------------------------------------------- contract


def test_contract_defaults_are_the_documented_ones():
    c = Contract()
    assert (c.clahe_clip, c.clahe_grid, c.max_side) == (2.0, 8, 1024)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_contract_roundtrip(tmp_path, suffix):
    c = Contract(clahe_clip=3.5, clahe_grid=4, max_side=640)
    assert Contract.load(c.save(tmp_path / f"c{suffix}")) == c


def test_contract_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown contract keys"):
        Contract.from_dict({"clahe_clip": 2.0, "gamma": 1.2})
    with pytest.raises(ValueError, match="max_side"):
        Contract(max_side=0)
    with pytest.raises(ValueError, match="clahe_clip"):
        Contract(clahe_clip=-1)


# ----------------------------------------------------------------------------- harmonize


def test_harmonize_shape_dtype_and_channels():
    gray = to_8bit(make_phantom(2500, 2000, seed=1).pixels)
    rgb = harmonize(gray, Contract(max_side=1024))
    assert rgb.shape == (1024, 819, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 1], rgb[:, :, 2])


def test_harmonize_never_upscales():
    gray = to_8bit(make_phantom(300, 200).pixels)
    assert harmonize(gray, Contract(max_side=1024)).shape == (300, 200, 3)


def test_harmonize_applies_clahe_as_specified():
    gray = to_8bit(make_phantom(256, 200).pixels)
    expected = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 4)).apply(gray)
    assert np.array_equal(harmonize(gray, Contract(clahe_clip=3.0, clahe_grid=4))[:, :, 0], expected)
    assert np.array_equal(harmonize(gray, Contract(clahe_clip=0))[:, :, 0], gray)  # clip 0 = off


def test_16bit_is_stretched_not_clipped():
    ph = make_phantom(256, 200, seed=2)  # 12-bit data in uint16
    out = harmonize(ph.pixels, Contract(clahe_clip=0))[:, :, 0]
    assert out.min() == 0 and out.max() == 255
    naive = (ph.pixels // 256).astype(np.uint8)  # what a /256 conversion would keep: 16 grey levels
    assert len(np.unique(out)) > 8 * len(np.unique(naive))


def test_harmonized_size_matches_harmonize():
    for w, h in [(2000, 2500), (4000, 1000), (1024, 1024), (1500, 1501)]:
        rgb = harmonize(np.zeros((h, w), np.uint8), Contract(max_side=1024, clahe_clip=0))
        assert harmonized_size(w, h, Contract(max_side=1024)) == (rgb.shape[1], rgb.shape[0])


def test_boxes_map_back_to_original_pixels():
    original, harm = (2000, 2500), (819, 1024)
    box_h = np.array([[81.9, 102.4, 409.5, 512.0]])
    back = scale_boxes(box_h, harm, original)
    np.testing.assert_allclose(back, [[200, 250, 1000, 1250]], atol=1e-6)
    clipped = scale_boxes(np.array([[-5, -5, 900, 1100]]), harm, original)
    np.testing.assert_allclose(clipped, [[0, 0, 2000, 2500]])
    np.testing.assert_allclose(scale_boxes(back, original, harm), box_h)


# ----------------------------------------------------------------------------- detections and hints


def test_detection_roundtrip_and_validation():
    d = Detection((1, 2, 30, 40), 0.75, model="m", hints={"type": "x"})
    assert Detection.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    with pytest.raises(ValueError):
        Detection((10, 10, 5, 20), 0.5)
    with pytest.raises(ValueError):
        Detection((0, 0, 1, 1), 1.5)
    with pytest.raises(ValueError):
        Detection((0, 0, float("nan"), 1), 0.5)
    with pytest.raises(ValueError):
        Detection.from_dict({"xyxy": [0, 0, 1, 1]})


@pytest.mark.parametrize(
    "box, score, kind, severity",
    [
        ((0, 0, 350, 70), 0.9, "elongated", "moderate"),  # aspect 5, area 0.0245
        ((0, 0, 500, 400), 0.5, "extensive", "possibly severe"),  # area 0.2
        ((0, 0, 30, 30), 0.3, "focal", "mild or subtle"),  # area 0.0009
        ((0, 0, 200, 200), 0.8, "focal", "possibly severe"),  # area 0.04 with high score
    ],
)
def test_hints_follow_the_documented_table(box, score, kind, severity):
    hints = guess_type_and_severity(Detection(box, score), (1000, 1000))
    assert hints["type"].startswith(kind) and hints["severity"] == severity
    assert hints["best_guess"] is True and "not a diagnosis" in hints["note"]


# ----------------------------------------------------------------------------- modes


def test_thresholds_from_card_then_fallback_then_conf():
    card = ModelCard.from_dict({"thresholds": {"screening": {"threshold": 0.05}, "balanced": {"threshold": 0.3}}})
    assert resolve_threshold("screening", card) == (0.05, "model_card")
    assert resolve_threshold("specific", card) == (FALLBACK_THRESHOLDS["specific"], "fallback")
    assert resolve_threshold("balanced", None) == (FALLBACK_THRESHOLDS["balanced"], "fallback")
    assert resolve_threshold("balanced", card, conf=0.9) == (0.9, "conf")
    with pytest.raises(ValueError, match="unknown mode 'loose'; choose one of screening, balanced, specific"):
        resolve_threshold("loose", card)
    with pytest.raises(ValueError):
        resolve_threshold("balanced", card, conf=1.5)


# ----------------------------------------------------------------------------- registry


def test_registry_rejects_unknown_names_listing_known_ones():
    from models import available_backends, build_detector

    with pytest.raises(ValueError) as err:
        build_detector("darknet", "w.pt")
    for name in available_backends():
        assert name in str(err.value)
    assert "yolo" in available_backends()


def test_infer_backend():
    from models import infer_backend

    assert infer_backend("a/best.onnx") == "onnx"
    assert infer_backend("a/best.pt") == "yolo"
    assert infer_backend("a/x.bin", ModelCard(backend="fcos")) == "fcos"
    with pytest.raises(ValueError, match="--backend"):
        infer_backend("a/model.bin")


def test_default_weights_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(inference, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="pass --weights"):
        inference.default_weights()


# ----------------------------------------------------------------------------- prediction path


def test_predictor_maps_boxes_to_original_pixels_and_uses_card(tmp_path):
    weights = write_fake_model(tmp_path, [[0.5, 0.5, 0.2, 0.1, 0.9], [0.2, 0.2, 0.1, 0.1, 0.2]],
                               thresholds={"balanced": 0.5, "screening": 0.1}, contract={"max_side": 512})
    pred = Predictor(weights)
    ph = make_phantom(2500, 2000, seed=0)
    result = pred.predict(encode(ph.pixels, ".png"), mode="balanced")
    assert pred.detector.seen_shapes == [(512, 410, 3)]  # the card's contract was applied
    assert (result.width, result.height) == (2000, 2500)
    assert result.threshold == 0.5 and result.threshold_source == "model_card"
    assert len(result.detections) == 1 and result.fracture_detected
    np.testing.assert_allclose(result.detections[0].xyxy, (800, 1125, 1200, 1375), atol=3)
    assert result.detections[0].hints["best_guess"] is True
    screening = pred.predict(encode(ph.pixels, ".png"), mode="screening")
    assert len(screening.detections) == 2
    low = pred.predict(encode(ph.pixels, ".png"), mode="specific", min_score=0.001)
    assert len(low.detections) == 2 and low.threshold == FALLBACK_THRESHOLDS["specific"]


def test_offline_and_prediction_paths_see_identical_pixels(tmp_path):
    """preprocess.py's stored PNG, read back as training reads it, equals what Predictor feeds the model."""
    from scripts import preprocess

    src = tmp_path / "in"
    src.mkdir()
    samples = {
        "a16.png": encode(make_phantom(1500, 1200, seed=1).pixels, ".png"),
        "b.jpg": encode(to_8bit(make_phantom(300, 240, seed=2).pixels), ".jpg"),
        "c.dcm": make_dicom(make_phantom(1300, 1100, seed=3).pixels, window=(2000.0, 4000.0), photometric="MONOCHROME1"),
    }
    for name, data in samples.items():
        (src / name).write_bytes(data)
    contract = Contract(max_side=1024)
    contract.save(tmp_path / "contract.json")
    assert preprocess.main([str(src), str(tmp_path / "out"), "--contract", str(tmp_path / "contract.json"), "--workers", "1", "--quiet"]) == 0
    weights = write_fake_model(tmp_path / "m", [[0.5, 0.5, 0.1, 0.1, 0.9]], contract=contract.to_dict())
    predictor = Predictor(weights)
    seen = []
    predictor.detector.predict = lambda rgb, conf: seen.append(rgb) or []
    for name, data in samples.items():
        offline = cv2.imread(str(tmp_path / "out" / f"{name.rsplit('.', 1)[0]}.png"), cv2.IMREAD_COLOR)  # as Ultralytics reads it
        predictor.predict(data)
        assert np.array_equal(offline[:, :, ::-1], seen[-1]), name


# ----------------------------------------------------------------------------- CLI


def test_cli_single_image(tmp_path, capsys):
    weights = write_fake_model(tmp_path / "m", [[0.5, 0.5, 0.2, 0.2, 0.8]])
    img = tmp_path / "x.png"
    img.write_bytes(encode(make_phantom(400, 300).pixels, ".png"))
    rc = inference.main(["--image", str(img), "--weights", str(weights), "--out", str(tmp_path / "o.png"), "--json", str(tmp_path / "o.json")])
    assert rc == 0
    rec = json.loads((tmp_path / "o.json").read_text())
    assert rec["fracture_detected"] is True and rec["image_size"] == [300, 400]
    np.testing.assert_allclose(rec["detections"][0]["xyxy"], [120, 160, 180, 240], atol=0.01)
    overlay = cv2.imread(str(tmp_path / "o.png"))
    assert overlay.shape[1] == 300 and overlay.shape[0] > 400  # the image plus the disclaimer band
    assert "FRACTURE SUSPECTED" in capsys.readouterr().out


def test_cli_folder_json_csv_and_a_bad_file(tmp_path, capsys):
    weights = write_fake_model(tmp_path / "m", [[0.5, 0.5, 0.2, 0.2, 0.4]])
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(encode(make_phantom(200, 160).pixels, ".png"))
    (folder / "sub" / "b").write_bytes(make_dicom(make_phantom(220, 180).pixels))  # no suffix: found by content
    (folder / "bad.jpg").write_bytes(b"not a jpeg at all")
    (folder / "notes.txt").write_text("ignored: not an image")
    rc = inference.main(["--image", str(folder), "--weights", str(weights), "--json", str(tmp_path / "r.json"),
                         "--csv", str(tmp_path / "r.csv"), "--mode", "screening"])
    assert rc == 1  # one file failed: reported, not skipped silently
    records = json.loads((tmp_path / "r.json").read_text())
    assert [r["image"].rsplit("/", 1)[-1] for r in records] == ["a.png", "bad.jpg", "b"]
    assert "error" in records[1] and all(r["fracture_detected"] for r in (records[0], records[2]))
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == 3 and rows[1]["error"]
    assert "bad.jpg" in capsys.readouterr().err


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys, monkeypatch):
    assert inference.main(["--image", str(tmp_path / "missing.png")]) == 2
    img = tmp_path / "x.png"
    img.write_bytes(encode(make_phantom(64, 64).pixels, ".png"))
    monkeypatch.setattr(inference, "WEIGHTS_DIR", tmp_path / "none")
    assert inference.main(["--image", str(img)]) == 2
    assert "pass --weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        inference.main(["--image", str(img), "--mode", "loose"])


def test_import_has_no_side_effects():
    import subprocess
    import sys

    code = "import sys, inference, models; print(sorted(m for m in ('torch','ultralytics','pydicom') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_load_image_output_matches_overlay_size(tmp_path):
    ph = make_phantom(300, 200)
    loaded = load_image(encode(ph.pixels, ".png"))
    pred = Prediction("x", 200, 300, "balanced", 0.5, "conf", [Detection((10, 10, 50, 50), 0.9, model="a")], {})
    out = overlay_for(pred, loaded)
    assert out.shape[1] == 200 and out.shape[0] > 300 and out.dtype == np.uint8


# --------------------------------------------------------------------------- one box per finding


NESTED = [  # (xyxy, score): a fracture boxed four times over, and one elsewhere
    ((10, 10, 50, 50), 0.9), ((12, 12, 48, 48), 0.8), ((20, 20, 30, 30), 0.7), ((60, 60, 90, 90), 0.6), ((61, 61, 89, 89), 0.5),
]


def _dets(rows):
    return [Detection(box, score) for box, score in rows]


@pytest.mark.parametrize("rule, kept", [
    (BoxRule(), [0.9, 0.8, 0.7, 0.6, 0.5]),
    (BoxRule(nms_iou=0.5), [0.9, 0.7, 0.6]),  # the small box inside overlaps little: NMS keeps it
    (BoxRule(nms_iou=0.5, contained=0.8), [0.9, 0.6]),
    (BoxRule(contained=0.8), [0.9, 0.6]),
    (BoxRule(max_boxes=2), [0.9, 0.8]),
    (BoxRule(nms_iou=0.5, max_boxes=1), [0.9]),
])
def test_box_rule_keeps_known_boxes(rule, kept):
    shuffled = _dets(NESTED[::-1])  # the order given does not matter
    assert [d.score for d in rule.apply(shuffled)] == kept


def test_box_rule_commutes_with_a_score_threshold():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 80, (40, 2))
    boxes = np.hstack([xy, xy + rng.uniform(5, 30, (40, 2))])
    scores = rng.uniform(0, 1, 40)
    rule = BoxRule(nms_iou=0.4, contained=0.7, max_boxes=6)
    for t in (0.2, 0.5, 0.8):
        then_threshold = [i for i in rule.keep(boxes, scores) if scores[i] >= t]
        above = np.flatnonzero(scores >= t)
        threshold_first = [above[i] for i in rule.keep(boxes[above], scores[above])]
        assert then_threshold == threshold_first


def test_box_rule_refuses_bad_settings():
    for bad in ({"nms_iou": 0}, {"contained": 1.5}, {"max_boxes": 0}, {"iou": 0.5}):
        with pytest.raises(ValueError, match="box rule"):
            BoxRule.from_dict(bad)


def test_predictor_applies_the_cards_box_rule(tmp_path):
    boxes = [[0.5, 0.5, 0.4, 0.4, 0.9], [0.5, 0.5, 0.38, 0.38, 0.8], [0.5, 0.5, 0.1, 0.1, 0.7], [0.15, 0.15, 0.1, 0.1, 0.6]]
    weights = write_fake_model(tmp_path / "m", boxes)
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), make_phantom(120, 100, seed=0, bits=8).pixels)
    assert len(inference.Predictor(weights).predict(image, conf=0.5).detections) == 4
    card = json.loads((tmp_path / "m" / "fake.json").read_text())
    (tmp_path / "m" / "fake.json").write_text(json.dumps(card | {"box_rule": {"nms_iou": 0.5, "contained": 0.8}}))
    assert [d.score for d in inference.Predictor(weights).predict(image, conf=0.5).detections] == [0.9, 0.6]


def test_predictor_applies_the_cards_mirror_tta(tmp_path):
    """tta "hflip": the model also sees the mirrored image; a finding both views see keeps its box and score, one
    that only one view sees (the fake answers by position, not content) comes back from each side at half score."""
    weights = write_fake_model(tmp_path / "m", [[0.5, 0.5, 0.2, 0.1, 0.9], [0.2, 0.3, 0.1, 0.1, 0.6]])
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), make_phantom(120, 100, seed=0, bits=8).pixels)
    plain = inference.Predictor(weights).predict(image, conf=0.01).detections
    assert [d.score for d in plain] == [0.9, 0.6]
    card = json.loads((tmp_path / "m" / "fake.json").read_text())
    (tmp_path / "m" / "fake.json").write_text(json.dumps(card | {"tta": "hflip"}))
    predictor = inference.Predictor(weights)
    assert predictor.settings.tta == "hflip" and predictor.name == "fake"
    got = predictor.predict(image, conf=0.01).detections
    assert len(predictor.detector.seen_shapes) == 2  # two views, one image
    assert [round(d.score, 6) for d in got] == [0.9, 0.3, 0.3]
    np.testing.assert_allclose(got[0].xyxy, plain[0].xyxy, atol=1e-6)
    x1, y1, x2, y2 = plain[1].xyxy
    np.testing.assert_allclose(sorted(d.xyxy for d in got[1:]), [(x1, y1, x2, y2), (100 - x2, y1, 100 - x1, y2)], atol=1e-6)
    assert len(inference.Predictor(weights, tta="none").predict(image, conf=0.01).detections) == 2  # explicit wins
    (tmp_path / "m" / "fake.json").write_text(json.dumps(card | {"tta": "vflip"}))
    with pytest.raises(ValueError, match="tta must be one of none, hflip"):
        inference.Predictor(weights)


def test_mirror_tta_scores_do_not_depend_on_the_threshold_asked_for(tmp_path):
    """A finding scored 0.8 in one view and 0.3 in the other fuses to 0.55 whether the caller asks for boxes above
    0.001 (evaluation, where thresholds are chosen) or above 0.5 (prediction at that threshold): the views are never
    cut at the caller's threshold before they are fused."""

    class TwoViews:
        name = "two-views"

        def predict(self, rgb, conf):
            w = rgb.shape[1]
            score = 0.8 if rgb[0, 0, 0] < rgb[0, -1, 0] else 0.3  # the image is darker on the left, its mirror right
            box = Detection((0.4 * w, 10, 0.6 * w, 30), score, "fracture", self.name)
            return [box] if score >= conf else []

    rgb = np.zeros((60, 100, 3), np.uint8)
    rgb[:, 50:] = 200
    predictor = inference.Predictor(detector=TwoViews(), card={"tta": "hflip"})
    low = predictor.detector.predict(rgb, 0.001)
    high = predictor.detector.predict(rgb, 0.5)
    assert [round(d.score, 6) for d in low] == [round(d.score, 6) for d in high] == [0.55]
    assert predictor.detector.predict(rgb, 0.6) == []
