"""ONNX Runtime backend for detectors exported by ``scripts/export_onnx.py``: YOLO and torchvision.

The file says what it holds: a torchvision export (Faster R-CNN, RetinaNet, FCOS)
carries ``bone_r_format = "torchvision"`` in its metadata; anything else is read as
an Ultralytics YOLO export (its own metadata: stride, names, imgsz).

No torch at prediction time, no pickles: an ``.onnx`` file is plain data. The
pre- and post-processing reproduce Ultralytics' PyTorch predictor so that boxes
match the ``.pt`` model's:

- letterbox: aspect-preserving resize (bilinear) and centred gray-114 padding.
  A dynamic-shape export gets a stride-aligned rectangle (Ultralytics' ``auto``
  letterbox for ``.pt`` models; a 4:5 radiograph at 640 runs at 512x640 instead
  of 640x640); a static export gets its fixed size.
- decode: output ``(1, 4+nc, N)`` (cx, cy, w, h, class scores), score > conf,
  NMS (IoU 0.7, per class), at most 300 boxes, then boxes mapped back with
  Ultralytics' ``scale_boxes`` arithmetic and clipped. NMS-free exports
  (``(1, N, 6)`` x1 y1 x2 y2 score class, e.g. YOLO26) are read as they are.

torchvision exports hold the detector (padding to a multiple of 32, RPN or dense
head, NMS) from a normalized model-resolution image to boxes in that image's pixels.
What comes before reproduces the PyTorch backend
(`models.torchvision_det.TorchvisionDetector.predict` + torchvision's
``GeneralizedRCNNTransform``) bit for bit: an area downscale to the long side
``imgsz``, /255, ImageNet normalization, then torchvision's bilinear resize to its
size rule (``floor(side * imgsz / long side)``: a no-op after the area step, an
upscale for smaller images); boxes come back through the same float32 ratios and
are clipped.

The harmonized image has three equal channels, so the resize and the float
conversion are done once on one channel.
"""

from __future__ import annotations

import ast
import json
import math
import os
from pathlib import Path

import cv2
import numpy as np

from bone_r.card import DEFAULT_IMGSZ
from bone_r.contract import fit_long_side, scale_boxes
from bone_r.detection import Detection

MAX_WH = 7680  # Ultralytics' per-class offset for class-aware NMS
MAX_NMS = 30000
FORMAT_KEY = "bone_r_format"  # ONNX metadata key written by scripts/export_onnx.py
TORCHVISION_FORMAT = "torchvision"
RUNTIMES = ("onnxruntime", "openvino")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def letterbox_params(shape_hw: tuple[int, int], new_hw: tuple[int, int], auto: bool, stride: int = 32):
    """Ultralytics' LetterBox arithmetic: (resized (w, h), top, bottom, left, right, padded (h, w))."""
    h, w = shape_hw
    r = min(new_hw[0] / h, new_hw[1] / w)
    new_unpad = (max(round(w * r), 1), max(round(h * r), 1))
    dw, dh = new_hw[1] - new_unpad[0], new_hw[0] - new_unpad[1]
    if auto:
        dw, dh = np.mod(dw, stride), np.mod(dh, stride)
    dw, dh = dw / 2, dh / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    return new_unpad, top, bottom, left, right, (new_unpad[1] + top + bottom, new_unpad[0] + left + right)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS on xyxy boxes; indices in decreasing score order (torchvision's semantics)."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).astype(np.float64)
    keep = cv2.dnn.NMSBoxes(xywh, scores.astype(np.float32), 0.0, float(iou))  # scores are pre-filtered (> conf >= 0)
    return np.asarray(keep, np.int64).reshape(-1)


def make_session(path: Path, device: str = "cpu", threads: int | None = None, spin: bool = False):
    """An ONNX Runtime session with every graph optimization, `threads` intra-op threads (default:
    ``BONE_R_ORT_THREADS``, else the usable cores) and, unless `spin`, no busy-waiting threads."""
    import onnxruntime as ort

    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = int(threads or os.environ.get("BONE_R_ORT_THREADS") or available_cores())
    options.inter_op_num_threads = 1
    if not spin:
        # Spinning worker threads keep a core busy after each run; on a small shared CPU that slows the
        # image decoding around the model (and everyone else) more than it speeds the model up.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception types for bad files
        raise ValueError(f"{path} is not a loadable ONNX model: {str(err).splitlines()[0][:200]}") from None


def make_openvino_request(path: Path, threads: int | None = None):
    """An OpenVINO CPU infer request for `path` in float32 (never bf16: boxes must stay the PyTorch model's), threads
    unpinned (the cores are shared). Optional: ``pip install openvino``; about 17% faster than ONNX Runtime on the
    EfficientNet-Lite0 Faster R-CNN, same boxes."""
    try:
        import openvino
    except ImportError:
        raise ValueError("the openvino runtime was asked for (BONE_R_ONNX_RUNTIME=openvino) but OpenVINO is not "
                         "installed: pip install openvino, or use the default onnxruntime") from None
    threads = int(threads or os.environ.get("BONE_R_ORT_THREADS") or available_cores())
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
              "ENABLE_CPU_PINNING": False}
    return openvino.Core().compile_model(str(path), "CPU", config).create_infer_request()


