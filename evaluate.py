"""Bone-R evaluation: metrics as functions, a command line on top.

Every metric Bone-R reports is computed here and only here (benchmark.py,
scripts/external_val.py, ensemble.py and train.py call these functions).

    # score saved predictions: what `inference.py --image DIR --conf 0.001 --json results.json` writes
    # (--conf 0.001 keeps the low-score boxes that mAP and the threshold search need)
    python evaluate.py --predictions results.json --data data/merged/dataset.yaml --split test --out report.json
    # predict the split with a model first (same scoring code), choose thresholds on val, fill the model card
    python evaluate.py --weights weights/bone-r-default.pt --data data/merged/dataset.yaml --write-card
    # compare our box mAP with Ultralytics' own val() on the same split
    python evaluate.py --weights runs/x/weights/best.pt --data data/merged/dataset.yaml --ultralytics-crosscheck

What is measured
----------------
- Box level (pycocotools): mAP@0.5 and mAP@0.5:0.95 (COCO's 101-point interpolated
  AP, area range "all", at most ``max_dets`` = 100 boxes per image, highest scores
  first). Ground truth comes from the YOLO labels; negative images are included,
  so every box on them is a false positive. Predictions are kept down to score 0.001.
- Image level: an image is positive when it has a true box (or is a weak, image-level
  positive, see below); its score is its highest box score (0 without boxes); it is
  predicted positive iff score >= tau (ties count as positive). Sensitivity,
  specificity, PPV, NPV with 95% percentile bootstrap intervals that resample GROUPS
  (patients / families of augmented copies from splits.csv) with replacement,
  ``n_boot`` = 2000 resamples, ``seed`` = 0. A 0/0 metric is ``null`` with a note.
- Operating points, chosen on the validation split at image level from the observed
  scores (a threshold is always a score seen on val, so ``score >= tau`` reproduces
  the val numbers exactly):
    * ``screening``: the LARGEST tau whose sensitivity >= target (default 0.95). The
      issue's "smallest tau reaching a target sensitivity" is read as "the least
      permissive threshold that still reaches the target": sensitivity only falls as
      tau rises, so this keeps specificity as high as the target allows.
    * ``balanced``: the tau maximizing Youden's J = sensitivity + specificity - 1;
      ties go to the higher tau.
    * ``specific``: the SMALLEST tau whose specificity >= target (default 0.95).
  When a target cannot be reached, the closest achievable tau is used and
  ``target_reached`` is false. Images without any detection never count as positive.
- Localization-aware counting (second view), IoU >= ``iou`` (default 0.3): a positive
  image counts as found only if one of its boxes with score >= tau overlaps a true box;
  a flagged positive whose boxes all miss is "mislocalized" (a miss in this view).
- FROC (lesion level): sensitivity = share of true boxes hit (IoU >= ``iou``) by a box
  with score >= tau; a box that hits no true box is a false positive; points at a fixed
  threshold grid plus the operating thresholds.

Ground truth
------------
``load_ground_truth(data_yaml, split)`` reads an Ultralytics tree (``images/<split>``,
``labels/<split>/*.txt`` with ``0 cx cy w h`` rows, empty = negative) and ``splits.csv``
beside the yaml (``path, split, source, region, group, label, sha256``; optional
``weak``). A relative ``path:`` in the yaml is relative to the yaml's folder; no
``path:`` means the yaml's folder. Without splits.csv, source and region are
``unknown`` and every image is its own group (said in the report's notes). A row with
``label=1`` and a truthy ``weak`` but no box is a weak positive: counted at image level,
left out of box metrics, localization and FROC.

Predictions
-----------
A list of ``inference.Prediction.to_record()`` dicts (``image``, ``image_size``,
``detections`` [{``xyxy`` in ORIGINAL pixels, ``score``, ...}], ...), matched to the
ground truth by path (absolute, relative to the working folder, to the predictions
file, to the dataset root, or by the longest unique trailing path). An image without a
prediction, a failed prediction (``error`` record), a duplicate, a size mismatch or a
prediction that matches no image of the dataset is an error: the CLI stops (exit 2)
unless ``--allow-missing``, which scores the missing ones as "no detection" and lists
every problem in the report's ``errors``.

With ``--weights`` every image of the split (and of val, when thresholds are chosen)
is predicted through `inference.Predictor` first, then scored by the same code. A tree
with a ``contract.json`` (built by scripts/preprocess.py + make_splits.py) is already
harmonized: its images are fed to the model as stored (``IDENTITY_CONTRACT``), exactly
what training saw, instead of being harmonized a second time (``--harmonize``).

Report JSON (``evaluate_predictions`` / ``run_evaluation``)
---------------------------------------------------------
::

    {
      "split": "test", "data": "<dataset.yaml>", "created": "<ISO time>",
      "n_images": int, "n_positive": int, "n_groups": int, "splits_sha256": str | null,
      "box": {"map50": float|null, "map50_95": float|null, "n_gt_boxes": int,
              "n_images": int, "n_detections": int, "max_dets": 100},
      "image_auc": {"roc_auc": float|null},
      "operating_points": {mode: {"threshold": float, "source": "val"|"given"|"model_card",
                                  "target": float|null, "val_sensitivity": float|null,
                                  "val_specificity": float|null, "target_reached": bool}},
      "image_level": {mode: {"threshold", "n_images", "n_positive", "n_negative", "n_groups",
                             "tp", "fp", "tn", "fn",
                             "sensitivity": {"value": float|null, "ci": [lo, hi]|null},
                             "specificity": {...}, "ppv": {...}, "npv": {...}}},
      "localization": {"iou": 0.3, mode: {"threshold", "n_positive", "found", "missed",
                                          "mislocalized", "sensitivity": {"value", "ci"}}},
      "froc": [{"threshold", "sensitivity", "fp_per_image", "n_lesions"}],
      "pr_curve": {"image": [{"threshold", "precision", "recall"}],
                   "box_iou50": [{"recall", "precision"}]},
      "by_source": {source: {"n_images", "n_positive", "n_gt_boxes", "box": {...},
                             "image_level": {mode: {...}}}},
      "by_region": {region: same},
      "settings": {"n_boot", "seed", "iou", "max_dets", "min_score", "targets", "val_split"},
      "val": {"split", "n_images", "n_positive"},            # when thresholds were chosen on val
      "model": {"weights", "backend"} | {"predictions"},      # CLI
      "ultralytics_crosscheck": {"ultralytics": {"map50", "map50_95"}, "ours": {...},
                                 "difference_ours_minus_ultralytics": {...}},  # --ultralytics-crosscheck
      "errors": [str], "notes": [str]
    }

The model card (``--write-card``, `update_model_card`) gets ``thresholds`` = {mode:
{threshold, target, val_sensitivity, val_specificity, target_reached, chosen_on: "val"}}
and ``metrics`` = `card_metrics(report)`; every other key of the card is kept.

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

import inference
from inference import MODES

DEFAULT_MIN_SCORE = 0.001
DEFAULT_N_BOOT = 2000
DEFAULT_SEED = 0
DEFAULT_LOC_IOU = 0.3
DEFAULT_TARGET_SENSITIVITY = 0.95
DEFAULT_TARGET_SPECIFICITY = 0.95
COCO_MAX_DETS = 100
# FROC is reported at these thresholds (plus the operating thresholds).
FROC_THRESHOLDS = (0.001, 0.005, 0.01, 0.02, 0.05, *[round(0.1 + 0.05 * i, 2) for i in range(18)])
MAX_CURVE_POINTS = 201
TRUTHY = {"1", "true", "yes", "y", "t"}


class EvaluationError(ValueError):
    """Bad input for an evaluation; `errors` lists every problem found (first line is the summary)."""

    def __init__(self, message: str, errors: Sequence[str] = ()):
        super().__init__(message)
        self.errors = list(errors)


# --------------------------------------------------------------------------- ground truth


@dataclass
class GTImage:
    """One image of the evaluated split with its true boxes (original pixels)."""

    path: Path  # absolute, NOT symlink-resolved (merged trees link to the originals)
    key: str  # path relative to the dataset root (posix): the image's name in reports
    width: int
    height: int
    boxes: np.ndarray  # (n, 4) float xyxy
    label: int  # 1: fracture present (a box, or a weak image-level positive)
    source: str = "unknown"
    region: str = "unknown"
    group: str = ""
    boxes_known: bool = True  # False: image-level truth only (weak or --all-positive)


@dataclass
class GroundTruth:
    images: list[GTImage]
    split: str
    data: str  # the dataset yaml (or folder) it came from
    root: Path | None = None
    notes: list[str] = field(default_factory=list)
    splits_sha256: str | None = None
    # The contract the tree's images were already harmonized with (its contract.json), if any:
    # such images reach the model as stored (see `predict_split`).
    tree_contract: inference.Contract | None = None
    tree_contract_path: Path | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> np.ndarray:
        return np.array([im.label for im in self.images], dtype=bool)

    @property
    def groups(self) -> list[str]:
        return [im.group or im.key for im in self.images]

    @property
    def n_positive(self) -> int:
        return int(sum(im.label for im in self.images))

    def subset(self, indices: Iterable[int]) -> GroundTruth:
        return replace(self, images=[self.images[i] for i in indices], notes=[])


def _abspath(path: str | Path) -> Path:
    """Absolute and normalized, without following symlinks."""
    return Path(os.path.abspath(os.fspath(path)))


def load_dataset_yaml(data_yaml: str | Path) -> tuple[Path, dict[str, Any]]:
    """(dataset root, yaml mapping). A relative `path:` is relative to the yaml's folder."""
    import yaml

    data_yaml = Path(data_yaml)
    if not data_yaml.is_file():
        raise EvaluationError(f"dataset yaml not found: {data_yaml}")
    try:
        cfg = yaml.safe_load(data_yaml.read_text())
    except yaml.YAMLError as err:
        raise EvaluationError(f"{data_yaml} is not valid YAML: {err}") from None
    if not isinstance(cfg, dict):
        raise EvaluationError(f"{data_yaml} does not hold a mapping")
    base = _abspath(data_yaml).parent
    root = Path(cfg["path"]) if cfg.get("path") else base
    if not root.is_absolute():
        root = base / root
    return _abspath(root), cfg


