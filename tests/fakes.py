"""A fake detector backend with known outputs, for tests that need a model but not a network.

Its "weights" file is JSON: {"boxes": [[cx, cy, w, h, score], ...]} in coordinates
normalized to whatever image it is given, so the expected boxes in original
pixels are known exactly whatever the harmonization did to the size.
"""

from __future__ import annotations

import json
from pathlib import Path

from bone_r.detection import Detection


class FakeDetector:
    def __init__(self, weights, device: str = "cpu", imgsz: int | None = None, boxes=None):
        self.boxes = boxes if boxes is not None else json.loads(Path(weights).read_text())["boxes"]
        self.name = "fake"
        self.seen_shapes = []

    def predict(self, rgb, conf):
        self.seen_shapes.append(rgb.shape)
        h, w = rgb.shape[:2]
        out = []
        for cx, cy, bw, bh, score in self.boxes:
            if score >= conf:
                out.append(Detection(((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h), score, "fracture", self.name))
        return out


def write_fake_model(folder: Path, boxes, thresholds=None, contract=None) -> Path:
    """weights + model card for the fake backend (registered as "fake" by conftest)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "fake.weights"
    weights.write_text(json.dumps({"boxes": boxes}))
    card = {"name": "fake", "backend": "fake", "classes": ["fracture"]}
    if thresholds:
        card["thresholds"] = {m: {"threshold": t} for m, t in thresholds.items()}
    if contract:
        card["contract"] = contract
    (folder / "fake.json").write_text(json.dumps(card))
    return weights
