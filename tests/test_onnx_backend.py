"""The onnx backend: Ultralytics' letterbox/NMS/box mapping reproduced, boxes equal to the PyTorch backend's.

The model compared is a fixed-seed YOLOv8n whose convolutions are re-initialized
(He init, random class and box heads): it gives hundreds of content-dependent boxes
with scores spread over 0.5..1 on every image, which exercises letterbox, decoding,
NMS and box mapping far harder than a two-epoch phantom model (whose outputs
collapse to the same few low-score boxes on every image, so any mapping bug would
go unseen). Both backends see the same harmonized pixels through `inference.Predictor`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from bone_r.contract import Contract, harmonize
from bone_r.detection import Detection
from bone_r.synthetic import make_phantom
from inference import Predictor

IMGSZ = 160


def make_confident_yolo(path: Path, imgsz: int = IMGSZ, seed: int = 0, nc: int = 1) -> Path:
    """A fixed-seed, untrained-but-confident YOLOv8n .pt (`nc` classes) with a model card."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import torch
    import ultralytics
    import yaml
    from ultralytics import YOLO

    arch = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg" / "models" / "v8" / "yolov8.yaml").read_text())
    arch["nc"] = nc
    arch_file = path.parent / f"arch{nc}" / "yolov8n.yaml"  # the name carries the scale, n
    arch_file.parent.mkdir(parents=True, exist_ok=True)
    arch_file.write_text(yaml.safe_dump(arch))
    torch.manual_seed(seed)
    model = YOLO(str(arch_file))
    net = model.model
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Conv2d) and ".dfl" not in name:  # DFL's conv is a fixed arange, not a weight
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    head = net.model[-1]
    for seq in head.cv3:  # class logits spread widely with the image content
        torch.nn.init.normal_(seq[-1].weight, std=20.0)
        torch.nn.init.zeros_(seq[-1].bias)
    for seq in head.cv2:
        torch.nn.init.normal_(seq[-1].weight, std=50.0)  # sharp DFL distributions: boxes of many sizes
        torch.nn.init.zeros_(seq[-1].bias)
    net.names = {i: "fracture" if i == 0 else f"class{i}" for i in range(nc)}
    model.save(path)
    card = {"name": path.stem, "backend": "yolo", "imgsz": imgsz, "classes": ["fracture"],
            "contract": Contract(clahe_clip=2.0, max_side=1024).to_dict()}
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from models.export import export_onnx

    folder = tmp_path_factory.mktemp("onnx_models")
    pt = make_confident_yolo(folder / "conf.pt")
    dynamic = export_onnx(pt, folder / "onnx" / "conf.onnx", imgsz=IMGSZ, dynamic=True)
    static = export_onnx(pt, folder / "static" / "conf.onnx", imgsz=IMGSZ, dynamic=False)
    pt3 = make_confident_yolo(folder / "conf3.pt", nc=3, seed=1)  # the multi-class decode path (argmax, class-aware NMS)
    onnx3 = export_onnx(pt3, folder / "onnx" / "conf3.onnx", imgsz=IMGSZ, dynamic=True)
    images = {}
    for i, (h, w) in enumerate([(160, 128), (300, 200), (2500, 2000), (200, 333), (256, 256)]):
        path = folder / f"phantom_{w}x{h}.png"
        cv2.imwrite(str(path), make_phantom(h, w, seed=100 + i, bits=16).pixels)
        images[(h, w)] = path
    return {"pt": pt, "onnx": dynamic, "static": static, "pt3": pt3, "onnx3": onnx3, "images": images}


def test_letterbox_matches_ultralytics():
    from ultralytics.data.augment import LetterBox

    from models.onnx import letterbox_params

    for shape in [(1024, 819), (819, 1024), (300, 200), (33, 500), (640, 640), (100, 80)]:
        img = np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8)
        for auto, new in ((True, (640, 640)), (False, (640, 640)), (True, (160, 160)), (False, (512, 512))):
            ref = LetterBox(new, auto=auto, stride=32)(image=img)
            new_unpad, top, bottom, left, right, padded = letterbox_params(shape, new, auto)
            assert padded == ref.shape[:2], (shape, new, auto)
            # the same pixels where the image lies, gray 114 in the padding
            assert np.all(ref[:top] == 114) and np.all(ref[:, :left] == 114)
            assert np.all(ref[top + new_unpad[1]:] == 114) and np.all(ref[:, left + new_unpad[0]:] == 114)


