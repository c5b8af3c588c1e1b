"""Detections and predictions: `Detection` (the one result type), best-guess hints, the box rule, `Prediction`, and
prediction records (read, write, match to images). Research and teaching tool, not a diagnosis.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from bone_r.dataset import DataError, GroundTruth, _abspath
from bone_r.image import ImageMeta
from bone_r.runs import read_json


@dataclass
class Detection:
    """One finding: box ``xyxy`` in original-image pixels, score in [0, 1]."""

    xyxy: tuple[float, float, float, float]
    score: float
    label: str = "fracture"
    model: str = ""
    hints: dict[str, Any] | None = None

    def __post_init__(self):
        box = tuple(float(v) for v in self.xyxy)
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            raise ValueError(f"xyxy must be 4 finite numbers, got {self.xyxy!r}")
        if box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"xyxy must have x2 >= x1 and y2 >= y1, got {box}")
        self.xyxy = box
        self.score = float(self.score)
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score must lie in [0, 1], got {self.score}")

    def to_dict(self) -> dict[str, Any]:
        out = {"xyxy": [round(v, 2) for v in self.xyxy], "score": round(self.score, 5), "label": self.label, "model": self.model}
        if self.hints is not None:
            out["hints"] = self.hints
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Detection:
        if not isinstance(data, dict) or "xyxy" not in data or "score" not in data:
            raise ValueError(f"a detection needs 'xyxy' and 'score', got {data!r}")
        return cls(
            xyxy=tuple(data["xyxy"]),
            score=data["score"],
            label=str(data.get("label", "fracture")),
            model=str(data.get("model", "")),
            hints=data.get("hints"),
        )


def guess_type_and_severity(detection: Detection, image_size: tuple[int, int]) -> dict[str, Any]:
    """Rule-based hints from the box alone. Always a best guess, never a diagnosis.

    A box says nothing certain about fracture type or severity; these rules only
    turn its shape, relative size and score into words a reader can check.

    ========================  =======================================  ==================================
    measure                   rule                                     hint
    ========================  =======================================  ==================================
    aspect = long/short side  aspect >= 2.5                            type "elongated line (oblique or
                                                                       spiral pattern possible)"
    relative area = box/img   area >= 0.15 (and aspect < 2.5)          type "extensive region
                                                                       (comminuted pattern possible)"
    otherwise                                                          type "focal (e.g. hairline,
                                                                       buckle or avulsion)"
    severity                  area >= 0.10, or area >= 0.03 and        "possibly severe"
                              score >= 0.70
                              area >= 0.02                             "moderate"
                              otherwise                                "mild or subtle"
    confidence words          score >= 0.70 "high", >= 0.40            "confidence"
                              "moderate", else "low"
    ========================  =======================================  ==================================
    """
    x1, y1, x2, y2 = detection.xyxy
    w, h = max(x2 - x1, 1e-6), max(y2 - y1, 1e-6)
    img_w, img_h = image_size
    aspect = max(w, h) / min(w, h)
    area = (w * h) / max(img_w * img_h, 1)
    if aspect >= 2.5:
        kind = "elongated line (oblique or spiral pattern possible)"
    elif area >= 0.15:
        kind = "extensive region (comminuted pattern possible)"
    else:
        kind = "focal (e.g. hairline, buckle or avulsion)"
    if area >= 0.10 or (area >= 0.03 and detection.score >= 0.70):
        severity = "possibly severe"
    elif area >= 0.02:
        severity = "moderate"
    else:
        severity = "mild or subtle"
    confidence = "high" if detection.score >= 0.70 else "moderate" if detection.score >= 0.40 else "low"
    return {
        "type": kind,
        "severity": severity,
        "confidence": confidence,
        "aspect_ratio": round(aspect, 2),
        "relative_area": round(area, 4),
        "best_guess": True,
        "note": "Best guess from the box's shape, size and score only; not a diagnosis.",
    }


@dataclass(frozen=True)
class BoxRule:
    """One box per finding: what is done to a model's boxes (all classes together, highest score first) before
    anyone sees them. Chosen on the validation split (`evaluate.py --box-rule choose`) and kept in the model card
    under "box_rule", so every backend, the service and the evaluation apply the same rule.

    - `nms_iou`: a box whose IoU with a kept, higher-scoring box exceeds this goes (class-agnostic NMS);
    - `contained`: a box with at least this fraction of its area inside a kept, higher-scoring box goes;
    - `max_boxes`: at most this many boxes per image, the highest-scoring.

    Every step only looks at higher-scoring boxes, so applying the rule and then a score threshold gives the same
    boxes as thresholding first: evaluation at score >= 0.001 and prediction at a mode's threshold agree.
    """

    nms_iou: float | None = None
    contained: float | None = None
    max_boxes: int | None = None

    def __post_init__(self):
        for name in ("nms_iou", "contained"):
            value = getattr(self, name)
            if value is not None and not 0.0 < float(value) <= 1.0:
                raise ValueError(f"box rule: {name} must lie in (0, 1], got {value}")
        if self.max_boxes is not None and int(self.max_boxes) < 1:
            raise ValueError(f"box rule: max_boxes must be >= 1, got {self.max_boxes}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> BoxRule:
        data = dict(data or {})
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"box rule: unknown key(s) {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        parts = [f"NMS IoU {self.nms_iou}" if self.nms_iou else "", f"contained {self.contained}" if self.contained else "",
                 f"at most {self.max_boxes}" if self.max_boxes else ""]
        return ", ".join(p for p in parts if p) or "none"

    def keep(self, boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Indices of the boxes (xyxy) that stay, highest score first."""
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
        if not (self.nms_iou or self.contained):
            return order[: self.max_boxes]
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
        kept: list[int] = []
        for i in order:
            if self.max_boxes and len(kept) >= self.max_boxes:
                break
            if kept:
                k = np.array(kept)
                iw = np.clip(np.minimum(boxes[k, 2], boxes[i, 2]) - np.maximum(boxes[k, 0], boxes[i, 0]), 0, None)
                ih = np.clip(np.minimum(boxes[k, 3], boxes[i, 3]) - np.maximum(boxes[k, 1], boxes[i, 1]), 0, None)
                inter = iw * ih
                with np.errstate(invalid="ignore", divide="ignore"):
                    if self.nms_iou and np.any(inter / (area[k] + area[i] - inter) > self.nms_iou):
                        continue
                    if self.contained and area[i] > 0 and np.any(inter / area[i] >= self.contained):
                        continue
            kept.append(int(i))
        return np.array(kept, dtype=np.int64)

    def apply(self, detections: list[Detection]) -> list[Detection]:
        if not detections or self == BoxRule():
            return sorted(detections, key=lambda d: d.score, reverse=True)
        idx = self.keep(np.array([d.xyxy for d in detections]), np.array([d.score for d in detections]))
        return [detections[i] for i in idx]