def _torch_linear_taps(n_in: int, n_out: int):
    """torch's bilinear source taps along one axis (align_corners=False, the scale recomputed as n_in / n_out):
    src = max(scale * (i + 0.5) - 0.5, 0) rounded once (torch's CPU kernel fuses it into one FMA; two roundings
    move a tap by an ulp, which at src ~ 100 shifts the weight by 1e-5), index clamped, weight = src - index."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(_fma(scale, np.arange(n_out) + 0.5, -0.5), np.float32(0))
    first = np.minimum(src.astype(np.int64), n_in - 1)
    weight1 = np.clip(src - first.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    return first, first + (first < n_in - 1), (np.float32(1) - weight1).astype(np.float32), weight1


def _fma(x, y, z) -> np.ndarray:
    """x * y + z in float32 with one rounding, as a fused multiply-add (the float64 product of two float32 is exact)."""
    return (np.asarray(x, np.float64) * np.asarray(y, np.float64) + np.asarray(z, np.float64)).astype(np.float32)


def torch_bilinear_resize(planes: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` of (C, H, W) float32 planes held
    channels-last (as the PyTorch backend's permuted HWC tensor is), bit for bit with torch 2.x's CPU kernel:
    weights w_ij = h_i * w_j in float32, then ``b * w01``, ``fma(a, w00, .)``, ``fma(c, w10, .)``, ``fma(d, w11, .)``.
    OpenCV's float bilinear differs from it by up to 1.4e-5 and plain numpy arithmetic by 1.2e-7: either flips a
    near-tie in an NMS now and then (4 of 837 test images: one box each, all scoring below 0.02)."""
    height, width = planes.shape[1:]
    y0, y1, wy0, wy1 = _torch_linear_taps(height, out_h)
    x0, x1, wx0, wx1 = _torch_linear_taps(width, out_w)
    w00, w01 = wy0[:, None] * wx0, wy0[:, None] * wx1  # float32 products, as torch computes them
    w10, w11 = (wy1[:, None] * wx0).astype(np.float64), (wy1[:, None] * wx1).astype(np.float64)
    w00 = w00.astype(np.float64)
    top, bottom = (y0 * width)[:, None], (y1 * width)[:, None]
    corners = (top + x0, top + x1, bottom + x0, bottom + x1)  # flat indices of a, b, c, d
    out = np.empty((planes.shape[0], out_h, out_w), np.float32)
    for channel, plane in enumerate(planes.reshape(planes.shape[0], -1)):
        a, b, c, d = (plane.take(index) for index in corners)
        acc = b * w01
        acc = (a * w00 + acc).astype(np.float32)
        acc = (c * w10 + acc).astype(np.float32)
        out[channel] = d * w11 + acc
    return out


