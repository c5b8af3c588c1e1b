"""The seams of the bone_r library: the card resolver, the one label reader, the one resize and box scaling, the
contract's rules, the modes registry, the one record matcher, the backend registry and the /detect answer."""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest

from bone_r.card import DEFAULT_IMGSZ, ModelCard, load_model_card, resolve, write_card
from bone_r.contract import (
    DICOM_VOI_RULES,
    HIGH_BIT_RULES,
    Contract,
    fit_long_side,
    harmonize,
    long_side_size,
    scale_boxes,
    to_uint8,
)
from bone_r.dataset import LabelError, read_label_rows, read_yolo_boxes, write_label_file
from bone_r.detection import BoxRule, Detection, PathIndex, Prediction, RecordIndex
from bone_r.image import ImageMeta
from bone_r.modes import MODES, REGISTRY, choose_operating_points, resolve_threshold

# ----------------------------------------------------------------------------- the card and its resolver


def test_resolver_order_is_explicit_then_card_then_defaults():
    card = ModelCard(imgsz=512, contract=Contract(max_side=800), box_rule=BoxRule(max_boxes=3), tta="hflip")
    explicit = resolve(card, imgsz=320, contract=Contract(max_side=600), box_rule=BoxRule(nms_iou=0.5), tta="none")
    assert (explicit.imgsz, explicit.contract.max_side, explicit.box_rule, explicit.tta) == (320, 600, BoxRule(nms_iou=0.5), "none")
    assert explicit.sources == {"imgsz": "explicit", "contract": "explicit", "box_rule": "explicit", "tta": "explicit"}
    from_card = resolve(card)
    assert (from_card.imgsz, from_card.contract.max_side, from_card.box_rule, from_card.tta) == (512, 800, BoxRule(max_boxes=3), "hflip")
    assert from_card.sources == {"imgsz": "model_card", "contract": "model_card", "box_rule": "model_card", "tta": "model_card"}
    defaults = resolve(None)
    assert (defaults.imgsz, defaults.contract, defaults.box_rule, defaults.tta) == (None, Contract(), BoxRule(), "none")
    assert defaults.sources == {"imgsz": "weights", "contract": "default", "box_rule": "default", "tta": "default"}  # the backend reads its file
    assert resolve(ModelCard(imgsz=512), imgsz=None).imgsz == 512  # None is "not given", never a value
    with pytest.raises(ValueError, match="tta must be one of none, hflip"):
        resolve(card, tta="rot90")


def test_card_round_trip_keeps_unknown_keys_and_checks_known_ones(tmp_path):
    data = {"name": "m", "backend": "onnx", "architecture": "x", "classes": ["fracture"], "imgsz": 512,
            "contract": Contract(max_side=900).to_dict(), "started_from": "scratch", "training": {"epochs": 3},
            "thresholds": {"balanced": {"threshold": 0.3}}, "box_rule": {"nms_iou": None, "contained": None, "max_boxes": 2},
            "tta": "hflip", "metrics": {"split": "test"}, "disclaimer": "d"}
    card = ModelCard.from_dict(data)
    assert card.contract == Contract(max_side=900) and card.box_rule == BoxRule(max_boxes=2) and card.extra["training"] == {"epochs": 3}
    assert card.to_dict() == data and list(card.to_dict())[-1] == "disclaimer"
    with pytest.raises(ValueError, match="model card: max_side must be >= 32"):
        ModelCard.from_dict(data | {"contract": {"max_side": 4}})
    assert ModelCard.from_dict({"names": {0: "fracture"}}).classes == ["fracture"]  # Ultralytics' form


def test_the_one_writer_keeps_evaluation_results_unless_told_not_to(tmp_path):
    weights = tmp_path / "best.pth"
    write_card(weights, {"name": "m", "thresholds": {"balanced": 0.4}, "metrics": {"split": "test"}})
    write_card(weights, ModelCard(name="m", imgsz=256))  # a trainer rewriting its card after evaluate.py --write-card
    card = load_model_card(weights)
    assert card.imgsz == 256 and card.thresholds == {"balanced": 0.4} and card.metrics == {"split": "test"}
    write_card(weights, ModelCard(name="m"), keep_results=False)  # an export: a new model's card
    assert load_model_card(weights).thresholds == {} and json.loads(weights.with_suffix(".json").read_text()) == {
        "name": "m", "classes": ["fracture"]}


# ----------------------------------------------------------------------------- the one label reader and writer