@dataclass
class Prediction:
    """What one image produced: the record every output format is written from."""

    image: str
    width: int
    height: int
    mode: str
    threshold: float
    threshold_source: str
    detections: list[Detection]
    timings_ms: dict[str, float]
    meta: ImageMeta | None = None

    @property
    def fracture_detected(self) -> bool:
        return any(d.score >= self.threshold for d in self.detections)

    def to_record(self) -> dict[str, Any]:
        """The `inference.py --json` entry that `evaluate.py --predictions` reads."""
        return {
            "image": self.image,
            "image_size": [self.width, self.height],
            "fracture_detected": self.fracture_detected,
            "mode": self.mode,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "detections": [d.to_dict() for d in self.detections],
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
        }


CSV_FIELDS = ["image", "fracture_detected", "mode", "threshold", "n_detections", "max_score", "rank", "x1", "y1", "x2", "y2", "score", "type_hint", "severity_hint", "error"]


def csv_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per detection (one row for an image without any)."""
    base = {
        "image": record["image"],
        "fracture_detected": record.get("fracture_detected", ""),
        "mode": record.get("mode", ""),
        "threshold": record.get("threshold", ""),
        "n_detections": len(record.get("detections", [])),
        "max_score": max((d["score"] for d in record.get("detections", [])), default=""),
        "error": record.get("error", ""),
    }
    dets = record.get("detections", [])
    if not dets:
        return [base]
    rows = []
    for rank, det in enumerate(dets, 1):
        hints = det.get("hints") or {}
        x1, y1, x2, y2 = det["xyxy"]
        rows.append(base | {"rank": rank, "x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": det["score"],
                            "type_hint": hints.get("type", ""), "severity_hint": hints.get("severity", "")})
    return rows


@dataclass
class ImagePrediction:
    boxes: np.ndarray  # (n, 4) xyxy, original pixels
    scores: np.ndarray  # (n,)

    @classmethod
    def empty(cls) -> ImagePrediction:
        return cls(np.zeros((0, 4)), np.zeros(0))

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ImagePrediction:
        dets = [Detection.from_dict(d) for d in record.get("detections") or []]
        return cls(np.array([d.xyxy for d in dets], dtype=np.float64).reshape(-1, 4), np.array([d.score for d in dets], dtype=np.float64))

    @property
    def max_score(self) -> float:
        return float(self.scores.max()) if self.scores.size else 0.0


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a results.json (`inference.py --json`): a list, one record, or {"predictions": [...]}; or of a
    .jsonl file (`--json x.jsonl`, sharded outputs concatenated): one record per line."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl" and path.is_file():
        data = []
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except ValueError:
                    raise DataError(f"{path}: line {number} is not a JSON record") from None
    else:
        data = read_json(path, "predictions file", DataError)
    if isinstance(data, dict):
        data = data.get("predictions", [data]) if "image" not in data else [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) and "image" in r for r in data):
        raise DataError(f"{path}: expected a list of prediction records with an 'image' key each")
    return data


class PathIndex:
    """The one matcher of the project: which of `paths` an image path names (a prediction record's `image`).

    The same path (absolute against each of `bases`, or with symbolic links resolved), else the longest trailing
    path that names exactly one of `paths` and shares at least its last `min_parts` parts (3 by default, e.g.
    images/test/x.png, so that images/test/x.png never matches images/val/x.png; 1: a unique file name will do).
    Predictions made elsewhere (another machine, another root) are found by that trailing path.
    """

    def __init__(self, paths: Sequence[str | Path], bases: Sequence[Path] = (), min_parts: int = 3):
        self.paths = [Path(os.path.normpath(os.fspath(p))) for p in paths]
        self.bases = [_abspath(b) for b in bases]
        self.min_parts = min_parts
        self.exact: dict[str, int] = {}
        self.by_name: dict[str, list[int]] = {}
        for i, path in enumerate(self.paths):
            if path.is_absolute():
                self.exact.setdefault(os.fspath(path), i)
            else:
                for base in self.bases or [Path.cwd()]:
                    self.exact.setdefault(os.fspath(_abspath(base / path)), i)
            with contextlib.suppress(OSError):
                self.exact.setdefault(os.fspath(_abspath(path).resolve()), i)
            self.by_name.setdefault(path.name, []).append(i)

    def lookup(self, image: str | Path) -> int | None:
        p = Path(os.fspath(image))
        cands = [p] if p.is_absolute() else [b / p for b in self.bases or [Path.cwd()]]
        for c in cands:
            i = self.exact.get(os.fspath(_abspath(c)))
            if i is None:
                with contextlib.suppress(OSError):
                    i = self.exact.get(os.fspath(_abspath(c).resolve()))
            if i is not None:
                return i
        parts = Path(os.path.normpath(os.fspath(image))).parts
        need = min(self.min_parts, len(parts))
        lens = {i: self._suffix_len(self.paths[i].parts, parts) for i in self.by_name.get(p.name, [])}
        lens = {i: n for i, n in lens.items() if n >= need}
        if not lens:
            return None
        best = max(lens.values())
        found = [i for i, n in lens.items() if n == best]
        return found[0] if len(found) == 1 else None

    @staticmethod
    def _suffix_len(a: Sequence[str], b: Sequence[str]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
            n += 1
        return n


class RecordIndex:
    """Prediction records found by the image they name (`PathIndex` over their `image` paths)."""

    def __init__(self, records: Sequence[dict[str, Any]], bases: Sequence[Path] = (), min_parts: int = 1):
        self.records = list(records)
        self.index = PathIndex([str(r.get("image", "")) for r in self.records], bases, min_parts)

    def get(self, image: str | Path) -> dict[str, Any] | None:
        i = self.index.lookup(image)
        return None if i is None else self.records[i]


def match_predictions(records: Sequence[dict[str, Any]], gt: GroundTruth, bases: Sequence[Path] = ()) -> tuple[list[ImagePrediction | None], list[dict], list[str]]:
    """Align records with `gt.images`.

    Returns (predictions aligned with gt, None where missing; records that match no
    image of this split; errors: failed predictions, duplicates, size mismatches).
    """
    bases = list(bases) + [Path.cwd()] + ([gt.root] if gt.root else [])
    index = PathIndex([im.path for im in gt.images], bases)
    preds: list[ImagePrediction | None] = [None] * len(gt)
    unmatched, errors = [], []
    for n, rec in enumerate(records):
        image = str(rec.get("image", ""))
        i = index.lookup(image)
        if i is None:
            unmatched.append(rec)
            continue
        im = gt.images[i]
        if rec.get("error"):
            errors.append(f"{im.key}: prediction failed: {rec['error']}")
            continue
        if preds[i] is not None:
            errors.append(f"{im.key}: more than one prediction (record {n})")
            continue
        size = rec.get("image_size")
        if size is not None and (int(size[0]), int(size[1])) != (im.width, im.height):
            errors.append(f"{im.key}: prediction was made on a {size[0]}x{size[1]} image, the dataset image is {im.width}x{im.height}")
            continue
        try:
            preds[i] = ImagePrediction.from_record(rec)
        except (ValueError, TypeError) as err:
            errors.append(f"{im.key}: bad detection in record {n}: {err}")
    return preds, unmatched, errors


class RecordError(ValueError):
    """A prediction record that cannot be used for an image (missing, failed, made on another image, malformed)."""


def find_record(records: list[dict[str, Any]], image: Path) -> dict[str, Any]:
    """The record for `image` (the one matcher, `bone_r.detection.RecordIndex`: same path, else the only record
    whose trailing path names it), or the only record when it came from bytes (no file name)."""
    rec = RecordIndex(records, [Path.cwd()]).get(image)
    if rec is not None:
        return rec
    if len(records) == 1 and not records[0].get("image"):
        return records[0]  # a record from bytes (no file name)
    same_name = sum(Path(str(r.get("image", ""))).name == image.name for r in records)
    how = "several records share its file name" if same_name else "no record names it"
    raise RecordError(f"{image}: {how} in the predictions file")


def detections_from_record(record: dict[str, Any], size: tuple[int, int], conf: float | None = None,
                           model: str | None = None) -> list[Detection]:
    """The record's boxes with score >= `conf` (default: the record's own threshold), hints filled in if absent."""
    if record.get("error"):
        raise RecordError(f"{record.get('image')}: the prediction failed: {record['error']}")
    rec_size = record.get("image_size")
    if rec_size is not None and (int(rec_size[0]), int(rec_size[1])) != tuple(size):
        raise RecordError(f"{record.get('image')}: the prediction was made on a {rec_size[0]}x{rec_size[1]} image, "
                             f"this image is {size[0]}x{size[1]}")
    threshold = conf if conf is not None else float(record.get("threshold", 0.0) or 0.0)
    out = []
    for raw in record.get("detections") or []:
        try:
            det = Detection.from_dict(raw)
        except (ValueError, TypeError) as err:
            raise RecordError(f"{record.get('image')}: bad detection: {err}") from None
        if det.score < threshold:
            continue
        if model is not None:
            det.model = model
        if det.hints is None:
            det.hints = guess_type_and_severity(det, size)
        out.append(det)
    out.sort(key=lambda d: d.score, reverse=True)
    return out
