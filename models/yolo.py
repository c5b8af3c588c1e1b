"""Ultralytics YOLO backend (PyTorch).

Ultralytics checkpoints are pickles: only load `.pt` files you trust (your own
training runs, the bundled model). The service and CLI default to the bundled
model; prefer an exported `.onnx` (the ``onnx`` backend: faster on CPU, no
pickle) for anything received from elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bone_r.card import DEFAULT_IMGSZ
from bone_r.detection import Detection


class YoloDetector:
    def __init__(self, weights: str | Path, device: str = "cpu", imgsz: int | None = None, iou: float = 0.7, max_det: int = 300):
        """`imgsz`: resolved by `bone_r.card.resolve` (explicit, then the card); None: the size the checkpoint was trained
        at (as Ultralytics' own val() uses), else `bone_r.card.DEFAULT_IMGSZ`."""
        os.environ.setdefault("YOLO_OFFLINE", "1")
        from ultralytics import YOLO

        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"YOLO weights not found: {path}")
        self.model = YOLO(str(path), task="detect")
        trained = (getattr(self.model, "overrides", None) or {}).get("imgsz")
        imgsz = imgsz or (trained if isinstance(trained, int) else None) or DEFAULT_IMGSZ
        self.device, self.imgsz, self.iou, self.max_det = device, int(imgsz), iou, max_det
        self.name = f"yolo:{path.stem}"
        names = getattr(self.model, "names", None) or {0: "fracture"}
        self.names = {int(k): str(v) for k, v in names.items()}

    def predict(self, rgb: np.ndarray, conf: float) -> list[Detection]:
        # Ultralytics reads numpy input as BGR (it was trained on RGB): hand it BGR so a colour image is seen right.
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        result = self.model.predict(bgr, conf=conf, iou=self.iou, imgsz=self.imgsz, max_det=self.max_det,
                                    device=self.device, verbose=False)[0]
        boxes = result.boxes
        xyxy = boxes.xyxy.cpu().numpy().astype(np.float64)
        xyxy[:, 2:] = np.maximum(xyxy[:, 2:], xyxy[:, :2])  # never an inverted box (Detection refuses them)
        scores = boxes.conf.cpu().numpy().astype(np.float64)
        classes = boxes.cls.cpu().numpy().astype(int)
        return [Detection(tuple(b), min(max(float(s), 0.0), 1.0), self.names.get(int(c), "fracture"), self.name)
                for b, s, c in zip(xyxy, scores, classes)]