# What a pre-harmonized tree's images need: nothing (no resize, no CLAHE; 8-bit gray -> RGB).
IDENTITY_CONTRACT = inference.Contract(clahe_clip=0.0, max_side=1 << 30)


def tree_contract(data_yaml: str | Path) -> tuple[Path | None, inference.Contract | None]:
    """The contract a dataset tree was harmonized with (`contract.json` beside the yaml, else in its root), if any."""
    root, _ = load_dataset_yaml(data_yaml)
    for path in (_abspath(data_yaml).parent / "contract.json", root / "contract.json"):
        if path.is_file():
            try:
                return path, inference.Contract.load(path)
            except (ValueError, TypeError, json.JSONDecodeError) as err:
                raise EvaluationError(f"cannot read the tree's contract {path}: {err}") from None
    return None, None


def _split_images(root: Path, cfg: dict[str, Any], split: str) -> list[Path]:
    entry = cfg.get(split, f"images/{split}")
    if entry is None:
        raise EvaluationError(f"the dataset yaml has no '{split}' split")
    entries = entry if isinstance(entry, list) else [entry]
    images: list[Path] = []
    for item in entries:
        p = Path(item)
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            images += [_abspath(x) for x in inference.list_images(p)]
        elif p.is_file() and p.suffix == ".txt":  # Ultralytics' list-of-images form
            for line in p.read_text().splitlines():
                if line.strip():
                    q = Path(line.strip())
                    images.append(_abspath(q if q.is_absolute() else root / q))
        else:
            raise EvaluationError(f"split '{split}': {p} is neither a folder nor a .txt list of images")
    if not images:
        raise EvaluationError(f"split '{split}' holds no images ({', '.join(map(str, entries))} under {root})")
    return sorted(dict.fromkeys(images))


def label_path_for(image: Path) -> Path:
    """Ultralytics' rule: the last `/images/` becomes `/labels/`, the suffix `.txt`."""
    s = os.fspath(image)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if sa in s:
        head, _, tail = s.rpartition(sa)
        s = head + sb + tail
    return Path(s).with_suffix(".txt")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header (PIL reads no pixels); DICOM through `inference.load_image`."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - not a raster PIL knows (DICOM): fall back to the shared loader
        try:
            return inference.load_image(path).meta.size
        except inference.ImageDecodeError as err:
            raise EvaluationError(f"{path}: {err}") from None


