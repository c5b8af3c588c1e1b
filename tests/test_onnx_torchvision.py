"""torchvision detectors in the onnx backend: exported by scripts/export_onnx.py, boxes equal to the PyTorch backend's.

The models compared are tiny, fixed-seed, randomly initialized Faster R-CNN and FCOS
(EfficientNet-Lite0 + FPN at imgsz 128) whose backbone is re-initialized (He) and whose
heads are set so that they give tens of content-dependent boxes with spread scores on
every phantom (no sliver boxes, whose IoU would jump with float noise): an error in
the resize rule, the box mapping, NMS or the graph rewrites of the export would move
or drop boxes. A third, Faster R-CNN on ImageNet EfficientNet-Lite2 (its frozen norms and
stride-2 paddings as trained) with random heads, covers the other backbone family.
Both backends see the same harmonized pixels through `inference.Predictor`.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bone_r.contract import Contract, harmonize
from bone_r.runs import sha256_file
from bone_r.synthetic import make_phantom
from inference import Predictor

IMGSZ = 128
# (height, width): below imgsz (torchvision's bilinear upscale), above it (area downscale), above the contract's max_side
PHANTOM_SIZES = [(100, 80), (300, 200), (1400, 1000)]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread: two OpenMP threads beside another busy process on a small machine make every op wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tv_checkpoint(path: Path, arch: str, seed: int = 0, backbone: str = "effnet_lite0_fpn",
                       imagenet: bool = False) -> Path:
    """A random-but-confident torchvision checkpoint (train_torchvision.py's format) and its model card; `imagenet`:
    the backbone keeps its ImageNet weights (stem and stride <= 4 blocks frozen, as train_torchvision.py starts)."""
    from models.backbones import EFFNET_BACKBONES, effnet_lite
    from models.torchvision_det import build_model, default_config

    torch.manual_seed(seed)
    frozen = effnet_lite(EFFNET_BACKBONES[backbone]).frozen_blocks if imagenet else 0
    config = default_config(arch, backbone, IMGSZ, fpn_channels=64, box_head_dim=64, freeze_blocks=frozen)
    model = build_model(config, pretrained_backbone=imagenet).eval()
    with torch.no_grad():
        for module in (model.backbone.fpn if imagenet else model.backbone).modules():  # He init: features that vary
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    torch.nn.init.normal_(module.bias, std=0.1)
        if arch == "fasterrcnn":  # class scores that differ from box to box
            torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.01)
            torch.nn.init.zeros_(model.roi_heads.box_predictor.cls_score.bias)
        else:  # FCOS: boxes a few strides wide (none clipped to nothing in the padding), spread scores
            torch.nn.init.normal_(model.head.regression_head.bbox_reg.weight, std=0.01)
            torch.nn.init.constant_(model.head.regression_head.bbox_reg.bias, 4.0)
            torch.nn.init.normal_(model.head.classification_head.cls_logits.weight, std=0.05)
    torch.save({"model": model.state_dict(), "config": config}, path)
    card = {"name": path.stem, "backend": arch, "imgsz": IMGSZ, "classes": ["fracture"],
            "contract": Contract(clahe_clip=2.0, max_side=1024).to_dict(), "model_config": config}
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


def make_yolo_like_onnx(path: Path) -> Path:
    """A minimal ONNX graph shaped like an Ultralytics export: (1, 3, h, w) -> (1, 5, 2) = cx cy w h score, 2 boxes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    boxes = np.array([[[20.0, 40.0], [30.0, 20.0], [10.0, 16.0], [8.0, 6.0], [0.9, 0.1]]], np.float32)  # columns = boxes
    graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["images"], ["peak"], keepdims=0),  # uses the input, output does not depend on it
         helper.make_node("Mul", ["peak", "zero"], ["nothing"]),
         helper.make_node("Add", ["table", "nothing"], ["output0"])],
        "yolo_like",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 5, 2])],
        [numpy_helper.from_array(boxes, "table"), numpy_helper.from_array(np.zeros((), np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in {"stride": "32", "names": "{0: 'fracture'}", "imgsz": "[64, 64]"}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def _cut_between_scores(scores: list[float], gap: float = 1e-4) -> float:
    """A level near the median score that lies clearly between two scores (not on one, where float noise decides)."""
    ranked = sorted(scores)
    for k in sorted(range(1, len(ranked)), key=lambda i: abs(i - len(ranked) // 2)):
        if ranked[k] - ranked[k - 1] > gap:
            return (ranked[k] + ranked[k - 1]) / 2
    raise AssertionError("no two scores apart: the test model is degenerate")


@pytest.fixture(scope="module")
def tv_models(tmp_path_factory):
    from models.export import export_onnx
    from scripts.export_onnx import main as export_main

    folder = tmp_path_factory.mktemp("tv_onnx")
    images = []
    for i, (h, w) in enumerate(PHANTOM_SIZES):
        path = folder / f"phantom_{w}x{h}.png"
        cv2.imwrite(str(path), make_phantom(h, w, seed=40 + i, bits=16).pixels)
        images.append(path)
    (folder / "frcnn").mkdir()
    frcnn = make_tv_checkpoint(folder / "frcnn" / "best.pth", "fasterrcnn")
    fcos = make_tv_checkpoint(folder / "fcos.pth", "fcos", seed=1)
    lite2 = make_tv_checkpoint(folder / "lite2.pth", "fasterrcnn", seed=2, backbone="effnet_lite2_fpn", imagenet=True)
    # Faster R-CNN through the CLI, its own box check included (exit 0 = every box matched); --threads sets torch's
    # threads and OMP/ORT variables in this process: restored afterwards
    frcnn_onnx = folder / "exported" / "frcnn.onnx"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "BONE_R_ORT_THREADS"):
            mp.delenv(key, raising=False)
        rc = export_main(["--weights", str(frcnn), "--out", str(frcnn_onnx), "--check", *map(str, images),
                          "--conf", "0.001", "--threads", "1"])
        fcos_onnx = export_onnx(fcos, folder / "exported" / "fcos.onnx")
        lite2_onnx = export_onnx(lite2, folder / "exported" / "lite2.onnx")
    torch.set_num_threads(threads)
    assert rc == 0
    return {"fasterrcnn": (frcnn, frcnn_onnx), "fcos": (fcos, fcos_onnx), "fasterrcnn-lite2": (lite2, lite2_onnx),
            "images": images, "folder": folder}


@pytest.mark.parametrize("arch", ["fasterrcnn", "fcos", "fasterrcnn-lite2"])
def test_onnx_boxes_match_pytorch_through_the_predictor(tv_models, arch):
    from bone_r.metrics import match_detections

    pth, onnx_path = tv_models[arch]
    pt, ox = Predictor(pth), Predictor(onnx_path)
    assert pt.detector.name.startswith(arch.split("-")[0]) and ox.detector.format == "torchvision"
    assert pt.contract == ox.contract == Contract(clahe_clip=2.0, max_side=1024)
    compared = 0
    for path, (h, w) in zip(tv_models["images"], PHANTOM_SIZES):
        a = pt.predict(path, conf=0.001, hints=False)
        b = ox.predict(path, conf=0.001, hints=False)
        assert (b.width, b.height) == (w, h)
        for conf in (0.001, _cut_between_scores([d.score for d in a.detections])):  # every box, and about the upper half
            result = match_detections(a.detections, b.detections, conf, iou_min=0.99, score_tol=1e-3)
            assert result["ok"], (path.name, conf, result)
            assert result["max_coord_diff"] < 0.05, (path.name, result)  # in original pixels: the same boxes
            compared += result["matched"]
        assert all(0 <= d.xyxy[0] <= d.xyxy[2] <= w and 0 <= d.xyxy[1] <= d.xyxy[3] <= h for d in b.detections)
    assert compared >= 40  # a real comparison, not an empty one


@pytest.mark.parametrize("arch", ["fasterrcnn", "fasterrcnn-lite2"])
def test_onnx_to_pth_recovers_the_checkpoint(tv_models, arch, capsys):
    """scripts/onnx_to_pth.py on an export: every tensor comes back (each frozen norm as the scale and shift the graph
    folded it into), and the recovered checkpoint gives the ONNX file's boxes (its own --check, float32: exit 0)."""
    from torchvision.ops import FrozenBatchNorm2d

    from models.torchvision_det import build_model
    from scripts.onnx_to_pth import main as recover_main

    pth, onnx_path = tv_models[arch]
    out = onnx_path.with_suffix(".pth")  # beside the export: its card (contract, config) serves both, as in weights/
    rc = recover_main(["--onnx", str(onnx_path), "--out", str(out), "--check", *map(str, tv_models["images"])])
    captured = capsys.readouterr()
    assert rc == 0, captured
    rows = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    assert len(rows) == len(PHANTOM_SIZES) and sum(row["matched"] for row in rows) >= 10  # a real comparison
    original, recovered = torch.load(pth, weights_only=True), torch.load(out, weights_only=True)
    assert recovered["config"] == original["config"] and set(recovered["model"]) == set(original["model"])
    norms = {name: m.eps for name, m in build_model(original["config"]).named_modules() if isinstance(m, FrozenBatchNorm2d)}
    assert len(norms) > 40
    for key, value in original["model"].items():
        if key.rpartition(".")[0] not in norms:
            assert torch.equal(recovered["model"][key], value), key
    for name, eps in norms.items():
        folded = []
        for state in (original["model"], recovered["model"]):
            scale = state[f"{name}.weight"] * (state[f"{name}.running_var"] + eps).rsqrt()
            folded.append((scale, state[f"{name}.bias"] - state[f"{name}.running_mean"] * scale))
        torch.testing.assert_close(folded[1], folded[0], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("shape", [(373, 454), (454, 373), (100, 80), (300, 211), (7, 5)])
def test_preprocessing_gives_torchvisions_bits(tv_models, shape):
    """The ONNX backend's input equals, bit for bit, the tensor the PyTorch backend's model sees after torchvision's
    normalize + resize (a channels-last tensor, as TorchvisionDetector builds it); gray and colour images."""
    from torchvision.models.detection.transform import _resize_image_and_masks

    from models import build_detector

    _, tv_onnx = tv_models["fasterrcnn"]
    detector = build_detector("onnx", tv_onnx, imgsz=IMGSZ)
    transform = Predictor(tv_models["fasterrcnn"][0]).detector.model.transform
    rng = np.random.default_rng(shape[0])
    gray = rng.integers(0, 256, shape, dtype=np.uint8)
    for rgb in (np.repeat(gray[..., None], 3, axis=2), rng.integers(0, 256, (*shape, 3), dtype=np.uint8)):
        blob, (ih, iw), (oh, ow) = detector.preprocess_torchvision(rgb)
        tensor = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)  # TorchvisionDetector
        if max(shape) > IMGSZ:  # the area step comes first in both: compare from its output
            small = cv2.resize(rgb, (iw, ih), interpolation=cv2.INTER_AREA)
            tensor = torch.from_numpy(small).permute(2, 0, 1).float().div_(255.0)
        expected, _ = _resize_image_and_masks(transform.normalize(tensor), IMGSZ, IMGSZ)
        assert blob.shape == (1, 3, oh, ow) == (1, *expected.shape) and blob.dtype == np.float32
        assert np.array_equal(blob[0], expected.numpy()), np.abs(blob[0] - expected.numpy()).max()


def test_export_writes_card_and_metadata(tv_models):
    import onnx

    pth, onnx_path = tv_models["fasterrcnn"]
    card = json.loads(onnx_path.with_suffix(".json").read_text())
    assert card["backend"] == "onnx" and card["imgsz"] == IMGSZ
    assert card["contract"] == Contract(clahe_clip=2.0, max_side=1024).to_dict()
    export = card["export"]
    assert export["source_backend"] == "fasterrcnn" and export["format"] == "onnx" and export["imgsz"] == IMGSZ
    assert export["from_sha256"] == sha256_file(pth) and export["opset"] >= 16 and export["dynamic"] is True
    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    assert meta["bone_r_format"] == "torchvision" and meta["source_backend"] == "fasterrcnn"
    assert meta["imgsz"] == str(IMGSZ) and json.loads(meta["classes"]) == ["fracture"]
    assert not (pth.parent / "best.onnx").exists()  # nothing written beside the input


def test_infer_backend_and_build_detector_pick_the_right_onnx_path(tv_models, tmp_path):
    from models import build_detector, infer_backend
    from models.onnx import OnnxDetector

    _, tv_onnx = tv_models["fasterrcnn"]
    yolo_onnx = make_yolo_like_onnx(tmp_path / "yolo_like.onnx")
    assert infer_backend(tv_onnx, json.loads(tv_onnx.with_suffix(".json").read_text())) == "onnx"  # the card's word
    assert infer_backend(yolo_onnx) == "onnx"  # no card: the suffix
    tv = build_detector("onnx", tv_onnx)
    assert isinstance(tv, OnnxDetector) and tv.format == "torchvision" and tv.arch == "fasterrcnn" and tv.imgsz == IMGSZ
    yolo = build_detector("onnx", yolo_onnx)
    assert isinstance(yolo, OnnxDetector) and yolo.format == "yolo" and yolo.imgsz == (64, 64)
    # the YOLO path decodes its (1, 5, N) table: one box above 0.5, cx cy w h -> xyxy on a square image
    square = harmonize(make_phantom(64, 64, seed=3, bits=8).pixels, Contract())
    dets = yolo.predict(square, 0.5)
    assert [tuple(round(v, 3) for v in d.xyxy) for d in dets] == [(15.0, 26.0, 25.0, 34.0)]
    assert dets[0].score == pytest.approx(0.9)
    # a torchvision export without its card still runs as one (its metadata says so), at its own imgsz
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(tv_onnx.read_bytes())
    predictor = Predictor(bare)
    assert predictor.detector.format == "torchvision" and predictor.contract == Contract()


def test_unknown_export_format_is_a_clear_error(tmp_path):
    import onnx

    from models import build_detector

    path = make_yolo_like_onnx(tmp_path / "other.onnx")
    model = onnx.load(str(path))
    model.metadata_props.add(key="bone_r_format", value="detr")
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match="'detr' export"):
        build_detector("onnx", path)


def test_export_refuses_bad_requests_with_one_line(tv_models, capsys):
    from scripts.export_onnx import main as export_main

    pth, _ = tv_models["fasterrcnn"]
    out_dir = tv_models["folder"] / "refused"
    cases = [
        (["--out", str(pth.with_suffix(".onnx"))], "share its model card"),
        (["--out", str(out_dir / "a.onnx"), "--static"], "drop --static"),
        (["--out", str(out_dir / "b.onnx"), "--imgsz", "256"], "trained at imgsz 128"),
        (["--out", str(out_dir / "c.onnx"), "--opset", "13"], "opset >= 16"),
        (["--out", str(out_dir / "d.onnx"), "--bench", "3"], "--bench times the --check images"),
    ]
    for extra, message in cases:
        assert export_main(["--weights", str(pth), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, err
    assert not out_dir.exists()


def test_runtime_choice(tv_models, tmp_path, monkeypatch):
    from models import build_detector

    _, tv_onnx = tv_models["fasterrcnn"]
    with pytest.raises(ValueError, match="unknown ONNX runtime"):
        build_detector("onnx", tv_onnx, runtime="tensorrt")
    monkeypatch.setenv("BONE_R_ONNX_RUNTIME", "openvino")  # YOLO exports stay in ONNX Runtime whatever is asked
    assert build_detector("onnx", make_yolo_like_onnx(tmp_path / "y.onnx")).runtime == "onnxruntime"


def test_openvino_runtime_gives_the_same_boxes(tv_models, monkeypatch):
    """Optional: OpenVINO (``pip install openvino``) runs torchvision exports about 17% faster; boxes must not move."""
    pytest.importorskip("openvino")
    from bone_r.metrics import match_detections

    _, tv_onnx = tv_models["fasterrcnn"]
    ort_predictor = Predictor(tv_onnx)
    monkeypatch.setenv("BONE_R_ONNX_RUNTIME", "openvino")
    ov_predictor = Predictor(tv_onnx)
    assert ov_predictor.detector.runtime == "openvino"
    for path in tv_models["images"]:
        a = ort_predictor.predict(path, conf=0.001, hints=False).detections
        b = ov_predictor.predict(path, conf=0.001, hints=False).detections
        result = match_detections(a, b, 0.001, iou_min=0.99, score_tol=1e-3)
        assert result["ok"] and result["matched"] > 10, (path.name, result)


def test_store_fp16_halves_the_file_and_keeps_the_boxes(tv_models):
    """--store-fp16: big tensors stored as float16 and cast back in the graph; the file shrinks to about half, the
    graph still computes in float32 and gives the float32 export's boxes (weights rounded by <= 2^-11 relative)."""
    import onnx

    from models.export import export_onnx

    pth, fp32_path = tv_models["fasterrcnn"]
    fp16_path = export_onnx(pth, tv_models["folder"] / "fp16" / "frcnn.onnx", store_fp16=True)
    ratio = fp16_path.stat().st_size / fp32_path.stat().st_size
    assert 0.45 < ratio < 0.6, ratio
    proto = onnx.load(str(fp16_path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["weights_storage"] == "float16" and meta["bone_r_format"] == "torchvision"
    halves = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert halves and all(t.name.endswith("_fp16") for t in halves)
    assert sum(n.op_type == "Cast" and n.input[0].endswith("_fp16") for n in proto.graph.node) == len(halves)
    export = json.loads(fp16_path.with_suffix(".json").read_text())["export"]
    assert export["weights_storage"] == "float16" and export["float16_tensors"] == len(halves)
    assert 0 < export["float16_max_abs_error"] < 1e-2
    from bone_r.metrics import box_iou

    a, b = Predictor(fp32_path), Predictor(fp16_path)
    for path in tv_models["images"]:
        # the top 20 boxes: lower down, an untrained model's near-tied scores and the 100-box cap let rounding
        # swap which boxes survive NMS, which says nothing about the export
        top = sorted(a.predict(path, conf=0.001, hints=False).detections, key=lambda d: -d.score)[:20]
        other = b.predict(path, conf=0.001, hints=False).detections
        ious = box_iou(np.array([d.xyxy for d in top]), np.array([d.xyxy for d in other]))
        for i, det in enumerate(top):
            partners = [j for j in np.flatnonzero(ious[i] > 0.95) if abs(other[j].score - det.score) < 2e-2]
            assert partners, (path.name, i, det.score)


def test_fp16_checkpoint_is_what_the_onnx_holds(tv_models, capsys):
    """--fp16-checkpoint: the bundle candidate's .pth (float16 storage, no optimizer, its card) is written first and
    exported, so the .pth and the float16-stored .onnx hold the same weights and give the same boxes."""
    from models.torchvision_det import load_checkpoint
    from scripts.export_onnx import main as export_main

    src, _ = tv_models["fasterrcnn"]
    ckpt = torch.load(src, weights_only=True)
    ckpt["optimizer"] = {"state": {}, "param_groups": []}  # as in a last.pth
    full = tv_models["folder"] / "with_opt" / "last.pth"
    full.parent.mkdir()
    torch.save(ckpt, full)
    full.with_suffix(".json").write_text(src.with_suffix(".json").read_text())
    cand = tv_models["folder"] / "cand"
    images = [str(p) for p in tv_models["images"][:2]]
    rc = export_main(["--weights", str(full), "--fp16-checkpoint", str(cand / "m.pth"), "--out", str(cand / "m.onnx"),
                      "--store-fp16", "--check", *images, "--conf", "0.001", "--threads", "1"])
    assert rc == 0, capsys.readouterr()
    half = load_checkpoint(cand / "m.pth")
    assert half["stored_dtype"] == "float16" and "optimizer" not in half
    floats = [k for k, v in ckpt["model"].items() if v.is_floating_point()]
    assert floats and all(half["model"][k].dtype == torch.float16 for k in floats)
    assert all(torch.equal(half["model"][k], ckpt["model"][k].half()) for k in floats)
    card = json.loads((cand / "m.json").read_text())  # one card for both, as in weights/: the export's
    assert card["model_config"] == ckpt["config"] and card["backend"] == "onnx"
    assert card["export"]["weights_storage"] == "float16"
    assert export_main(["--weights", str(full), "--fp16-checkpoint", str(full), "--out", str(cand / "x.onnx")]) == 2
    assert "must not overwrite" in capsys.readouterr().err
    assert export_main(["--weights", str(full), "--fp16-checkpoint", str(cand / "m.pt"), "--out", str(cand / "x.onnx")]) == 2
    assert "takes a torchvision .pth and writes a .pth" in capsys.readouterr().err
    assert not (cand / "m.pt").exists() and not (cand / "x.onnx").exists()


def test_onnx_to_pth_reads_weights_stored_as_float16(tv_models, tmp_path):
    """An export with --store-fp16 (weights as <name>_fp16 cast back in the graph) gives the same tensors, rounded."""
    import onnx

    from models.export import store_weights_fp16
    from scripts.onnx_to_pth import recover_state

    _, fp32_path = tv_models["fasterrcnn"]
    config = json.loads(fp32_path.with_suffix(".json").read_text())["model_config"]
    proto = onnx.load(str(fp32_path))
    stored = store_weights_fp16(proto)
    onnx.save(proto, str(tmp_path / "fp16.onnx"))
    full = recover_state(fp32_path, config)
    half = recover_state(tmp_path / "fp16.onnx", config)
    assert set(half) == set(full)
    rounded = 0
    for key, value in full.items():
        same = torch.equal(half[key], value)
        rounded += not same
        assert same or torch.equal(half[key], value.half().float()), key
    assert stored["tensors"] > 0 and rounded > 0  # the large tensors came through the float16 path


def test_store_weights_fp16_leaves_small_out_of_range_and_input_tensors(tmp_path):
    """Only float32 initializers that are big, finite, within float16's range and not graph inputs are rewritten."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from models.export import store_weights_fp16

    rng = np.random.default_rng(0)
    big = rng.normal(size=(64, 64)).astype(np.float32)
    huge = big * 1e6  # beyond float16's range: would become inf
    small = rng.normal(size=(64,)).astype(np.float32)
    inits = [numpy_helper.from_array(big, "big"), numpy_helper.from_array(huge, "huge"),
             numpy_helper.from_array(small, "small")]
    nodes = [helper.make_node("MatMul", ["x", "big"], ["y1"]), helper.make_node("MatMul", ["y1", "huge"], ["y2"]),
             helper.make_node("Add", ["y2", "small"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    reference_path, half_path = tmp_path / "ref.onnx", tmp_path / "half.onnx"
    onnx.save(proto, str(reference_path))
    stats = store_weights_fp16(proto, min_elements=1024)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(half_path))
    assert stats["tensors"] == 1 and stats["values"] == 64 * 64 and stats["kept_float32"] == 2
    kinds = {t.name: t.data_type for t in proto.graph.initializer}
    assert kinds == {"big_fp16": TensorProto.FLOAT16, "huge": TensorProto.FLOAT, "small": TensorProto.FLOAT}
    x = rng.normal(size=(1, 64)).astype(np.float32)
    ref = ort.InferenceSession(str(reference_path)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(half_path)).run(None, {"x": x})[0]
    assert got.dtype == np.float32
    assert np.allclose(got, ref, rtol=2e-3, atol=np.abs(ref).max() * 2e-3)