def test_label_reader_rules(tmp_path):
    path = tmp_path / "a.txt"

    def rows(text: str, **kw):
        path.write_text(text, encoding="utf-8")
        return read_label_rows(path, **kw)

    assert rows("") == [] and rows("\n  \n") == []  # an empty file is a valid negative
    got = rows("\ufeff0 0.5 0.5 0.2 0.4\n\n1 0.1 0.1 0.3 0.1 0.2 0.3\n")  # a BOM, a blank line, a polygon
    assert [(r.cls, r.lineno, r.is_box) for r in got] == [(0, 1, True), (1, 3, False)]
    assert got[0].xyxy() == pytest.approx((0.4, 0.3, 0.6, 0.7)) and got[1].xyxy() == pytest.approx((0.1, 0.1, 0.3, 0.3))
    for bad, words in [("0 a 0.5 0.2 0.2", "numbers expected"), ("0.5 0.5 0.5 0.2 0.2", "non-negative integer"),
                       ("-1 0.5 0.5 0.2 0.2", "non-negative integer"), ("0 0.5 0.5 0.2", "3 coordinates"),
                       ("0 0.1 0.1 0.2 0.2 0.3", "5 coordinates"), ("0 nan 0.5 0.2 0.2", "non-finite")]:
        with pytest.raises(LabelError, match=words):
            rows(bad)
    with pytest.raises(LabelError, match=r"a\.txt:2: 6 coordinates.*polygons must be boxed"):
        rows("0 0.5 0.5 0.2 0.2\n0 0.1 0.1 0.3 0.1 0.2 0.3", boxes_only=True)
    with pytest.raises(LabelError, match="single class"):
        rows("1 0.5 0.5 0.2 0.2", single_class=True)
    with pytest.raises(LabelError, match="leaves the image"):
        rows("0 0.95 0.5 0.2 0.2", inside=True)
    assert rows("0 0.9 0.5 0.2 0.2")[0].clipped() == pytest.approx((0.8, 0.4, 1.0, 0.6))
    assert rows("0 0.5 0.5 -0.2 0.2")[0].clipped() is None  # a negative size is degenerate


def test_label_writer_and_reader_round_trip(tmp_path):
    boxes = [(10.0, 20.0, 50.0, 80.0), (0.0, 0.0, 200.0, 100.0)]
    path = write_label_file(tmp_path / "labels" / "x.txt", boxes, 200, 100)
    got, classes = read_yolo_boxes(path, 200, 100)
    assert classes == {0} and np.allclose(got, boxes, atol=1e-3)
    assert write_label_file(tmp_path / "neg.txt", []).read_text() == ""


# ----------------------------------------------------------------------------- the one resize and box scaling


@pytest.mark.parametrize("shape", [(2500, 2000), (2000, 2500), (1001, 333), (640, 480), (7, 5), (513, 512), (512, 300)])
def test_long_side_resize_and_box_scaling_round_trip(shape):
    h, w = shape
    image = np.random.default_rng(0).integers(0, 256, (h, w), dtype=np.uint8)
    small = fit_long_side(image, 512)
    assert (small.shape[1], small.shape[0]) == long_side_size(w, h, 512)
    assert max(small.shape) == min(512, max(h, w)) and (small is image) == (max(h, w) <= 512)  # never upscaled
    rgb = harmonize(image, Contract(max_side=512, clahe_clip=0))
    assert rgb.shape[:2] == small.shape and np.array_equal(rgb[..., 0], small)  # harmonize resizes the same way
    boxes = np.array([[0.25 * w, 0.1 * h, 0.75 * w, 0.9 * h], [0, 0, w, h]])
    there = scale_boxes(boxes, (w, h), (small.shape[1], small.shape[0]))
    assert np.allclose(scale_boxes(there, (small.shape[1], small.shape[0]), (w, h)), boxes)
    assert np.allclose(scale_boxes([[-5, -5, w + 9, h + 9]], (w, h), (w, h)), [[0, 0, w, h]])  # clipped to the image


def test_trainer_and_backends_use_the_one_resize():
    import models.onnx
    import models.torchvision_det
    import train_torchvision

    for module in (train_torchvision, models.torchvision_det, models.onnx):
        assert module.fit_long_side is fit_long_side and "cv2.resize(" not in inspect.getsource(module).replace(
            "cv2.resize(src, new_unpad", "")  # the YOLO letterbox is Ultralytics' own rule


# ----------------------------------------------------------------------------- the contract applies its rules