def read_yolo_boxes(label_file: Path, width: int, height: int) -> tuple[np.ndarray, set[int]]:
    """xyxy boxes in pixels from a YOLO label file (box rows, or polygon rows -> their bounding box)."""
    boxes, classes = [], set()
    for lineno, line in enumerate(label_file.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls, values = int(float(parts[0])), [float(v) for v in parts[1:]]
        except ValueError:
            raise EvaluationError(f"{label_file}:{lineno}: not a YOLO row: {line.strip()!r}") from None
        if len(values) == 4:
            cx, cy, w, h = values
            x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        elif len(values) >= 6 and len(values) % 2 == 0:
            xs, ys = values[0::2], values[1::2]
            x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
        else:
            raise EvaluationError(f"{label_file}:{lineno}: expected 'class cx cy w h' or a polygon, got {line.strip()!r}")
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise EvaluationError(f"{label_file}:{lineno}: non-finite coordinates")
        classes.add(cls)
        boxes.append([min(max(x1, 0), 1) * width, min(max(y1, 0), 1) * height,
                      min(max(x2, 0), 1) * width, min(max(y2, 0), 1) * height])
    return np.array(boxes, dtype=np.float64).reshape(-1, 4), classes


def _read_splits_csv(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise EvaluationError(f"{csv_path} has no 'path' column (columns: {reader.fieldnames})")
        return [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]


def _match_split_rows(images: list[Path], rows: list[dict[str, str]], bases: list[Path], split: str) -> tuple[list[dict | None], list[str]]:
    """splits.csv row for each image: by path (as written, or symlink-resolved), else unique file name, else sha256."""
    by_path: dict[str, dict] = {}
    by_name: dict[str, list[dict]] = {}
    by_sha: dict[str, dict] = {}
    for row in rows:
        p = Path(row["path"])
        for cand in ([p] if p.is_absolute() else [b / p for b in bases]):
            by_path.setdefault(os.fspath(_abspath(cand)), row)
            with contextlib.suppress(OSError):
                by_path.setdefault(os.fspath(cand.resolve()), row)
        if row.get("split", split) in (split, ""):
            by_name.setdefault(p.name, []).append(row)
        if row.get("sha256"):
            by_sha.setdefault(row["sha256"].lower(), row)
    out: list[dict | None] = []
    how = {"name": 0, "sha256": 0}
    for img in images:
        row = by_path.get(os.fspath(img))
        if row is None:
            with contextlib.suppress(OSError):
                row = by_path.get(os.fspath(img.resolve()))
        if row is None and len(by_name.get(img.name, [])) == 1:
            row = by_name[img.name][0]
            how["name"] += 1
        if row is None and by_sha:
            row = by_sha.get(inference.sha256_file(img))
            how["sha256"] += row is not None
        out.append(row)
    notes = [f"{n} image(s) matched to splits.csv by {k} (not by path)" for k, n in how.items() if n]
    return out, notes


def load_ground_truth(data_yaml: str | Path, split: str = "test") -> GroundTruth:
    """The true boxes, labels, sources, regions and groups of one split of a Bone-R/Ultralytics tree."""
    data_yaml = Path(data_yaml)
    root, cfg = load_dataset_yaml(data_yaml)
    paths = _split_images(root, cfg, split)
    notes: list[str] = []
    csv_path = next((p for p in (_abspath(data_yaml).parent / "splits.csv", root / "splits.csv") if p.is_file()), None)
    rows: list[dict | None] = [None] * len(paths)
    sha = None
    if csv_path is None:
        notes.append("no splits.csv beside the dataset yaml: source and region are 'unknown' and each image is its own group")
    else:
        sha = inference.sha256_file(csv_path)
        rows, match_notes = _match_split_rows(paths, _read_splits_csv(csv_path), [_abspath(data_yaml).parent, root], split)
        notes += match_notes
        missing = sum(r is None for r in rows)
        if missing:
            notes.append(f"{missing} image(s) of split '{split}' are not in splits.csv: source/region 'unknown', own group")
        wrong = sum(1 for r in rows if r is not None and r.get("split") and r["split"] != split)
        if wrong:
            raise EvaluationError(f"{wrong} image(s) under split '{split}' are listed in splits.csv under another split")
    images: list[GTImage] = []
    n_missing_labels = n_weak = n_conflict = 0
    other_classes: set[int] = set()
    for path, row in zip(paths, rows):
        width, height = image_size(path)
        label_file = label_path_for(path)
        if label_file.is_file():
            boxes, classes = read_yolo_boxes(label_file, width, height)
            other_classes |= classes - {0}
        else:
            boxes = np.zeros((0, 4))
            n_missing_labels += 1
        key = os.path.relpath(path, root) if path.is_relative_to(root) else os.fspath(path)
        key = Path(key).as_posix()
        row = row or {}
        label, boxes_known = int(len(boxes) > 0), True
        csv_label = row.get("label", "")
        if not boxes.size and csv_label in ("1", "1.0"):
            if row.get("weak", "").lower() in TRUTHY:
                label, boxes_known = 1, False
                n_weak += 1
            else:
                n_conflict += 1
        elif boxes.size and csv_label in ("0", "0.0"):
            n_conflict += 1
        images.append(GTImage(path, key, int(width), int(height), boxes, label,
                              row.get("source") or "unknown", row.get("region") or "unknown",
                              row.get("group") or key, boxes_known))
    if n_missing_labels:
        notes.append(f"{n_missing_labels} image(s) have no label file and count as negatives")
    if other_classes:
        notes.append(f"label classes {sorted(other_classes)} besides 0 were counted as fracture (single-class evaluation)")
    if n_weak:
        notes.append(f"{n_weak} weak positive(s) (image-level label, no box): image level only, not in box metrics")
    if n_conflict:
        notes.append(f"{n_conflict} image(s) whose splits.csv label disagrees with the label file; the label file was used")
    contract_path, contract = tree_contract(data_yaml)
    return GroundTruth(images, split, os.fspath(data_yaml), root, notes, sha, contract, contract_path)


def ground_truth_from_folder(images_dir: str | Path, labels_dir: str | Path | None = None, *, all_positive: bool = False,
                             all_negative: bool = False, source: str = "external", region: str = "unknown") -> GroundTruth:
    """Ground truth for a plain folder (external validation).

    Labels: YOLO files named like the image (`labels_dir`, default: the Ultralytics
    images->labels sibling if it exists, else the images folder itself). With
    `all_positive` every image is a positive known only at image level (no boxes);
    `all_negative` makes every image a negative (no label files read).
    """
    images_dir = _abspath(images_dir)
    if not images_dir.is_dir():
        raise EvaluationError(f"not a folder: {images_dir}")
    if all_positive and all_negative:
        raise EvaluationError("choose at most one of all-positive and all-negative")
    paths = [_abspath(p) for p in inference.list_images(images_dir)]
    if not paths:
        raise EvaluationError(f"no images found in {images_dir}")
    notes = [f"external folder {images_dir}: each image is its own group"]
    images = []
    missing = 0
    for path in paths:
        width, height = image_size(path)
        key = Path(os.path.relpath(path, images_dir)).as_posix()
        boxes, label, known = np.zeros((0, 4)), 0, True
        if all_positive:
            label, known = 1, False
        elif not all_negative:
            if labels_dir is not None:
                label_file = _abspath(labels_dir) / Path(key).with_suffix(".txt")
            else:
                label_file = label_path_for(path)
                if not label_file.is_file():
                    label_file = path.with_suffix(".txt")
            if label_file.is_file():
                boxes, _ = read_yolo_boxes(label_file, width, height)
            else:
                missing += 1
            label = int(len(boxes) > 0)
        images.append(GTImage(path, key, width, height, boxes, label, source, region, key, known))
    if all_positive:
        notes.append("--all-positive: every image is a positive known at image level only; no box metrics")
    if all_negative:
        notes.append("--all-negative: every image is a negative")
    if missing:
        if missing == len(paths):
            raise EvaluationError(f"no label files found for the images in {images_dir}; pass --labels, --all-positive or --all-negative")
        notes.append(f"{missing} image(s) have no label file and count as negatives")
    return GroundTruth(images, "external", os.fspath(images_dir), images_dir, notes, None)


# --------------------------------------------------------------------------- predictions


@dataclass
class ImagePrediction:
    boxes: np.ndarray  # (n, 4) xyxy, original pixels
    scores: np.ndarray  # (n,)

    @classmethod
    def empty(cls) -> ImagePrediction:
        return cls(np.zeros((0, 4)), np.zeros(0))

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ImagePrediction:
        dets = [inference.Detection.from_dict(d) for d in record.get("detections") or []]
        return cls(np.array([d.xyxy for d in dets], dtype=np.float64).reshape(-1, 4), np.array([d.score for d in dets], dtype=np.float64))

    @property
    def max_score(self) -> float:
        return float(self.scores.max()) if self.scores.size else 0.0


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a results.json (`inference.py --json`): a list, one record, or {"predictions": [...]}."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"predictions file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EvaluationError(f"{path} is not valid JSON: {err}") from None
    if isinstance(data, dict):
        data = data.get("predictions", [data]) if "image" not in data else [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) and "image" in r for r in data):
        raise EvaluationError(f"{path}: expected a list of prediction records with an 'image' key each")
    return data


class _PathIndex:
    """Finds the ground-truth image a prediction's `image` path names."""

    def __init__(self, gt: GroundTruth, bases: Sequence[Path]):
        self.gt = gt
        self.bases = [_abspath(b) for b in bases]
        self.exact: dict[str, int] = {}
        self.by_name: dict[str, list[int]] = {}
        for i, im in enumerate(gt.images):
            self.exact[os.fspath(im.path)] = i
            with contextlib.suppress(OSError):
                self.exact.setdefault(os.fspath(im.path.resolve()), i)
            self.by_name.setdefault(im.path.name, []).append(i)

    def lookup(self, image: str) -> int | None:
        p = Path(image)
        cands = [p] if p.is_absolute() else [b / p for b in self.bases]
        for c in cands:
            i = self.exact.get(os.fspath(_abspath(c)))
            if i is not None:
                return i
        # Predictions made elsewhere (another machine, another root): the longest trailing
        # path that names exactly one image of the split.
        # It must share its last min(3, all) parts (e.g. images/test/x.png), so that
        # images/test/x.png never matches images/val/x.png.
        parts = Path(os.path.normpath(image)).parts
        need = min(3, len(parts))
        lens = {i: self._suffix_len(self.gt.images[i].path.parts, parts) for i in self.by_name.get(p.name, [])}
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


def match_predictions(records: Sequence[dict[str, Any]], gt: GroundTruth, bases: Sequence[Path] = ()) -> tuple[list[ImagePrediction | None], list[dict], list[str]]:
    """Align records with `gt.images`.

    Returns (predictions aligned with gt, None where missing; records that match no
    image of this split; errors: failed predictions, duplicates, size mismatches).
    """
    bases = list(bases) + [Path.cwd()] + ([gt.root] if gt.root else [])
    index = _PathIndex(gt, bases)
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


def harmonization_for(predictor: Any, gt: GroundTruth, harmonize: str = "auto") -> tuple[inference.Contract | None, list[str]]:
    """(contract to use instead of the predictor's, or None; notes) for predicting `gt`'s images.

    "auto": images of a tree that carries a contract.json are already harmonized, so they
    reach the model as stored (`IDENTITY_CONTRACT`), as in training; other images (plain
    folders, external sets) are harmonized with the model's contract. "yes" / "no" force it.
    """
    if harmonize not in ("auto", "yes", "no"):
        raise ValueError(f"harmonize must be auto, yes or no, got {harmonize!r}")
    if harmonize == "no" or (harmonize == "auto" and gt.tree_contract is not None):
        notes = ["images fed to the model as stored (the tree is already harmonized"
                 + (f": {inference.display_path(gt.tree_contract_path)}" if gt.tree_contract_path else "") + "); no second harmonization"]
        if gt.tree_contract is not None and gt.tree_contract != predictor.contract:
            notes.append(f"WARNING: the tree was harmonized with {gt.tree_contract.to_dict()} but the model's contract is "
                         f"{predictor.contract.to_dict()}")
        return IDENTITY_CONTRACT, notes
    return None, [f"images harmonized at prediction time with {predictor.contract.to_dict()}"]


def predict_split(predictor: Any, gt: GroundTruth, min_score: float = DEFAULT_MIN_SCORE, progress: bool = True,
                  harmonize: str = "auto") -> list[dict[str, Any]]:
    """Predict every image of `gt` (boxes kept down to `min_score`) -> records as `inference.py --json` writes them.

    `harmonize`: see `harmonization_for` (a pre-harmonized tree is not harmonized twice).
    Scores are kept at full precision (the JSON writer rounds them to 5 decimals), so a
    threshold chosen from these records reproduces exactly at prediction time.
    """
    from tqdm import tqdm

    contract, _ = harmonization_for(predictor, gt, harmonize)
    records = []
    for im in tqdm(gt.images, desc=f"predict {gt.split}", unit="img", disable=not progress):
        try:
            pred = predictor.predict(im.path, "balanced", min_score=min_score, contract=contract)
        except inference.ImageDecodeError as err:
            records.append({"image": os.fspath(im.path), "error": str(err)})
            continue
        rec = pred.to_record() | {"min_score": min_score}
        for d, det in zip(rec["detections"], pred.detections):
            d["score"] = det.score
            d["xyxy"] = list(det.xyxy)
        records.append(rec)
    return records


def image_scores(preds: Sequence[ImagePrediction | None]) -> np.ndarray:
    """Each image's score: its highest box score, 0 without boxes."""
    return np.array([p.max_score if p is not None else 0.0 for p in preds], dtype=np.float64)


# --------------------------------------------------------------------------- box metrics


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of xyxy boxes (continuous coordinates, as pycocotools)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def coco_dicts(gt: GroundTruth, preds: Sequence[ImagePrediction | None]) -> tuple[dict, list[dict]]:
    """pycocotools inputs: the ground-truth dataset dict (negatives as images without
    annotations) and the detection list. Image ids are 1 + the index in `gt.images`;
    images whose boxes are unknown (weak positives) are left out."""
    images, anns, dets = [], [], []
    for i, (im, pred) in enumerate(zip(gt.images, preds)):
        if not im.boxes_known:
            continue
        images.append({"id": i + 1, "width": im.width, "height": im.height, "file_name": im.key})
        for x1, y1, x2, y2 in im.boxes:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        if pred is not None:
            for (x1, y1, x2, y2), s in zip(pred.boxes, pred.scores):
                dets.append({"image_id": i + 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)})
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "fracture"}]}, dets


def box_metrics(gt: GroundTruth, preds: Sequence[ImagePrediction | None], max_dets: int = COCO_MAX_DETS) -> dict[str, Any]:
    """mAP@0.5 and mAP@0.5:0.95 with pycocotools (area 'all', `max_dets` per image).

    null when there is no true box (AP undefined); 0.0 when there are true boxes but no
    detections. `pr_iou50` holds COCO's interpolated precision at 101 recall points, IoU 0.5.
    """
    coco_gt_dict, dets = coco_dicts(gt, preds)
    n_gt = len(coco_gt_dict["annotations"])
    out: dict[str, Any] = {"map50": None, "map50_95": None, "n_gt_boxes": n_gt, "n_images": len(coco_gt_dict["images"]),
                           "n_detections": len(dets), "max_dets": max_dets, "pr_iou50": []}
    if n_gt == 0:
        out["note"] = "no true boxes: mAP undefined"
        return out
    if not dets:
        out.update(map50=0.0, map50_95=0.0, note="no detections")
        return out
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = coco_gt_dict
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        # One area range and one max-dets setting: what we report, 4x cheaper than the defaults.
        ev.params.areaRng, ev.params.areaRngLbl, ev.params.maxDets = [[0, 1e10]], ["all"], [max_dets]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, 0, 0, -1]  # [iou thresholds, recall points]

    def mean_ap(p: np.ndarray) -> float:
        p = p[p > -1]
        return float(p.mean()) if p.size else 0.0

    out["map50"] = round(mean_ap(precision[0]), 6)
    out["map50_95"] = round(mean_ap(precision), 6)
    out["pr_iou50"] = [{"recall": round(float(r), 4), "precision": round(max(float(p), 0.0), 6)}
                       for r, p in zip(ev.params.recThrs, precision[0])]
    return out


# --------------------------------------------------------------------------- image level


def _rates(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    def ratio(a, b):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)

    return {"sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp), "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn)}


UNDEFINED_WHY = {
    "sensitivity": "undefined (0/0): no positive images",
    "specificity": "undefined (0/0): no negative images",
    "ppv": "undefined (0/0): no image predicted positive",
    "npv": "undefined (0/0): no image predicted negative",
}


def _group_index(groups: Sequence[Any] | None, n: int) -> np.ndarray:
    if groups is None:
        return np.arange(n)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} images")
    return np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)[1].reshape(-1)


