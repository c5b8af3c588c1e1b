"""Detector interface and registry.

Every backend turns a harmonized RGB image (`bone_r.contract.harmonize`) into
`Detection`s whose boxes are in that image's pixels; the shared
`inference.Predictor` maps them back to original pixels. Backends load lazily,
so importing this package imports no deep-learning library.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from bone_r.card import ModelCard

if TYPE_CHECKING:
    import numpy as np

    from bone_r.detection import Detection


@runtime_checkable
class Detector(Protocol):
    name: str

    def predict(self, rgb: np.ndarray, conf: float) -> list[Detection]:
        """Detections with score >= conf, boxes in `rgb`'s pixels."""
        ...


# name -> "module:factory"; factories take (weights, **kwargs).
_REGISTRY: dict[str, str] = {
    "yolo": "models.yolo:YoloDetector",
    "onnx": "models.onnx:OnnxDetector",
    "fasterrcnn": "models.torchvision_det:FasterRCNNDetector",
    "retinanet": "models.torchvision_det:RetinaNetDetector",
    "fcos": "models.torchvision_det:FCOSDetector",
}


def register(name: str, target: str) -> None:
    """Add a backend as "module:callable" (used by plug-ins and tests)."""
    _REGISTRY[name] = target


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def build_detector(name: str, weights: str | Path, **kwargs: Any) -> Detector:
    """Build the backend `name` from `weights`; unknown names list the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown detector backend {name!r}; known backends: {', '.join(available_backends())}")
    module_name, attr = _REGISTRY[name].split(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(weights, **kwargs)


def infer_backend(weights: str | Path, card: ModelCard | None = None) -> str:
    """The backend for a weights file: an ONNX file or a torchvision checkpoint names its own kind (the card
    beside it may describe the bundle's ONNX export, e.g. weights/bone-r-default.{onnx,pth}); else the card's word,
    then the file type."""
    suffix = Path(weights).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".pth":  # train_torchvision.py checkpoints: their config names the detector
        from models.torchvision_det import checkpoint_arch

        return checkpoint_arch(weights)
    if card and card.backend:
        return str(card.backend)
    if suffix == ".pt":
        return "yolo"
    raise ValueError(f"cannot tell the backend of {weights}; pass --backend ({', '.join(available_backends())})")