class OnnxDetector:
    """An exported detector run by ONNX Runtime: a YOLO export, or a torchvision one (``self.format``).

    `runtime` (default: ``BONE_R_ONNX_RUNTIME``, else ``onnxruntime``): ``openvino`` runs torchvision exports
    with OpenVINO instead (optional package); YOLO exports always run in ONNX Runtime.
    """

    def __init__(self, weights: str | Path, device: str = "cpu", imgsz: int | None = None, iou: float = 0.7,
                 max_det: int = 300, threads: int | None = None, spin: bool = False, runtime: str | None = None):
        path = Path(weights)
        runtime = runtime or os.environ.get("BONE_R_ONNX_RUNTIME") or "onnxruntime"
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown ONNX runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
        self.session = make_session(path, device, threads, spin)
        self.runtime, self.openvino = "onnxruntime", None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        self.format = meta.get(FORMAT_KEY, "yolo")
        self.name = f"onnx:{path.stem}"
        if self.format == TORCHVISION_FORMAT:
            self._init_torchvision(path, meta, imgsz)
            if runtime == "openvino" and device == "cpu":
                self.openvino, self.runtime = make_openvino_request(path, threads), "openvino"
                self.session = None  # metadata read; OpenVINO holds its own copy of the weights
            return
        if self.format != "yolo":
            raise ValueError(f"{path} holds a {self.format!r} export, which this version of Bone-R cannot run "
                             f"(known: yolo, {TORCHVISION_FORMAT})")
        self.stride = int(meta.get("stride", 32))
        self.names = _literal(meta.get("names"), {0: "fracture"})
        self.end2end = str(meta.get("end2end", "False")) == "True"
        height, width = inp.shape[2], inp.shape[3]
        self.static_hw = (height, width) if isinstance(height, int) and isinstance(width, int) else None
        meta_imgsz = _literal(meta.get("imgsz"), None)
        if self.static_hw:
            self.imgsz = self.static_hw
        else:
            size = imgsz or (meta_imgsz[0] if isinstance(meta_imgsz, (list, tuple)) else meta_imgsz) or DEFAULT_IMGSZ
            self.imgsz = (int(size), int(size))
        self.iou, self.max_det = float(iou), int(max_det)

    def _init_torchvision(self, path: Path, meta: dict[str, str], imgsz: int | None) -> None:
        try:
            self.arch = meta["source_backend"]
            self.imgsz = int(imgsz or meta["imgsz"])
            self.classes = list(json.loads(meta.get("classes", '["fracture"]')))
            self.mean = np.array(json.loads(meta["image_mean"]), np.float32)
            self.std = np.array(json.loads(meta["image_std"]), np.float32)
            if self.mean.shape != (3,) or self.std.shape != (3,):
                raise ValueError("image_mean and image_std must hold 3 numbers")
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: its torchvision export metadata is incomplete ({err})") from None
        outputs = [o.name for o in self.session.get_outputs()]
        if not {"boxes", "scores", "labels"} <= set(outputs):
            raise ValueError(f"{path}: a torchvision export must output boxes, scores and labels, not {outputs}")
        self.static_hw = None

    # ------------------------------------------------------------------ preprocessing

    def preprocess(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """The network input (1, 3, H, W) float32 in [0, 1], and its (H, W)."""
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
        if rgb.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixels, got {rgb.dtype}")
        gray = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        src = rgb[..., 0] if gray else rgb
        new_unpad, top, bottom, left, right, (ph, pw) = letterbox_params(rgb.shape[:2], self.imgsz, auto=self.static_hw is None,
                                                                         stride=self.stride)
        if (src.shape[1], src.shape[0]) != new_unpad:
            src = cv2.resize(src, new_unpad, interpolation=cv2.INTER_LINEAR)
        blob = np.empty((1, 3, ph, pw), np.float32)
        if gray:
            plane = blob[0, 0]
            plane[:] = 114.0 / 255.0
            np.divide(src, np.float32(255.0), out=plane[top:top + src.shape[0], left:left + src.shape[1]], casting="unsafe")
            blob[0, 1] = plane
            blob[0, 2] = plane
        else:
            padded = cv2.copyMakeBorder(src, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))
            np.divide(padded.transpose(2, 0, 1), np.float32(255.0), out=blob[0], casting="unsafe")
        return blob, (ph, pw)

    # ------------------------------------------------------------------ decoding

    def decode(self, output: np.ndarray, input_hw: tuple[int, int], image_hw: tuple[int, int], conf: float):
        """(xyxy boxes in image pixels, scores, class ids) from the raw network output."""
        pred = output[0]
        if self.end2end or (pred.ndim == 2 and pred.shape[1] == 6 and pred.shape[0] != 4 + len(self.names)):
            pred = pred[pred[:, 4] > conf][: self.max_det]
            boxes, scores, classes = pred[:, :4].astype(np.float64), pred[:, 4], pred[:, 5].astype(np.int64)
        else:
            nc = pred.shape[0] - 4
            cls_scores = pred[4:4 + nc]
            if nc == 1:
                scores_all, classes_all = cls_scores[0], np.zeros(pred.shape[1], np.int64)
            else:
                classes_all = cls_scores.argmax(0)
                scores_all = cls_scores[classes_all, np.arange(pred.shape[1])]
            idx = np.flatnonzero(scores_all > conf)
            if len(idx) > MAX_NMS:
                idx = idx[np.argsort(-scores_all[idx], kind="stable")[:MAX_NMS]]
            cx, cy, w, h = pred[:4, idx]
            boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(np.float64)
            scores, classes = scores_all[idx], classes_all[idx]
            offset = (classes * MAX_WH)[:, None].astype(np.float64)
            keep = nms(boxes + offset, scores, self.iou)[: self.max_det]
            boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        # Ultralytics' scale_boxes: gain and padding from the two shapes, each side rounded as LetterBox does
        gain = min(input_hw[0] / image_hw[0], input_hw[1] / image_hw[1])
        new_h, new_w = max(round(image_hw[0] * gain), 1), max(round(image_hw[1] * gain), 1)
        pad_x = round((input_hw[1] - new_w) / 2 - 0.1)
        pad_y = round((input_hw[0] - new_h) / 2 - 0.1)
        boxes = boxes.copy()
        boxes[:, [0, 2]] = (boxes[:, [0, 2]] - pad_x) / (new_w / image_hw[1])
        boxes[:, [1, 3]] = (boxes[:, [1, 3]] - pad_y) / (new_h / image_hw[0])
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, image_hw[1])
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, image_hw[0])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])  # never an inverted box (Detection refuses them)
        return boxes, scores.astype(np.float64), classes

    def predict(self, rgb: np.ndarray, conf: float) -> list[Detection]:
        if self.format == TORCHVISION_FORMAT:
            return self.predict_torchvision(rgb, conf)
        blob, input_hw = self.preprocess(rgb)
        output = self.session.run([self.output_name], {self.input_name: blob})[0]
        boxes, scores, classes = self.decode(output, input_hw, rgb.shape[:2], conf)
        return [Detection(tuple(box), min(max(float(score), 0.0), 1.0), str(self.names.get(int(c), "fracture")), self.name)
                for box, score, c in zip(boxes, scores, classes)]

    # ------------------------------------------------------------------ torchvision exports

    def preprocess_torchvision(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """(network input (1, 3, h, w) float32, normalized; the area-resized (h, w); the model's (h, w)).

        `TorchvisionDetector.predict` area-downscales to the long side ``imgsz`` (never up) and divides by 255;
        torchvision's transform then normalizes ((x - mean) / std) and resizes by ``min(imgsz / short, imgsz /
        long)`` with ``floor`` sizes and bilinear sampling (half-pixel centres, no antialias): a no-op after the
        area step, an upscale for smaller images (`torch_bilinear_resize`). Every step here gives torch's bits.
        """
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
        if rgb.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixels, got {rgb.dtype}")
        h, w = rgb.shape[:2]
        gray = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        src = rgb[..., 0] if gray else rgb
        src = fit_long_side(src, self.imgsz)  # `TorchvisionDetector.predict`'s and the trainer's resize
        ih, iw = src.shape[:2]
        factor = min(self.imgsz / min(ih, iw), self.imgsz / max(ih, iw))  # torchvision's eager arithmetic (float64)
        oh, ow = math.floor(float(ih) * factor), math.floor(float(iw) * factor)
        image = src.astype(np.float32) / np.float32(255.0)  # the PyTorch backend's tensor.float().div_(255)
        planes = np.empty((3, ih, iw), np.float32)
        for channel in range(3):
            np.divide(np.subtract(image if gray else image[..., channel], self.mean[channel]), self.std[channel],
                      out=planes[channel])
        if (oh, ow) != (ih, iw):
            planes = torch_bilinear_resize(planes, oh, ow)
        return planes[None], (ih, iw), (oh, ow)

    def predict_torchvision(self, rgb: np.ndarray, conf: float) -> list[Detection]:
        blob, (ih, iw), (oh, ow) = self.preprocess_torchvision(rgb)
        if self.openvino is not None:
            out = self.openvino.infer({0: blob})
            boxes, scores, labels = out["boxes"], out["scores"], out["labels"]
        else:
            boxes, scores, labels = self.session.run(["boxes", "scores", "labels"], {self.input_name: blob})
        # torchvision's transform.postprocess (float32 ratios), then the backend's float64 mapping to `rgb`
        ratio = np.array([np.float32(iw) / np.float32(ow), np.float32(ih) / np.float32(oh)] * 2, np.float32)
        boxes = (boxes.astype(np.float32) * ratio).astype(np.float64)
        h, w = rgb.shape[:2]
        keep = (labels >= 1) & (scores >= conf)
        boxes = scale_boxes(boxes[keep], (iw, ih), (w, h))
        names = [self.classes[min(int(lab) - 1, len(self.classes) - 1)] for lab in labels[keep]]
        return [Detection(tuple(b), min(max(float(s), 0.0), 1.0), n, self.name)
                for b, s, n in zip(boxes, scores[keep], names)]


def _literal(text: str | None, default):
    if not text:
        return default
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return default