def bootstrap_counts(counts: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Resample the rows of `counts` (one per group) with replacement, `n_boot` times -> summed counts.

    A multinomial draw of how often each group is picked is the same as drawing the
    groups themselves, without materializing n_boot x n_groups indices at once.
    """
    counts = np.asarray(counts, dtype=np.float64)
    g = counts.shape[0]
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, counts.shape[1]))
    chunk = max(1, 2_000_000 // max(g, 1))
    pvals = np.full(g, 1.0 / g)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        weights = rng.multinomial(g, pvals, size=m)
        out[start:start + m] = weights @ counts
    return out


# Intervals at small n: below MIN_INTERVAL_N cases no interval is given ("too few"); below MIN_BOOTSTRAP_N, or when
# the bootstrap collapses to one value (e.g. 3/3 positives found), the Wilson score interval of the counts is used.
MIN_INTERVAL_N = 5
MIN_BOOTSTRAP_N = 30
DENOMINATORS = {"sensitivity": ("tp", "fn"), "specificity": ("tn", "fp"), "ppv": ("tp", "fp"), "npv": ("tn", "fn")}


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score 95% interval of k successes in n trials (never degenerate, stays in [0, 1])."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def confusion_metrics(labels: Sequence[Any], predicted: Sequence[Any], groups: Sequence[Any] | None = None,
                      n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """TP/FP/TN/FN and sensitivity, specificity, PPV, NPV with 95% intervals: the group bootstrap, or Wilson's at
    small n (see MIN_BOOTSTRAP_N), or none below MIN_INTERVAL_N; each entry's `ci_method` says which."""
    labels = np.asarray(labels, dtype=bool)
    predicted = np.asarray(predicted, dtype=bool)
    gidx = _group_index(groups, len(labels))
    n_groups = int(gidx.max()) + 1 if len(gidx) else 0
    cells = np.stack([labels & predicted, ~labels & predicted, ~labels & ~predicted, labels & ~predicted], axis=1).astype(np.float64)
    tp, fp, tn, fn = (int(v) for v in cells.sum(axis=0))
    point = _rates(tp, fp, tn, fn)
    boot = None
    if n_boot > 0 and n_groups > 0:
        per_group = np.zeros((n_groups, 4))
        np.add.at(per_group, gidx, cells)
        sums = bootstrap_counts(per_group, n_boot, seed)
        boot = _rates(sums[:, 0], sums[:, 1], sums[:, 2], sums[:, 3])
    out: dict[str, Any] = {"n_images": int(len(labels)), "n_positive": int(labels.sum()), "n_negative": int((~labels).sum()),
                           "n_groups": n_groups, "tp": tp, "fp": fp, "tn": tn, "fn": fn}
    for name, value in point.items():
        value = float(value)
        if math.isnan(value):
            out[name] = {"value": None, "ci": None, "note": UNDEFINED_WHY[name]}
            continue
        entry: dict[str, Any] = {"value": round(value, 6), "ci": None}
        hit, miss = (out[k] for k in DENOMINATORS[name])
        n = hit + miss
        if n < MIN_INTERVAL_N:
            entry["note"] = f"too few (n={n}) for an interval"
        elif boot is not None:
            samples = boot[name][~np.isnan(boot[name])]
            if samples.size:
                lo, hi = np.percentile(samples, [2.5, 97.5])
                entry["ci"], entry["ci_method"] = [round(float(lo), 6), round(float(hi), 6)], "group bootstrap"
            if samples.size < n_boot:
                entry["n_boot_defined"] = int(samples.size)
            if n < MIN_BOOTSTRAP_N or entry["ci"] is None or entry["ci"][0] == entry["ci"][1]:
                entry["ci"] = [round(v, 6) for v in wilson_interval(hit, n)]
                entry["ci_method"] = "wilson"
        out[name] = entry
    return out


def image_level(labels: Sequence[Any], scores: Sequence[float], threshold: float, groups: Sequence[Any] | None = None,
                n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """Image-level metrics at `threshold`: predicted positive iff score >= threshold (and score > 0)."""
    scores = np.asarray(scores, dtype=np.float64)
    predicted = (scores >= threshold) & (scores > 0)
    return {"threshold": float(threshold)} | confusion_metrics(labels, predicted, groups, n_boot, seed)


def _sens_spec_at(labels: np.ndarray, scores: np.ndarray, taus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos = np.sort(scores[labels])
    neg = np.sort(scores[~labels])
    tp = len(pos) - np.searchsorted(pos, taus, side="left")
    fp = len(neg) - np.searchsorted(neg, taus, side="left")
    return tp / len(pos), 1.0 - fp / len(neg)


def choose_operating_points(labels: Sequence[Any], scores: Sequence[float], target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
                            target_specificity: float = DEFAULT_TARGET_SPECIFICITY) -> dict[str, dict[str, Any]]:
    """screening / balanced / specific thresholds from image-level labels and scores (see the module doc).

    Candidates are the observed positive scores plus one just above the highest score;
    images without detections (score 0) are never predicted positive.
    Raises ValueError when the labels lack positives or negatives or no image has a detection.
    """
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels for {len(scores)} scores")
    if labels.all() or not labels.any():
        raise ValueError("cannot choose operating points: the validation images must include positives and negatives")
    cands = np.unique(scores[scores > 0])
    if cands.size == 0:
        raise ValueError("cannot choose operating points: no validation image has a detection")
    above = np.nextafter(cands[-1], np.inf)
    if above <= 1.0:
        cands = np.append(cands, above)
    sens, spec = _sens_spec_at(labels, scores, cands)

    def entry(i: int, target: float | None, reached: bool) -> dict[str, Any]:
        return {"threshold": float(cands[i]), "source": "val", "target": target, "val_sensitivity": round(float(sens[i]), 6),
                "val_specificity": round(float(spec[i]), 6), "target_reached": bool(reached)}

    # Unreachable target: the best achievable value, at the most conservative tau giving it.
    reached = bool((sens >= target_sensitivity - 1e-12).any())
    ok = np.nonzero(sens >= (target_sensitivity if reached else sens.max()) - 1e-12)[0]
    screening = entry(int(ok.max()), target_sensitivity, reached)
    youden = sens + spec - 1.0
    best = np.nonzero(youden >= youden.max() - 1e-12)[0]
    balanced = entry(int(best.max()), None, True)
    reached = bool((spec >= target_specificity - 1e-12).any())
    ok = np.nonzero(spec >= (target_specificity if reached else spec.max()) - 1e-12)[0]
    specific = entry(int(ok.min()), target_specificity, reached)
    return {"screening": screening, "balanced": balanced, "specific": specific}


def normalize_operating_points(thresholds: dict[str, Any], source: str = "given") -> dict[str, dict[str, Any]]:
    """{mode: float} or {mode: {"threshold": float, ...}} (a model card's `thresholds`) -> operating points."""
    out = {}
    for mode, value in thresholds.items():
        if mode not in MODES:
            raise EvaluationError(f"unknown mode {mode!r} in thresholds; modes: {', '.join(MODES)}")
        entry = dict(value) if isinstance(value, dict) else {"threshold": value}
        try:
            tau = float(entry["threshold"])
        except (KeyError, TypeError, ValueError):
            raise EvaluationError(f"thresholds[{mode!r}] has no numeric 'threshold'") from None
        if not 0.0 <= tau <= 1.0:
            raise EvaluationError(f"thresholds[{mode!r}] = {tau} is outside [0, 1]")
        entry["threshold"] = tau
        entry.setdefault("source", source)
        out[mode] = entry
    if not out:
        raise EvaluationError("no operating thresholds given")
    return out


def roc_auc(labels: Sequence[Any], scores: Sequence[float]) -> float | None:
    """Image-level ROC AUC (Mann-Whitney, ties count half); None without both classes."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg_rank = first + (counts + 1) / 2.0  # 1-based average rank of each tie block
    ranks[order] = np.repeat(avg_rank, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def image_pr_curve(labels: Sequence[Any], scores: Sequence[float], max_points: int = MAX_CURVE_POINTS) -> list[dict[str, float]]:
    """Image-level precision/recall at every observed score (thinned to `max_points`)."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    taus = np.unique(scores[scores > 0])[::-1]
    if not taus.size or not labels.any():
        return []
    pos, neg = np.sort(scores[labels]), np.sort(scores[~labels])
    tp = len(pos) - np.searchsorted(pos, taus, side="left")
    fp = len(neg) - np.searchsorted(neg, taus, side="left")
    keep = np.unique(np.linspace(0, len(taus) - 1, min(max_points, len(taus))).round().astype(int))
    return [{"threshold": float(taus[i]), "precision": round(float(tp[i] / (tp[i] + fp[i])), 6),
             "recall": round(float(tp[i] / len(pos)), 6)} for i in keep]


# --------------------------------------------------------------------------- localization


def localization_hits(gt: GroundTruth, preds: Sequence[ImagePrediction | None], threshold: float, iou: float = DEFAULT_LOC_IOU) -> dict[str, np.ndarray]:
    """Per image: `flagged` (a box >= threshold), `found` (a box >= threshold with IoU >= iou on a true box)
    and `known` (the image's boxes are known, so localization can be judged)."""
    flagged, found, known = [], [], []
    for im, pred in zip(gt.images, preds):
        pred = pred or ImagePrediction.empty()
        keep = (pred.scores >= threshold) & (pred.scores > 0)
        flagged.append(bool(keep.any()))
        hit = bool(keep.any() and len(im.boxes) and (box_iou(pred.boxes[keep], im.boxes) >= iou).any())
        found.append(hit)
        known.append(im.boxes_known)
    return {"flagged": np.array(flagged, bool), "found": np.array(found, bool), "known": np.array(known, bool)}


def localization_metrics(gt: GroundTruth, preds: Sequence[ImagePrediction | None], threshold: float, iou: float = DEFAULT_LOC_IOU,
                         n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """Localization-aware sensitivity: a positive counts as found only when a box >= threshold hits a true box."""
    hits = localization_hits(gt, preds, threshold, iou)
    labels = gt.labels
    keep = hits["known"] & labels
    groups = [g for g, k in zip(gt.groups, keep) if k]
    res = confusion_metrics(np.ones(int(keep.sum()), bool), hits["found"][keep], groups, n_boot, seed)
    found = int(hits["found"][keep].sum())
    mislocalized = int((hits["flagged"] & ~hits["found"])[keep].sum())
    return {"threshold": float(threshold), "n_positive": int(keep.sum()), "found": found, "mislocalized": mislocalized,
            "missed": int(keep.sum()) - found, "sensitivity": res["sensitivity"]}


def froc(gt: GroundTruth, preds: Sequence[ImagePrediction | None], iou: float = DEFAULT_LOC_IOU,
         thresholds: Iterable[float] | None = None) -> list[dict[str, float]]:
    """Lesion-level FROC points: sensitivity (true boxes hit) vs false-positive boxes per image."""
    lesion_best: list[float] = []  # per true box: the best score of a box hitting it (0 if none)
    fp_scores: list[float] = []
    n_images = 0
    for im, pred in zip(gt.images, preds):
        if not im.boxes_known:
            continue
        n_images += 1
        pred = pred or ImagePrediction.empty()
        if len(im.boxes) and len(pred.boxes):
            hit = box_iou(pred.boxes, im.boxes) >= iou
            lesion_best += [float(pred.scores[hit[:, j]].max()) if hit[:, j].any() else 0.0 for j in range(len(im.boxes))]
            fp_scores += pred.scores[~hit.any(axis=1)].tolist()
        else:
            lesion_best += [0.0] * len(im.boxes)
            fp_scores += pred.scores.tolist()
    taus = sorted(set(FROC_THRESHOLDS if thresholds is None else thresholds))
    lesions, fps = np.array(lesion_best), np.sort(np.array(fp_scores))
    points = []
    for tau in taus:
        sens = float(((lesions >= tau) & (lesions > 0)).mean()) if lesions.size else None
        n_fp = len(fps) - int(np.searchsorted(fps, tau, side="left"))
        points.append({"threshold": float(tau), "sensitivity": None if sens is None else round(sens, 6),
                       "fp_per_image": round(n_fp / n_images, 6) if n_images else None, "n_lesions": int(lesions.size)})
    return points


# --------------------------------------------------------------------------- the report


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _breakdown(gt: GroundTruth, preds: Sequence[ImagePrediction | None], scores: np.ndarray, ops: dict[str, dict], attr: str,
               n_boot: int, seed: int, max_dets: int, one_per_group: bool = False) -> dict[str, Any]:
    """Metrics per value of `attr` (source or region), each with its own ROC AUC. `one_per_group`: each group
    (a radiograph's augmented copies, near-duplicates) counts once, by its first image in file-name order."""
    values = sorted({getattr(im, attr) for im in gt.images})
    out = {}
    for value in values:
        idx = [i for i, im in enumerate(gt.images) if getattr(im, attr) == value]
        if one_per_group:
            first: dict[str, int] = {}
            for i in sorted(idx, key=lambda i: gt.images[i].key):
                first.setdefault(gt.images[i].group, i)
            idx = sorted(first.values())
        sub = gt.subset(idx)
        sub_preds = [preds[i] for i in idx]
        box = box_metrics(sub, sub_preds, max_dets)
        box.pop("pr_iou50", None)
        auc = roc_auc(sub.labels, scores[idx])
        out[value] = {
            "n_images": len(idx), "n_positive": sub.n_positive, "n_gt_boxes": box["n_gt_boxes"], "box": box,
            "image_auc": None if auc is None else round(auc, 6),
            "image_level": {mode: image_level(sub.labels, scores[idx], op["threshold"], sub.groups, n_boot, seed) for mode, op in ops.items()},
        }
    return out


def mean_over(parts: dict[str, Any], mode: str = "balanced") -> dict[str, Any]:
    """The unweighted mean over sources of what each defines (a source with one class has no AUC or specificity;
    a rate from fewer than MIN_INTERVAL_N cases is left out, as it has no interval either)."""
    def mean(values: list[float | None]) -> dict[str, Any]:
        got = [v for v in values if v is not None]
        return {"value": round(float(np.mean(got)), 6) if got else None, "n_sources": len(got)}

    def rate(part: dict[str, Any], name: str) -> float | None:
        entry = part["image_level"][mode][name]
        return None if str(entry.get("note", "")).startswith("too few") else entry["value"]

    return {"image_auc": mean([p["image_auc"] for p in parts.values()]),
            "map50": mean([p["box"].get("map50") for p in parts.values()]),
            "sensitivity": mean([rate(p, "sensitivity") for p in parts.values()]),
            "specificity": mean([rate(p, "specificity") for p in parts.values()]),
            "mode": mode}


def evaluate_predictions(gt: GroundTruth, preds: Sequence[ImagePrediction | None], operating_points: dict[str, Any], *,
                         n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED, iou: float = DEFAULT_LOC_IOU,
                         max_dets: int = COCO_MAX_DETS, breakdown: bool = True) -> dict[str, Any]:
    """The full report (schema in the module doc) for predictions aligned with `gt.images`.

    `operating_points`: {mode: threshold} or {mode: {"threshold": ..., "source": ...}}; a
    missing prediction (None) counts as an image without detections.
    """
    if len(preds) != len(gt):
        raise ValueError(f"{len(preds)} predictions for {len(gt)} images")
    ops = normalize_operating_points(operating_points)
    labels, scores, groups = gt.labels, image_scores(preds), gt.groups
    box = box_metrics(gt, preds, max_dets)
    pr_box = box.pop("pr_iou50")
    notes = list(gt.notes)
    if box.get("note"):
        notes.append(f"box metrics: {box['note']}")
    report: dict[str, Any] = {
        "split": gt.split, "data": inference.display_path(gt.data), "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "n_images": len(gt), "n_positive": gt.n_positive, "n_groups": len(set(groups)), "splits_sha256": gt.splits_sha256,
        "box": box, "image_auc": {"roc_auc": None if (a := roc_auc(labels, scores)) is None else round(a, 6)},
        "operating_points": ops,
        "image_level": {mode: image_level(labels, scores, op["threshold"], groups, n_boot, seed) for mode, op in ops.items()},
        "localization": {"iou": iou} | {mode: localization_metrics(gt, preds, op["threshold"], iou, n_boot, seed) for mode, op in ops.items()},
        "froc": froc(gt, preds, iou, list(FROC_THRESHOLDS) + [op["threshold"] for op in ops.values()]),
        "boxes_per_flagged_image": {mode: boxes_per_flagged_image(preds, op["threshold"]) for mode, op in ops.items()},
        "pr_curve": {"image": image_pr_curve(labels, scores), "box_iou50": pr_box},
        "settings": {"n_boot": n_boot, "seed": seed, "iou": iou, "max_dets": max_dets, "min_score": DEFAULT_MIN_SCORE},
        "errors": [],
        "notes": notes,
    }
    for mode, res in report["image_level"].items():
        for metric in ("sensitivity", "specificity", "ppv", "npv"):
            if res[metric]["value"] is None:
                notes.append(f"{mode}: {metric} {res[metric]['note']}")
    if breakdown:
        report["by_source"] = _breakdown(gt, preds, scores, ops, "source", n_boot, seed, max_dets)
        report["by_region"] = _breakdown(gt, preds, scores, ops, "region", n_boot, seed, max_dets)
        # the headline: each radiograph once (Roboflow's augmented copies and near-duplicates share a group)
        report["by_source_radiographs"] = _breakdown(gt, preds, scores, ops, "source", n_boot, seed, max_dets, one_per_group=True)
        report["mean_over_sources"] = mean_over(report["by_source_radiographs"])
    return jsonable(report)


def boxes_per_flagged_image(preds: Sequence[ImagePrediction | None], threshold: float) -> dict[str, Any]:
    """How many boxes a reader sees on each image the model flags (at least one box >= threshold)."""
    counts = np.array([int((p.scores >= threshold).sum()) for p in preds if p is not None and p.max_score >= threshold])
    if not len(counts):
        return {"n_flagged": 0, "median": None, "p90": None, "max": None}
    return {"n_flagged": int(len(counts)), "median": float(np.median(counts)), "p90": float(np.percentile(counts, 90)),
            "max": int(counts.max())}


# Candidates searched by `choose_box_rule`: class-agnostic NMS IoU x containment x boxes per image.
BOX_RULE_GRID = {"nms_iou": (None, 0.5, 0.4, 0.3), "contained": (None, 0.8, 0.6), "max_boxes": (None, 5, 3, 2)}
BOX_RULE_MAX_P90 = 3  # the reader's budget: 90% of flagged images show at most this many boxes (balanced mode)


def apply_box_rule(records: Sequence[dict[str, Any]], rule: inference.BoxRule) -> list[dict[str, Any]]:
    """Records (results.json) with `rule` applied to each image's detections (new dicts; inputs untouched)."""
    out = []
    for rec in records:
        dets = rec.get("detections")
        if not dets:
            out.append(rec)
            continue
        keep = rule.keep(np.array([d["xyxy"] for d in dets], dtype=np.float64), np.array([d["score"] for d in dets]))
        out.append(rec | {"detections": [dets[i] for i in keep]})
    return out


def choose_box_rule(gt: GroundTruth, preds: Sequence[ImagePrediction | None],
                    max_p90: float = BOX_RULE_MAX_P90) -> tuple[inference.BoxRule, list[dict[str, Any]]]:
    """The box rule for a model, chosen on validation predictions made without one.

    Each candidate of BOX_RULE_GRID is scored by val mAP@0.5 and by the 90th percentile of boxes per flagged image at
    the balanced threshold (chosen on val: the rule never removes an image's top box, so image scores and
    thresholds do not change). Chosen: the best mAP@0.5 among candidates within `max_p90`, the simpler on ties;
    when none fits, the smallest p90. Returns (rule, the table of every candidate)."""
    import itertools

    scores = image_scores(preds)
    threshold = choose_operating_points(gt.labels, scores)["balanced"]["threshold"]
    table = []
    for nms_iou, contained, max_boxes in itertools.product(*BOX_RULE_GRID.values()):
        rule = inference.BoxRule(nms_iou, contained, max_boxes)
        ruled = []
        for p in preds:
            keep = rule.keep(p.boxes, p.scores) if p is not None and len(p.scores) else None
            ruled.append(p if keep is None else ImagePrediction(p.boxes[keep], p.scores[keep]))
        per_image = boxes_per_flagged_image(ruled, threshold)
        table.append({"rule": rule.to_dict(), "map50": box_metrics(gt, ruled)["map50"], "p90": per_image["p90"],
                      "median": per_image["median"], "max": per_image["max"]})
    simplicity = [sum(v is not None for v in row["rule"].values()) for row in table]
    fits = [i for i, row in enumerate(table) if row["p90"] is None or row["p90"] <= max_p90]
    if fits:
        best = max(fits, key=lambda i: (table[i]["map50"] or 0.0, -simplicity[i]))
    else:
        best = min(range(len(table)), key=lambda i: (table[i]["p90"], -(table[i]["map50"] or 0.0), simplicity[i]))
    for i, row in enumerate(table):
        row["chosen"] = i == best
    return inference.BoxRule(**table[best]["rule"]), table


def _is_predictor(obj: Any) -> bool:
    return hasattr(obj, "predict") and hasattr(obj, "detector")


def _records_outside(records: list[dict], root: Path | None, bases: Sequence[Path]) -> tuple[list[str], int]:
    """Split leftover records into errors (match nothing) and a count of images of other splits of the same tree."""
    errors, other = [], 0
    for rec in records:
        p = Path(str(rec.get("image", "")))
        cands = [p] if p.is_absolute() else [Path(b) / p for b in bases] + ([root / p] if root else [])
        hit = next((c for c in cands if c.is_file()), None)
        if hit is not None and root is not None and _abspath(hit).is_relative_to(root):
            other += 1
        else:
            errors.append(f"{rec.get('image')}: prediction matches no image of the evaluated split(s)")
    return errors, other


def saved_threshold_note(records: Sequence[dict[str, Any]], min_score: float = DEFAULT_MIN_SCORE) -> str | None:
    """A warning when records were saved at an operating threshold instead of down to `min_score`
    (`inference.py --json` without `--conf 0.001`): box mAP is then truncated and no lower
    threshold can be chosen or scored."""
    kept = [float(r["min_score"]) if r.get("min_score") is not None else float(r.get("threshold", 0) or 0)
            for r in records if not r.get("error")]
    floor = min(kept, default=0.0)
    if floor > min_score * 1.5:
        return (f"WARNING: the predictions keep only boxes with score >= {floor:g} (not {min_score:g}): box mAP is truncated "
                f"and thresholds below {floor:g} cannot be chosen or scored; save them with `inference.py --conf {min_score:g} --json`")
    return None


def _missing(gt: GroundTruth, preds: Sequence[ImagePrediction | None], errors: Sequence[str]) -> list[str]:
    errored = {e.split(": ", 1)[0] for e in errors}
    return [f"{im.key}: no prediction" for im, p in zip(gt.images, preds) if p is None and im.key not in errored]


def evaluate_records(records: Sequence[dict[str, Any]], gt: GroundTruth, operating_points: dict[str, Any], *,
                     allow_missing: bool = False, record_bases: Sequence[Path] = (), extra_errors: Sequence[str] = (),
                     n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED, iou: float = DEFAULT_LOC_IOU) -> dict[str, Any]:
    """Match records (results.json) to `gt` and score them at fixed operating points.

    Every image without a prediction, failed/duplicate/mis-sized prediction and prediction
    that matches no image is an error: EvaluationError (with `.errors`) unless
    `allow_missing`, which scores missing images as "no detection" and keeps the list in
    report["errors"]. Predictions on images of other splits of the same tree are counted in
    a note, not used.
    """
    preds, rest, errors = match_predictions(records, gt, record_bases)
    errors = list(extra_errors) + errors + _missing(gt, preds, errors)
    outside, other_split = _records_outside(rest, gt.root, list(record_bases) + [Path.cwd()])
    errors += outside
    if errors and not allow_missing:
        shown = "; ".join(errors[:3]) + (f"; ... ({len(errors) - 3} more)" if len(errors) > 3 else "")
        raise EvaluationError(f"{len(errors)} prediction problem(s): {shown}", errors)
    report = evaluate_predictions(gt, preds, operating_points, n_boot=n_boot, seed=seed, iou=iou)
    report["errors"] = errors
    if errors:
        report["notes"].append(f"{len(errors)} prediction problem(s) (listed in 'errors'); images without a prediction were scored as 'no detection'")
    if other_split:
        report["notes"].append(f"{other_split} prediction(s) on images of other splits were not used")
    if (warning := saved_threshold_note(records)) is not None:
        report["notes"].append(warning)
    return report


def run_evaluation(predictions: Any, data_yaml: str | Path, split: str = "test", val_split: str = "val", *,
                   thresholds: dict[str, Any] | None = None, threshold_source: str = "given",
                   target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY, target_specificity: float = DEFAULT_TARGET_SPECIFICITY,
                   n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED, iou: float = DEFAULT_LOC_IOU,
                   allow_missing: bool = False, min_score: float = DEFAULT_MIN_SCORE, progress: bool = True,
                   record_bases: Sequence[Path] = (), keep_records: bool = False, harmonize: str = "auto",
                   box_rule: str = "card") -> dict[str, Any]:
    """Score a split: `predictions` is an `inference.Predictor` (every image is predicted first)
    or a list of records (results.json). Thresholds: `thresholds` if given, else chosen on
    `val_split` (the records must then cover the val images too).

    `harmonize` (Predictor only): "auto" feeds the images as they are when the tree has a
    `contract.json` (scripts/preprocess.py already harmonized it, as the model saw in
    training) and harmonizes them otherwise; "yes" / "no" force it.
    Raises EvaluationError (with `.errors`) on unmatched images/predictions unless
    `allow_missing` (see `evaluate_records`). With `keep_records` the report carries the
    records under "_records" (the CLI saves them with --save-predictions).
    """
    gt = load_ground_truth(data_yaml, split)
    val_gt = None if thresholds is not None else load_ground_truth(data_yaml, val_split)
    if val_gt is not None and val_split != split:
        shared = {im.path.resolve() for im in gt.images} & {im.path.resolve() for im in val_gt.images}
        if shared:
            raise EvaluationError(f"the '{val_split}' and '{split}' splits of {inference.display_path(data_yaml)} share "
                                  f"{len(shared)} of {len(gt)} image(s) (e.g. {inference.display_path(min(shared))}): thresholds "
                                  f"chosen on the scored images would be optimistic; point '{val_split}' at other images, or "
                                  f"pass --val-split {split} to choose on the scored split knowingly")
    notes: list[str] = []
    if box_rule not in ("card", "none", "choose"):
        raise EvaluationError(f"box_rule must be card, none or choose, got {box_rule!r}")
    if box_rule == "choose" and (not _is_predictor(predictions) or val_gt is None or val_split == split):
        raise EvaluationError("choosing a box rule needs a model (--weights) and a val split other than the scored one, "
                              "without fixed --thresholds")
    rule_report: dict[str, Any] | None = None
    if _is_predictor(predictions):
        if box_rule != "card":
            predictions.box_rule = inference.BoxRule()
        rule_report = {"rule": predictions.box_rule.to_dict(), "source": "none" if box_rule == "none" else "model_card"}
        _, notes = harmonization_for(predictions, gt, harmonize)
        records = predict_split(predictions, gt, min_score, progress, harmonize)
        if val_gt is not None and val_split != split:
            records += predict_split(predictions, val_gt, min_score, progress, harmonize)
    else:
        records = list(predictions)
    test_records, val_errors = records, []
    if val_gt is not None:
        val_preds, rest, errs = match_predictions(records, val_gt, record_bases)
        if val_split == split:
            notes.append(f"thresholds were chosen on '{val_split}', the split they are scored on: optimistic")
            errs = []  # reported once, by the scoring below
        else:
            test_records = rest
        if not any(p is not None for p in val_preds):
            raise EvaluationError(f"no predictions for the '{val_split}' split, so no thresholds can be chosen: "
                                  "predict the val images too (--val-predictions), or pass --thresholds CARD.json")
        val_errors = [f"{val_split}: {e}" for e in errs + (_missing(val_gt, val_preds, errs) if val_split != split else [])]
        if box_rule == "choose":
            rule, table = choose_box_rule(val_gt, val_preds)
            predictions.box_rule = rule
            rule_report = {"rule": rule.to_dict(), "source": val_split, "max_p90": BOX_RULE_MAX_P90, "search": table}
            # the rule keeps each image's top box, so the val image scores (and thresholds) stay as they are
            records, test_records = apply_box_rule(records, rule), apply_box_rule(test_records, rule)
        try:
            ops = choose_operating_points(val_gt.labels, image_scores(val_preds), target_sensitivity, target_specificity)
        except ValueError as err:
            raise EvaluationError(str(err)) from None
    else:
        ops = normalize_operating_points(thresholds, threshold_source)
    report = evaluate_records(test_records, gt, ops, allow_missing=allow_missing, record_bases=record_bases,
                              extra_errors=val_errors, n_boot=n_boot, seed=seed, iou=iou)
    report["settings"].update(min_score=min_score, targets={"sensitivity": target_sensitivity, "specificity": target_specificity},
                              val_split=val_split if val_gt is not None else None)
    report["notes"] += notes
    if rule_report is not None:
        report["box_rule"] = rule_report
    if val_gt is not None:
        report["val"] = {"split": val_split, "n_images": len(val_gt), "n_positive": val_gt.n_positive}
    if keep_records:
        report["_records"] = records
    return report


# --------------------------------------------------------------------------- model card


def card_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The test report's summary as stored in a model card's `metrics`."""

    def slim(level: dict[str, Any]) -> dict[str, Any]:
        return {k: level[k] for k in ("threshold", "sensitivity", "specificity", "ppv", "npv", "tp", "fp", "tn", "fn") if k in level}

    def part(entry: dict[str, Any]) -> dict[str, Any]:
        return {"n_images": entry["n_images"], "n_positive": entry["n_positive"], "n_gt_boxes": entry.get("n_gt_boxes"),
                "box": {k: entry["box"].get(k) for k in ("map50", "map50_95")}, "image_auc": entry.get("image_auc"),
                "image_level": {m: slim(v) for m, v in entry["image_level"].items()}}

    return {
        "split": report["split"], "data": report["data"], "n_images": report["n_images"], "n_positive": report["n_positive"],
        "splits_sha256": report.get("splits_sha256"), "evaluated": report.get("created"),
        "box": {k: report["box"].get(k) for k in ("map50", "map50_95", "n_gt_boxes")},
        "image_auc": report.get("image_auc"),
        "image_level": {m: slim(v) for m, v in report["image_level"].items()},
        "localization": report.get("localization"),
        "boxes_per_flagged_image": report.get("boxes_per_flagged_image"),
        "by_source_radiographs": {k: part(v) for k, v in report.get("by_source_radiographs", {}).items()},
        "mean_over_sources": report.get("mean_over_sources"),
        "by_source": {k: part(v) for k, v in report.get("by_source", {}).items()},
        "by_region": {k: part(v) for k, v in report.get("by_region", {}).items()},
        "bootstrap": {"n_boot": report["settings"]["n_boot"], "seed": report["settings"]["seed"], "resampled": "groups"},
        "notes": report.get("notes", []),
    }


def update_model_card(card_path: str | Path, val_report: dict[str, Any], test_report: dict[str, Any],
                      box_rule: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the val-chosen `thresholds` and the test `metrics` into the card, keeping every other key.

    `val_report` is a report (its `operating_points` are used) or the operating points
    themselves. The card is replaced atomically; a missing card is created.
    """
    card_path = Path(card_path)
    card: dict[str, Any] = {}
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text())
        except json.JSONDecodeError as err:
            raise EvaluationError(f"model card {card_path} is not valid JSON: {err}") from None
        if not isinstance(card, dict):
            raise EvaluationError(f"model card {card_path} does not hold a JSON object")
    ops = val_report.get("operating_points", val_report)
    thresholds = {}
    for mode, op in normalize_operating_points(ops, "val").items():
        entry: dict[str, Any] = {"threshold": op["threshold"]}
        if op.get("target") is not None:
            entry["target"] = op["target"]
        entry["val_sensitivity"] = op.get("val_sensitivity")
        entry["val_specificity"] = op.get("val_specificity")
        if "target_reached" in op:
            entry["target_reached"] = op["target_reached"]
        entry["chosen_on"] = op.get("chosen_on", op.get("source", "val"))
        thresholds[mode] = entry
    card["thresholds"] = thresholds
    if box_rule is not None and box_rule.get("source") != "model_card":  # chosen now, or explicitly none
        card["box_rule"] = box_rule["rule"]
        card["box_rule_chosen_on"] = box_rule["source"]
    card["metrics"] = card_metrics(test_report)
    if test_report.get("settings", {}).get("val_split"):
        card["metrics"]["val_split"] = test_report["settings"]["val_split"]
    tmp = card_path.with_name(card_path.name + ".tmp")
    card_path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(jsonable(card), indent=2) + "\n")
    os.replace(tmp, card_path)
    return card


# --------------------------------------------------------------------------- Ultralytics cross-check


def ultralytics_crosscheck(weights: str | Path, data_yaml: str | Path, split: str = "test", *, imgsz: int | None = None,
                           ours: dict[str, Any] | None = None, device: str = "cpu") -> dict[str, Any]:
    """Ultralytics' own `val()` mAP on the split beside ours.

    Ultralytics reads the raw dataset images itself (its own letterbox, no
    `inference.harmonize`) and writes a labels cache beside the labels, so it runs on a
    temporary tree of symbolic links (the dataset is never written to) with an
    absolute-path yaml.
    """
    import yaml

    os.environ.setdefault("YOLO_OFFLINE", "1")
    root, cfg = load_dataset_yaml(data_yaml)
    gt = load_ground_truth(data_yaml, split)
    with tempfile.TemporaryDirectory(prefix="bone-r-ulval-") as tmp:
        tmp_root = Path(tmp) / "data"
        for im in gt.images:
            rel = Path("images") / split / im.key.replace("/", "__")
            (tmp_root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(im.path, tmp_root / rel)
            label = label_path_for(im.path)
            lrel = label_path_for(tmp_root / rel)
            lrel.parent.mkdir(parents=True, exist_ok=True)
            if label.is_file():
                os.symlink(label, lrel)
        names = cfg.get("names") or {0: "fracture"}
        yaml_path = Path(tmp) / "data.yaml"
        yaml_path.write_text(yaml.safe_dump({"path": str(tmp_root), split: f"images/{split}", "train": f"images/{split}",
                                             "val": f"images/{split}", "names": names}))
        from ultralytics import YOLO

        model = YOLO(str(weights), task="detect")
        kwargs: dict[str, Any] = {"data": str(yaml_path), "split": split, "conf": 0.001, "plots": False, "verbose": False,
                                  "project": str(Path(tmp) / "runs"), "name": "val", "device": device, "workers": 0}
        if imgsz:
            kwargs["imgsz"] = int(imgsz)
        metrics = model.val(**kwargs)
        theirs = {"map50": round(float(metrics.box.map50), 6), "map50_95": round(float(metrics.box.map), 6)}
    out: dict[str, Any] = {"split": split, "ultralytics": theirs, "ultralytics_settings": {k: v for k, v in kwargs.items() if k not in ("project", "data")}}
    if ours is not None:
        box = ours.get("box", ours)
        out["ours"] = {"map50": box.get("map50"), "map50_95": box.get("map50_95")}
        out["difference_ours_minus_ultralytics"] = {
            k: None if out["ours"][k] is None else round(out["ours"][k] - theirs[k], 6) for k in ("map50", "map50_95")}
        out["why_they_may_differ"] = ("AP code: pycocotools (101-point, greedy matching per IoU threshold, 100 boxes/image) vs "
                                      "Ultralytics' own AP (up to 300 boxes/image); pixels: ours go through inference.Predictor "
                                      "(as stored for a pre-harmonized tree, else harmonized), Ultralytics reads the stored files")
    return out


# --------------------------------------------------------------------------- output


def _fmt(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    ci = entry.get("ci")
    return f"{entry['value']:.3f}" + (f" [{ci[0]:.3f}-{ci[1]:.3f}]" if ci else f" ({entry['note']})" if entry.get("note") else "")


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _part_table(title: str, parts: dict[str, Any]) -> list[str]:
    lines = ["", title, f"{'':<22} {'images':>7} {'pos':>5} {'boxes':>6} {'mAP50':>6} {'AUC':>6} "
                        f"{'sensitivity [95% CI]':<32} {'specificity [95% CI]':<32}"]
    for name, part in parts.items():
        bal = part["image_level"].get("balanced") or next(iter(part["image_level"].values()))
        lines.append(f"{name[:22]:<22} {part['n_images']:>7} {part['n_positive']:>5} {part['n_gt_boxes']:>6} "
                     f"{_num(part['box']['map50']):>6} {_num(part.get('image_auc')):>6} {_fmt(bal['sensitivity']):<32} "
                     f"{_fmt(bal['specificity']):<32}")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The console table: per source first (each radiograph once), then the pooled numbers."""
    lines = [f"split {report['split']} of {report['data']}: {report['n_images']} images, {report['n_positive']} positive, "
             f"{report['n_groups']} groups"]
    if report.get("by_source_radiographs"):
        lines += _part_table("by source, each radiograph once (balanced mode)", report["by_source_radiographs"])
        mean = report["mean_over_sources"]
        lines.append(f"{'mean over sources':<22} {'':>7} {'':>5} {'':>6} {_num(mean['map50']['value']):>6} "
                     f"{_num(mean['image_auc']['value']):>6} {_num(mean['sensitivity']['value']):<32} "
                     f"{_num(mean['specificity']['value']):<32}")
    lines += ["", f"pooled over every source and copy ({report['n_images']} images):",
              f"box: mAP@0.5 {_num(report['box']['map50'])}  mAP@0.5:0.95 {_num(report['box']['map50_95'])}  "
              f"({report['box']['n_gt_boxes']} true boxes)   image ROC AUC {_num(report['image_auc']['roc_auc'])}",
              f"{'mode':<10} {'tau':>7} {'from':<10} {'sensitivity [95% CI]':<24} {'specificity [95% CI]':<24} {'PPV':>6} {'NPV':>6} "
              f"{'TP':>5} {'FP':>5} {'TN':>5} {'FN':>5} {'loc.sens':>8} {'boxes/flagged p90':>17}"]
    for mode, res in report["image_level"].items():
        op = report["operating_points"][mode]
        loc = report["localization"].get(mode, {}).get("sensitivity")
        per = (report.get("boxes_per_flagged_image") or {}).get(mode) or {}
        lines.append(f"{mode:<10} {op['threshold']:>7.4f} {op.get('source', ''):<10} {_fmt(res['sensitivity']):<24} "
                     f"{_fmt(res['specificity']):<24} {_num(res['ppv']['value']):>6} {_num(res['npv']['value']):>6} "
                     f"{res['tp']:>5} {res['fp']:>5} {res['tn']:>5} {res['fn']:>5} {_num((loc or {}).get('value')):>8} "
                     f"{_num(per.get('p90'), 1):>17}")
    for title in ("by_source", "by_region"):
        if report.get(title):
            lines += _part_table(f"{title.replace('_', ' ')}, every image (balanced mode)", report[title])
    if report.get("box_rule"):
        lines.append(f"box rule: {inference.BoxRule(**report['box_rule']['rule'])} (from {report['box_rule']['source']})")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    if report.get("errors"):
        lines.append(f"errors: {len(report['errors'])} (see the report's 'errors')")
    return "\n".join(lines)


def save_plots(report: dict[str, Any], out_dir: str | Path, stem: str = "report") -> list[Path]:
    """PR curves (image level and box level at IoU 0.5) and the FROC curve as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    img = report["pr_curve"]["image"]
    box = report["pr_curve"]["box_iou50"]
    if img:
        ax.plot([p["recall"] for p in img], [p["precision"] for p in img], label="image level", color="#0072B2")
    if box:
        ax.plot([p["recall"] for p in box], [p["precision"] for p in box], label=f"boxes, IoU 0.5 (AP {_num(report['box']['map50'])})", color="#D55E00")
    for mode, res in report["image_level"].items():
        sens, ppv = res["sensitivity"]["value"], res["ppv"]["value"]
        if sens is not None and ppv is not None:
            ax.scatter([sens], [ppv], s=25, zorder=3)
            ax.annotate(mode, (sens, ppv), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(0, 1.02), ylim=(0, 1.02), title=f"precision-recall, {report['split']}")
    ax.grid(alpha=0.3)
    if img or box:
        ax.legend(loc="lower left", fontsize=8)
    path = out_dir / f"{stem}_pr.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    pts = [p for p in report["froc"] if p["sensitivity"] is not None and p["fp_per_image"] is not None]
    if pts:
        ax.plot([p["fp_per_image"] for p in pts], [p["sensitivity"] for p in pts], marker=".", color="#009E73")
        if max(p["fp_per_image"] for p in pts) > 0:
            ax.set_xscale("symlog", linthresh=0.1)
    ax.set(xlabel="false-positive boxes per image", ylabel="lesion sensitivity", ylim=(0, 1.02),
           title=f"FROC (IoU >= {report['localization']['iou']}), {report['split']}")
    ax.grid(alpha=0.3)
    path = out_dir / f"{stem}_froc.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    return written


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(jsonable({k: v for k, v in report.items() if not k.startswith("_")}), indent=2) + "\n")
    from compare_overlay import refresh_site_bundle

    refresh_site_bundle(out)  # docs/data/report.json: pages opened from disk read bundle.js
    return out


def load_thresholds_file(path: str | Path) -> dict[str, Any]:
    """Thresholds from a model card (its `thresholds`) or a JSON {mode: threshold | {threshold: ...}}."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"thresholds file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EvaluationError(f"{path} is not valid JSON: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("thresholds"), dict):
        data = data["thresholds"]
    if not isinstance(data, dict):
        raise EvaluationError(f"{path}: expected a model card or a {{mode: threshold}} object")
    return normalize_operating_points(data, "given")


# --------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Score fracture predictions on a dataset split (box mAP, image-level metrics with "
                                            "group-bootstrap intervals, localization, FROC). Research tool, not a diagnosis.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", type=Path, help="a model to predict the split with (its card next to it: weights/<name>.json)")
    src.add_argument("--predictions", type=Path, help="saved predictions: what `inference.py --image DIR --json` writes")
    p.add_argument("--data", type=Path, required=True, help="the dataset yaml (Ultralytics tree, splits.csv beside it)")
    p.add_argument("--split", default="test", help="split to score (default: test)")
    p.add_argument("--val-split", default="val", help="split the operating thresholds are chosen on (default: val)")
    p.add_argument("--val-predictions", type=Path, help="saved predictions for the val split (else --predictions must include them)")
    p.add_argument("--thresholds", type=Path, help="fixed thresholds: a model card or a JSON {mode: threshold} (not chosen on val)")
    p.add_argument("--choose-on-val", action="store_true", help="with --weights: choose thresholds on val even if the card has them")
    p.add_argument("--backend", default=None, help="detector backend for --weights (default: the card's, else from the file type)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and ONNX Runtime (default: all cores; 1 next to a training run)")
    p.add_argument("--harmonize", choices=["auto", "yes", "no"], default="auto",
                   help="with --weights: auto = feed images as stored when the tree has contract.json (already harmonized)")
    p.add_argument("--target-sensitivity", type=float, default=DEFAULT_TARGET_SENSITIVITY, help="screening mode target on val")
    p.add_argument("--target-specificity", type=float, default=DEFAULT_TARGET_SPECIFICITY, help="specific mode target on val")
    p.add_argument("--iou", type=float, default=DEFAULT_LOC_IOU, help="IoU for localization-aware counting and FROC (default 0.3)")
    p.add_argument("--n-boot", type=int, default=DEFAULT_N_BOOT, help="bootstrap resamples of groups (0: no intervals)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--out", type=Path, default=None, help="report JSON (default: runs/evaluate/<name>_<split>.json)")
    p.add_argument("--plots", type=Path, default=None, help="folder for the PR and FROC PNGs (default: beside --out)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--write-card", action="store_true", help="with --weights: write val-chosen thresholds and test metrics into the card")
    p.add_argument("--box-rule", choices=["card", "none", "choose"], default="card",
                   help="with --weights: the card's box rule (default), none, or choose one on val (NMS IoU, containment, "
                        "boxes per image; with --write-card it goes into the card)")
    p.add_argument("--save-predictions", type=Path, help="with --weights: also save the records (results.json format)")
    p.add_argument("--allow-missing", action="store_true", help="score images without a prediction as 'no detection' (listed as errors)")
    p.add_argument("--ultralytics-crosscheck", action="store_true", help="with YOLO .pt --weights: also run Ultralytics' val() and compare")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _check_args(args: argparse.Namespace) -> str | None:
    if args.write_card and not args.weights:
        return "--write-card needs --weights (the card lives next to the weights)"
    if args.write_card and args.thresholds:
        return "--write-card chooses thresholds on val; it cannot be combined with --thresholds"
    if args.save_predictions and not args.weights:
        return "--save-predictions needs --weights"
    if args.ultralytics_crosscheck and not (args.weights and args.weights.suffix == ".pt"):
        return "--ultralytics-crosscheck needs YOLO .pt --weights"
    for name in ("target_sensitivity", "target_specificity", "iou"):
        if not 0 < getattr(args, name) <= 1:
            return f"--{name.replace('_', '-')} must lie in (0, 1]"
    if args.n_boot < 0:
        return "--n-boot must be >= 0"
    if args.threads is not None and args.threads < 1:
        return "--threads must be >= 1"
    return None


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    problem = _check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.threads is not None:
        inference.set_threads(args.threads)  # before the model loads
    name = (args.weights or args.predictions).stem
    out = args.out or Path("runs") / "evaluate" / f"{name}_{args.split}.json"
    try:
        thresholds, source = None, "given"
        if args.thresholds:
            thresholds = load_thresholds_file(args.thresholds)
        bases: list[Path] = []
        if args.weights:
            try:
                predictor = inference.Predictor(args.weights, args.backend, args.device)
            except (FileNotFoundError, ValueError) as err:
                raise EvaluationError(str(err)) from None
            except Exception as err:  # noqa: BLE001 - a backend failing to load a file: one line, no traceback
                raise EvaluationError(f"cannot load {args.weights}: {type(err).__name__}: {err}") from None
            card_thresholds = (predictor.card or {}).get("thresholds")
            if thresholds is None and card_thresholds and not (args.write_card or args.choose_on_val or args.box_rule == "choose"):
                thresholds, source = card_thresholds, "model_card"
            predictions: Any = predictor
        else:
            predictions = load_records(args.predictions)
            bases.append(_abspath(args.predictions).parent)
            if args.val_predictions:
                predictions += load_records(args.val_predictions)
                bases.append(_abspath(args.val_predictions).parent)
        report = run_evaluation(predictions, args.data, args.split, args.val_split, thresholds=thresholds, threshold_source=source,
                                target_sensitivity=args.target_sensitivity, target_specificity=args.target_specificity,
                                n_boot=args.n_boot, seed=args.seed, iou=args.iou, allow_missing=args.allow_missing,
                                progress=not args.quiet, record_bases=bases, keep_records=bool(args.save_predictions),
                                harmonize=args.harmonize, box_rule=args.box_rule if args.weights else "card")
        report["model"] = {"weights": str(args.weights), "backend": predictor.name} if args.weights else {"predictions": str(args.predictions)}
        if args.ultralytics_crosscheck:
            imgsz = getattr(predictor.detector, "imgsz", None)  # the size our predictions were made at
            report["ultralytics_crosscheck"] = ultralytics_crosscheck(args.weights, args.data, args.split, imgsz=imgsz, ours=report,
                                                                      device=args.device)
    except EvaluationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.save_predictions:
        args.save_predictions.parent.mkdir(parents=True, exist_ok=True)
        args.save_predictions.write_text(json.dumps(report.pop("_records"), indent=2) + "\n")
    write_report(report, out)
    print(format_report(report))
    if "ultralytics_crosscheck" in report:
        cc = report["ultralytics_crosscheck"]
        d = cc.get("difference_ours_minus_ultralytics", {})
        print(f"Ultralytics val(): mAP@0.5 {_num(cc['ultralytics']['map50'])}  mAP@0.5:0.95 {_num(cc['ultralytics']['map50_95'])}   "
              f"ours - theirs: {_num(d.get('map50'), 4)} / {_num(d.get('map50_95'), 4)}")
    plots: list[Path] = []
    if not args.no_plots:
        plots = save_plots(report, args.plots or out.parent, out.stem)
    if args.write_card:
        card_path = inference.card_path_for(args.weights)
        update_model_card(card_path, report, report, box_rule=report.get("box_rule"))
        print(f"model card updated: {card_path} (thresholds chosen on '{args.val_split}', metrics on '{args.split}')")
    print(f"report: {out}" + (f"; plots: {', '.join(map(str, plots))}" if plots else ""))
    print(inference.DISCLAIMER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
