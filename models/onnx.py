"""ONNX Runtime backend for YOLO detectors exported by Ultralytics (``scripts/export_onnx.py``).

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

The harmonized image has three equal channels, so the resize and the float
conversion are done once on one channel.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import cv2
import numpy as np

from inference import Detection

MAX_WH = 7680  # Ultralytics' per-class offset for class-aware NMS
MAX_NMS = 30000


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


class OnnxDetector:
    """An exported YOLO detection model run by ONNX Runtime."""

    def __init__(self, weights: str | Path, device: str = "cpu", imgsz: int | None = None, iou: float = 0.7,
                 max_det: int = 300, threads: int | None = None, spin: bool = False):
        import onnxruntime as ort

        path = Path(weights)
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
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # noqa: BLE001 - ORT raises its own exception types for bad files
            raise ValueError(f"{path} is not a loadable ONNX model: {str(err).splitlines()[0][:200]}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        self.stride = int(meta.get("stride", 32))
        self.names = _literal(meta.get("names"), {0: "fracture"})
        self.end2end = str(meta.get("end2end", "False")) == "True"
        height, width = inp.shape[2], inp.shape[3]
        self.static_hw = (height, width) if isinstance(height, int) and isinstance(width, int) else None
        meta_imgsz = _literal(meta.get("imgsz"), None)
        if self.static_hw:
            self.imgsz = self.static_hw
        else:
            size = imgsz or (meta_imgsz[0] if isinstance(meta_imgsz, (list, tuple)) else meta_imgsz) or 640
            self.imgsz = (int(size), int(size))
        self.iou, self.max_det = float(iou), int(max_det)
        self.name = f"onnx:{path.stem}"

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
        blob, input_hw = self.preprocess(rgb)
        output = self.session.run([self.output_name], {self.input_name: blob})[0]
        boxes, scores, classes = self.decode(output, input_hw, rgb.shape[:2], conf)
        return [Detection(tuple(box), min(max(float(score), 0.0), 1.0), str(self.names.get(int(c), "fracture")), self.name)
                for box, score, c in zip(boxes, scores, classes)]


def _literal(text: str | None, default):
    if not text:
        return default
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return default