def test_numpy_nms_matches_torchvision():
    import torch
    import torchvision

    from models.onnx import nms

    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 100, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (300, 2))], axis=1)
    scores = rng.uniform(0, 1, 300)
    for iou in (0.3, 0.5, 0.7):
        ours = nms(boxes, scores, iou)
        ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).numpy()
        assert ours.tolist() == ref.tolist()


def test_registry_and_infer_backend_build_the_onnx_backend(models_dir):
    from models import build_detector, infer_backend
    from models.onnx import OnnxDetector

    assert infer_backend(models_dir["onnx"]) == "onnx"  # the card's word
    assert infer_backend(Path("x.onnx")) == "onnx"  # the suffix
    detector = build_detector("onnx", models_dir["onnx"])
    assert isinstance(detector, OnnxDetector) and detector.static_hw is None and detector.imgsz == (IMGSZ, IMGSZ)
    rgb = harmonize(make_phantom(300, 200, seed=5, bits=8).pixels, Contract())
    dets = detector.predict(rgb, 0.5)
    assert dets and all(isinstance(d, Detection) and d.score >= 0.5 and d.label == "fracture" for d in dets)
    assert all(0 <= d.xyxy[0] <= d.xyxy[2] <= 200 and 0 <= d.xyxy[1] <= d.xyxy[3] <= 300 for d in dets)
    assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
    assert json.loads(models_dir["onnx"].with_suffix(".json").read_text())["backend"] == "onnx"


@pytest.mark.parametrize("suffix", ["", "3"])
def test_onnx_boxes_match_pytorch_through_the_predictor(models_dir, suffix):
    from bone_r.metrics import match_detections

    pt, ox = Predictor(models_dir["pt" + suffix]), Predictor(models_dir["onnx" + suffix])
    assert pt.contract == ox.contract == Contract(clahe_clip=2.0, max_side=1024)
    compared = 0
    for (h, w), path in models_dir["images"].items():
        a = pt.predict(path, conf=0.001, hints=False)
        b = ox.predict(path, conf=0.001, hints=False)
        assert (a.width, a.height) == (b.width, b.height) == (w, h)  # boxes in original pixels
        for conf in (0.5, 0.7):  # levels where max_det (300) does not cut near-tied boxes
            result = match_detections(a.detections, b.detections, conf)
            assert {d.label for d in a.detections} == {d.label for d in b.detections}
            assert result["ok"], (path.name, conf, result)
            # stricter than IoU: the same pixels (a 1-px letterbox offset would show here)
            assert result["max_coord_diff"] is None or result["max_coord_diff"] < 0.5, (path.name, result)
            compared += result["matched"]
        assert all(d.xyxy[2] <= w and d.xyxy[3] <= h for d in b.detections)
    assert compared >= 200  # a real comparison, not an empty one


def test_static_export_runs_and_matches_on_square_images(models_dir):
    from bone_r.metrics import match_detections
    from models import build_detector

    static = build_detector("onnx", models_dir["static"])
    assert static.static_hw == (IMGSZ, IMGSZ)
    pt = build_detector("yolo", models_dir["pt"], imgsz=IMGSZ)
    square = harmonize(make_phantom(256, 256, seed=9, bits=8).pixels, Contract())
    # a square image needs no padding, so the fixed-size input equals PyTorch's rectangle
    result = match_detections(pt.predict(square, 0.001), static.predict(square, 0.001), 0.5)
    assert result["ok"] and result["matched"] > 10, result
    tall = harmonize(make_phantom(400, 200, seed=9, bits=8).pixels, Contract())
    dets = static.predict(tall, 0.5)
    assert dets and all(0 <= d.xyxy[0] <= d.xyxy[2] <= 200 and 0 <= d.xyxy[1] <= d.xyxy[3] <= 400 for d in dets)


def test_bad_onnx_file_is_a_clear_error(tmp_path):
    from models import build_detector

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        build_detector("onnx", bad)
    with pytest.raises(FileNotFoundError):
        build_detector("onnx", tmp_path / "missing.onnx")


def test_export_refuses_an_out_path_that_would_share_the_pt_card(models_dir):
    from models.export import ExportError, export_onnx

    with pytest.raises(ExportError, match="share its model card"):
        export_onnx(models_dir["pt"], models_dir["pt"].with_suffix(".onnx"))