def test_contract_rules_are_applied_from_the_rule_tables(monkeypatch):
    with pytest.raises(ValueError, match="high_bit_rule"):
        Contract(high_bit_rule="clip")
    with pytest.raises(ValueError, match="dicom_voi"):
        Contract(dicom_voi="raw")
    wide = np.array([[100, 300], [200, 400]], np.uint16)
    assert to_uint8(wide).tolist() == [[0, 170], [85, 255]]  # minmax
    monkeypatch.setitem(HIGH_BIT_RULES, "top", lambda g: (g >> 8).astype(np.uint8))
    assert to_uint8(wide, Contract(high_bit_rule="top")).tolist() == [[0, 1], [0, 1]]  # the contract's rule, read
    assert "standard" in DICOM_VOI_RULES


# ----------------------------------------------------------------------------- modes


def test_modes_registry_drives_choice_and_fallback():
    labels = [1, 1, 1, 0, 0, 0]
    ops = choose_operating_points(labels, [0.9, 0.6, 0.3, 0.5, 0.2, 0.1])
    assert tuple(ops) == MODES == tuple(REGISTRY)
    assert ops["screening"]["target"] == 0.95 and ops["balanced"]["target"] is None and ops["specific"]["target"] == 0.95
    assert ops["screening"]["threshold"] <= ops["balanced"]["threshold"] <= ops["specific"]["threshold"]
    for name, mode in REGISTRY.items():
        assert resolve_threshold(name, ModelCard()) == (mode.fallback, "fallback")


# ----------------------------------------------------------------------------- the one record matcher


def test_path_index_exact_then_unique_trailing_path(tmp_path):
    paths = [tmp_path / "images" / "test" / "a.png", tmp_path / "images" / "val" / "a.png", tmp_path / "images" / "test" / "b.png"]
    index = PathIndex(paths, [tmp_path])
    assert index.lookup(str(paths[1])) == 1 and index.lookup("images/test/a.png") == 0  # same path, or relative to a base
    assert index.lookup("/elsewhere/data/images/test/a.png") == 0  # made on another machine: its trailing path
    assert index.lookup("/elsewhere/a.png") is None  # two images share the name: never a guess
    assert index.lookup("/elsewhere/x/b.png") is None  # fewer than 3 shared parts
    assert PathIndex(paths, min_parts=1).lookup("/elsewhere/x/b.png") == 2
    records = RecordIndex([{"image": "/run/one/images/test/a.png"}, {"image": "/run/one/images/val/a.png"}])
    assert records.get("/other/images/val/a.png") == {"image": "/run/one/images/val/a.png"}
    assert records.get("/other/a.png") is None


# ----------------------------------------------------------------------------- backends and the service


def test_every_registered_backend_is_handed_the_resolved_size():
    from models import _REGISTRY, available_backends

    for name in available_backends():
        module, _, attr = _REGISTRY[name].partition(":")
        factory = getattr(importlib.import_module(module), attr)
        size = inspect.signature(factory).parameters.get("imgsz")
        assert size is not None and size.default is None, f"{name}: takes imgsz (None: the size its weights declare)"
        assert callable(getattr(factory, "predict", None)), name
        assert not re.search(r"(or|=|\()\s*640\b", inspect.getsource(importlib.import_module(module))), (
            f"{name}: the default size is bone_r.card.DEFAULT_IMGSZ ({DEFAULT_IMGSZ}), not the backend's own")


def test_detect_answer_is_the_predictions_record_plus_the_service_facts():
    from app.schemas import DetectResponse, detect_response

    meta = ImageMeta("png", 16, 200, 100, 1)
    prediction = Prediction("x.png", 200, 100, "balanced", 0.3, "model_card",
                            [Detection((1, 2, 30, 40), 0.9, model="m", hints=None)], {"decode_ms": 1.234}, meta)
    answer = detect_response(prediction, consult={"level": "routine-review", "text": "t"},
                             clinics={"available": False, "reason": "r"}, model={"backend": "b", "detector": "d", "weights": None},
                             more_timings_ms={"total_ms": 9.876}, overlay_png=b"png")
    record = prediction.to_record()
    for key in ("image_size", "mode", "threshold", "threshold_source", "fracture_detected", "detections"):
        assert answer[key] == record[key]
    assert answer["filename"] == "x.png" and answer["image"] == meta.to_dict() and answer["overlay_png_base64"] == "cG5n"
    assert answer["timings_ms"] == {"decode_ms": 1.23, "total_ms": 9.88}
    assert set(answer) == set(DetectResponse.model_fields)
    DetectResponse.model_validate(answer)


def test_library_imports_nothing_else_of_the_project():
    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "bone_r").glob("*.py")):
        text = path.read_text()
        for name in ("inference", "models", "app", "scripts", "evaluate", "train", "ensemble", "benchmark"):
            assert f"\nimport {name}" not in text and f"\nfrom {name} " not in text and f"\nfrom {name}." not in text, (path, name)
