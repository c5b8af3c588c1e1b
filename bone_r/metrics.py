"""Metrics: box mAP (pycocotools), image-level rates with bootstrap intervals, operating points, localization,
FROC, breakdowns by source and region, box rules chosen on validation; predicting a split through any predictor.
Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bone_r.contract import Contract
from bone_r.dataset import (
    IDENTITY_CONTRACT,
    DataError,
    GroundTruth,
    _abspath,
    label_path_for,
    load_dataset_yaml,
    load_ground_truth,
)
from bone_r.detection import BoxRule, ImagePrediction, match_predictions
from bone_r.image import ImageDecodeError
from bone_r.modes import (
    DEFAULT_TARGET_SENSITIVITY,
    DEFAULT_TARGET_SPECIFICITY,
    choose_operating_points,
    normalize_operating_points,
)
from bone_r.runs import display_path

DEFAULT_MIN_SCORE = 0.001


DEFAULT_N_BOOT = 2000


DEFAULT_SEED = 0


DEFAULT_LOC_IOU = 0.3


COCO_MAX_DETS = 100


# FROC is reported at these thresholds (plus the operating thresholds).
FROC_THRESHOLDS = (0.001, 0.005, 0.01, 0.02, 0.05, *[round(0.1 + 0.05 * i, 2) for i in range(18)])


MAX_CURVE_POINTS = 201


def harmonization_for(predictor: Any, gt: GroundTruth, harmonize: str = "auto") -> tuple[Contract | None, list[str]]:
    """(contract to use instead of the predictor's, or None; notes) for predicting `gt`'s images.

    "auto": images of a tree that carries a contract.json are already harmonized, so they
    reach the model as stored (`IDENTITY_CONTRACT`), as in training; other images (plain
    folders, external sets) are harmonized with the model's contract. "yes" / "no" force it.
    """
    if harmonize not in ("auto", "yes", "no"):
        raise ValueError(f"harmonize must be auto, yes or no, got {harmonize!r}")
    if harmonize == "no" or (harmonize == "auto" and gt.tree_contract is not None):
        notes = ["images fed to the model as stored (the tree is already harmonized"
                 + (f": {display_path(gt.tree_contract_path)}" if gt.tree_contract_path else "") + "); no second harmonization"]
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
        except ImageDecodeError as err:
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


COCO_RECALL_POINTS = np.linspace(0.0, 1.0, 101)


class AP50:
    """COCO's box AP at IoU 0.5 (area 'all', `max_dets` per image, 101 recall points), as pycocotools computes it,
    from each image's detections matched once: a bootstrap resample only reweights the images, so thousands of
    resamples cost a millisecond each where pycocotools takes tens (it re-matches every image and every IoU).

    Matching is pycocotools' rule: per image, detections in falling score (stable), each to the not yet matched true
    box of highest IoU >= 0.5 (the last of equals). Images with unknown boxes (weak positives) are left out, as in
    `coco_dicts`. `box_metrics` stays the reference for reported point values; `AP50()` equals its map50.
    """

    def __init__(self, gt: GroundTruth, preds: Sequence[ImagePrediction | None], max_dets: int = COCO_MAX_DETS):
        scores, hits, owner = [], [], []
        self.n_true = np.zeros(len(gt), dtype=np.float64)
        for i, (im, pred) in enumerate(zip(gt.images, preds)):
            if not im.boxes_known:
                continue
            true = np.asarray(im.boxes, dtype=np.float64).reshape(-1, 4)
            self.n_true[i] = len(true)
            if pred is None or not len(pred.scores):
                continue
            order = np.argsort(-np.asarray(pred.scores, dtype=np.float64), kind="mergesort")[:max_dets]
            s = np.asarray(pred.scores, dtype=np.float64)[order]
            hit = np.zeros(len(s), dtype=bool)
            if len(true):
                iou = box_iou(np.asarray(pred.boxes, dtype=np.float64).reshape(-1, 4)[order], true)
                free = np.ones(len(true), dtype=bool)
                for d in range(len(s)):
                    ok = np.flatnonzero(free & (iou[d] >= 0.5))
                    if len(ok):
                        g = ok[np.flatnonzero(iou[d, ok] == iou[d, ok].max())[-1]]
                        free[g], hit[d] = False, True
            scores.append(s)
            hits.append(hit)
            owner.append(np.full(len(s), i))
        flat = np.concatenate(scores) if scores else np.zeros(0)
        order = np.argsort(-flat, kind="mergesort")  # ties in image order, as pycocotools' accumulate
        self.hit = (np.concatenate(hits) if hits else np.zeros(0, dtype=bool))[order]
        self.owner = (np.concatenate(owner) if owner else np.zeros(0, dtype=np.int64))[order]

    def __call__(self, weights: np.ndarray | None = None) -> float | None:
        """The AP, each image counted `weights[i]` times (None: once); None without a true box."""
        w = np.ones(len(self.n_true)) if weights is None else np.asarray(weights, dtype=np.float64)
        n_true = float(self.n_true @ w)
        if n_true == 0:
            return None
        dw = w[self.owner]
        tp = np.cumsum(dw * self.hit)
        fp = np.cumsum(dw * ~self.hit)
        if not len(tp):
            return 0.0
        precision = np.maximum.accumulate((tp / (tp + fp + np.spacing(1)))[::-1])[::-1]
        at = np.searchsorted(tp / n_true, COCO_RECALL_POINTS, side="left")
        return float(np.where(at < len(tp), precision[np.minimum(at, len(tp) - 1)], 0.0).mean())


def map50_interval(gt: GroundTruth, preds: Sequence[ImagePrediction | None], n_boot: int = DEFAULT_N_BOOT,
                   seed: int = DEFAULT_SEED, max_dets: int = COCO_MAX_DETS) -> dict[str, Any] | None:
    """95% group-bootstrap percentile interval of mAP@0.5 (resamples without a true box are left out); None without
    resamples or with fewer than MIN_INTERVAL_N groups holding a true box."""
    holding = {g for g, im in zip(gt.groups, gt.images) if im.boxes_known and len(im.boxes)}
    if n_boot <= 0 or len(holding) < MIN_INTERVAL_N:
        return None
    ap = AP50(gt, preds, max_dets)
    values = [v for w in group_weights(gt.groups, n_boot, seed) if (v := ap(w)) is not None]
    return {"ci": [round(float(v), 6) for v in np.percentile(values, [2.5, 97.5])], "ci_method": "group bootstrap",
            "n_boot": len(values)}


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


def group_draws(g: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """The project's one bootstrap draw: how often each of `g` groups is picked in each of `n_boot` resamples with
    replacement, in row chunks of about 2M counts. A multinomial draw of the counts is the same as drawing the groups
    themselves, without materializing n_boot x n_groups indices at once."""
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // max(g, 1))
    pvals = np.full(g, 1.0 / g)
    for start in range(0, n_boot, chunk):
        yield rng.multinomial(g, pvals, size=min(chunk, n_boot - start))


def bootstrap_counts(counts: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Resample the rows of `counts` (one per group) with replacement, `n_boot` times -> summed counts."""
    counts = np.asarray(counts, dtype=np.float64)
    out = np.empty((n_boot, counts.shape[1]))
    start = 0
    for weights in group_draws(counts.shape[0], n_boot, seed):
        out[start:start + len(weights)] = weights @ counts
        start += len(weights)
    return out


def group_weights(groups: Sequence[Any], n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_images): how often each image is drawn when its groups are drawn with replacement (a group is
    never split)."""
    index = _group_index(groups, len(groups))
    g = int(index.max()) + 1 if len(index) else 0
    if not g:
        return np.zeros((n_boot, 0))
    drawn = np.concatenate([np.zeros((0, g), dtype=np.int64), *group_draws(g, n_boot, seed)])
    return drawn[:, index].astype(np.float64)


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
            idx = _first_of_groups(gt, idx)
        sub = gt.subset(idx)
        sub_preds = [preds[i] for i in idx]
        box = box_metrics(sub, sub_preds, max_dets)
        box.pop("pr_iou50", None)
        box["map50_interval"] = map50_interval(sub, sub_preds, n_boot, seed, max_dets)
        auc = roc_auc(sub.labels, scores[idx])
        out[value] = {
            "n_images": len(idx), "n_positive": sub.n_positive, "n_gt_boxes": box["n_gt_boxes"], "box": box,
            "image_auc": None if auc is None else round(auc, 6),
            "image_level": {mode: image_level(sub.labels, scores[idx], op["threshold"], sub.groups, n_boot, seed) for mode, op in ops.items()},
        }
    return out


def _first_of_groups(gt: GroundTruth, idx: Sequence[int]) -> list[int]:
    """Of `idx`, each group's first image in file-name order (a radiograph's copies and near-duplicates count once)."""
    first: dict[str, int] = {}
    for i in sorted(idx, key=lambda i: gt.images[i].key):
        first.setdefault(gt.images[i].group, i)
    return sorted(first.values())


def by_fracture_size(gt: GroundTruth, preds: Sequence[ImagePrediction | None], threshold: float, parts: int = 3,
                     iou: float = DEFAULT_LOC_IOU) -> dict[str, Any]:
    """Sensitivity by fracture size, per source: its positives with known boxes (each radiograph once), sorted by
    the area of their largest true box as a fraction of the image and cut into `parts` near-equal parts
    (`np.array_split`). Each part: n, its area range, `flagged` (a box >= threshold anywhere) and `found` (one hitting a
    true box at IoU >= iou), each as a rate with Wilson's 95% interval. Small fractures are where detectors fail first;
    this says where a model's misses are."""
    hits = localization_hits(gt, preds, threshold, iou)
    out: dict[str, Any] = {}
    for source in sorted({im.source for im in gt.images}):
        idx = [i for i in _first_of_groups(gt, [i for i, im in enumerate(gt.images) if im.source == source])
               if gt.images[i].label and gt.images[i].boxes_known and len(gt.images[i].boxes)]
        if len(idx) < parts:
            continue
        area = {i: float(max((b[2] - b[0]) * (b[3] - b[1]) for b in gt.images[i].boxes))
                / (gt.images[i].width * gt.images[i].height) for i in idx}
        rows = []
        for part in np.array_split(np.array(sorted(idx, key=lambda i: (area[i], gt.images[i].key))), parts):
            row: dict[str, Any] = {"n": len(part), "area_min": round(area[int(part[0])], 6), "area_max": round(area[int(part[-1])], 6)}
            for name in ("flagged", "found"):
                k = int(hits[name][part].sum())
                row[name] = {"k": k, "value": round(k / len(part), 6),
                             "ci": [round(v, 6) for v in wilson_interval(k, len(part))], "ci_method": "wilson"}
            rows.append(row)
        out[source] = rows
    return {"threshold": float(threshold), "iou": iou, "area": "largest true box / image area", "by_source": out}


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
    box["map50_interval"] = map50_interval(gt, preds, n_boot, seed, max_dets)
    notes = list(gt.notes)
    if box.get("note"):
        notes.append(f"box metrics: {box['note']}")
    report: dict[str, Any] = {
        "split": gt.split, "data": display_path(gt.data), "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
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
        if "balanced" in ops:
            report["by_fracture_size"] = by_fracture_size(gt, preds, ops["balanced"]["threshold"], iou=iou)
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


BOX_RULE_MAX_P90 = 3  # the reader's budget: 90% of flagged images show at most this many boxes, in every mode


def apply_box_rule(records: Sequence[dict[str, Any]], rule: BoxRule) -> list[dict[str, Any]]:
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
                    max_p90: float = BOX_RULE_MAX_P90) -> tuple[BoxRule, list[dict[str, Any]]]:
    """The box rule for a model, chosen on validation predictions made without one.

    Each candidate of BOX_RULE_GRID is scored by val mAP@0.5 and by the 90th percentile of boxes per flagged image
    at each operating point's threshold (chosen on val: the rule never removes an image's top box, so image scores
    and thresholds do not change); its p90 is the worst mode's, since a reader may pick any mode (2026-11-29: a rule
    chosen at the balanced point alone had p90 3 there on val, 4 on test and 9 in screening mode). Chosen: the best
    mAP@0.5 among candidates within `max_p90`, the simpler on ties; when none fits, the smallest p90. Returns (rule,
    the table of every candidate)."""
    import itertools

    scores = image_scores(preds)
    thresholds = {mode: op["threshold"] for mode, op in choose_operating_points(gt.labels, scores).items()}
    table = []
    for nms_iou, contained, max_boxes in itertools.product(*BOX_RULE_GRID.values()):
        rule = BoxRule(nms_iou, contained, max_boxes)
        ruled = []
        for p in preds:
            keep = rule.keep(p.boxes, p.scores) if p is not None and len(p.scores) else None
            ruled.append(p if keep is None else ImagePrediction(p.boxes[keep], p.scores[keep]))
        per_mode = {mode: boxes_per_flagged_image(ruled, tau) for mode, tau in thresholds.items()}
        worst = max(per_mode, key=lambda m: (per_mode[m]["p90"] if per_mode[m]["p90"] is not None else -1, per_mode[m]["max"] or 0))
        table.append({"rule": rule.to_dict(), "map50": box_metrics(gt, ruled)["map50"], "p90": per_mode[worst]["p90"],
                      "median": per_mode[worst]["median"], "max": per_mode[worst]["max"], "worst_mode": worst,
                      "p90_by_mode": {m: v["p90"] for m, v in per_mode.items()}})
    simplicity = [sum(v is not None for v in row["rule"].values()) for row in table]
    fits = [i for i, row in enumerate(table) if row["p90"] is None or row["p90"] <= max_p90]
    if fits:
        best = max(fits, key=lambda i: (table[i]["map50"] or 0.0, -simplicity[i]))
    else:
        best = min(range(len(table)), key=lambda i: (table[i]["p90"], -(table[i]["map50"] or 0.0), simplicity[i]))
    for i, row in enumerate(table):
        row["chosen"] = i == best
    return BoxRule(**table[best]["rule"]), table


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
    that matches no image is an error: DataError (with `.errors`) unless
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
        raise DataError(f"{len(errors)} prediction problem(s): {shown}", errors)
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
    Raises DataError (with `.errors`) on unmatched images/predictions unless
    `allow_missing` (see `evaluate_records`). With `keep_records` the report carries the
    records under "_records" (the CLI saves them with --save-predictions).
    """
    gt = load_ground_truth(data_yaml, split)
    val_gt = None if thresholds is not None else load_ground_truth(data_yaml, val_split)
    if val_gt is not None and val_split != split:
        shared = {im.path.resolve() for im in gt.images} & {im.path.resolve() for im in val_gt.images}
        if shared:
            raise DataError(f"the '{val_split}' and '{split}' splits of {display_path(data_yaml)} share "
                            f"{len(shared)} of {len(gt)} image(s) (e.g. {display_path(min(shared))}): thresholds "
                            f"chosen on the scored images would be optimistic; point '{val_split}' at other images, or "
                            f"pass --val-split {split} to choose on the scored split knowingly")
    notes: list[str] = []
    if box_rule not in ("card", "none", "choose"):
        raise DataError(f"box_rule must be card, none or choose, got {box_rule!r}")
    if box_rule == "choose" and (val_gt is None or val_split == split):
        raise DataError("choosing a box rule needs a val split other than the scored one, without fixed --thresholds")
    if box_rule == "none" and not _is_predictor(predictions):
        raise DataError("saved predictions keep the box rule they were made with: box_rule 'none' needs a model (--weights)")
    rule_report: dict[str, Any] | None = None
    if _is_predictor(predictions):
        if box_rule != "card":
            predictions.box_rule = BoxRule()
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
            raise DataError(f"no predictions for the '{val_split}' split, so no thresholds can be chosen: "
                            "predict the val images too (--val-predictions), or pass --thresholds CARD.json")
        val_errors = [f"{val_split}: {e}" for e in errs + (_missing(val_gt, val_preds, errs) if val_split != split else [])]
        if box_rule == "choose":
            rule, table = choose_box_rule(val_gt, val_preds)
            if _is_predictor(predictions):
                predictions.box_rule = rule
            rule_report = {"rule": rule.to_dict(), "source": val_split, "max_p90": BOX_RULE_MAX_P90, "search": table}
            # the rule keeps each image's top box, so the val image scores (and thresholds) stay as they are
            records, test_records = apply_box_rule(records, rule), apply_box_rule(test_records, rule)
        try:
            ops = choose_operating_points(val_gt.labels, image_scores(val_preds), target_sensitivity, target_specificity)
        except ValueError as err:
            raise DataError(str(err)) from None
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


def ultralytics_crosscheck(weights: str | Path, data_yaml: str | Path, split: str = "test", *, imgsz: int | None = None,
                           ours: dict[str, Any] | None = None, device: str = "cpu") -> dict[str, Any]:
    """Ultralytics' own `val()` mAP on the split beside ours.

    Ultralytics reads the raw dataset images itself (its own letterbox, no
    `harmonize`) and writes a labels cache beside the labels, so it runs on a
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


def match_detections(reference: list, candidate: list, conf: float, *, iou_min: float = 0.95, score_tol: float = 0.02) -> dict:
    """Do two backends' detections (same image, same pixels) agree above `conf`?

    Greedy matching in reference-score order: each reference box takes, among the
    unused candidates with IoU > iou_min, the one closest in score (boxes clipped to
    the image border can coincide). `ok`: the same number of boxes at score >= conf,
    and every reference box has a partner with IoU > iou_min and |score difference| < score_tol.
    """
    ref = [d for d in reference if d.score >= conf]
    cand = [d for d in candidate if d.score >= conf]
    if not ref or not cand:
        return {"n_reference": len(ref), "n_candidate": len(cand), "matched": 0, "min_iou": None, "max_score_diff": None,
                "max_coord_diff": None, "ok": len(ref) == len(cand)}
    ious = box_iou(np.array([d.xyxy for d in ref]), np.array([d.xyxy for d in cand]))
    used: set[int] = set()
    worst_iou, worst_diff, worst_px, matched = 1.0, 0.0, 0.0, 0
    for i, det in enumerate(ref):
        free = [j for j in range(len(cand)) if j not in used]
        close = [j for j in free if ious[i, j] > iou_min]
        if not close:
            worst_iou = min(worst_iou, max((float(ious[i, j]) for j in free), default=0.0))
            continue
        j = min(close, key=lambda k: abs(det.score - cand[k].score))
        used.add(j)
        matched += 1
        worst_iou = min(worst_iou, float(ious[i, j]))
        worst_diff = max(worst_diff, abs(det.score - cand[j].score))
        worst_px = max(worst_px, float(np.abs(np.subtract(det.xyxy, cand[j].xyxy)).max()))
    ok = len(ref) == len(cand) == matched and worst_iou > iou_min and worst_diff < score_tol
    return {"n_reference": len(ref), "n_candidate": len(cand), "matched": matched, "min_iou": round(worst_iou, 5),
            "max_score_diff": round(worst_diff, 6), "max_coord_diff": round(worst_px, 4), "ok": ok}


def paired_bootstrap(gt: GroundTruth, preds_a: Sequence[ImagePrediction | None], preds_b: Sequence[ImagePrediction | None],
                     n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """Model B against model A on the same images: mAP@0.5 and image ROC AUC of each, and B − A with a 95% interval
    from the same group resamples for both (a group is never split; each resample draws groups with replacement).

    `p_not_better` is the share of resamples in which B does not beat A: the question before replacing a model.
    """
    labels = gt.labels
    ap_a, ap_b = AP50(gt, preds_a), AP50(gt, preds_b)
    scores_a, scores_b = image_scores(preds_a), image_scores(preds_b)
    full = (box_metrics(gt, preds_a)["map50"] or 0.0, box_metrics(gt, preds_b)["map50"] or 0.0,
            roc_auc(labels, scores_a), roc_auc(labels, scores_b))
    diffs: dict[str, list[float]] = {"map50": [], "image_auc": []}
    for w in group_weights(gt.groups, n_boot, seed):
        diffs["map50"].append((ap_b(w) or 0.0) - (ap_a(w) or 0.0))
        ids = np.repeat(np.arange(len(gt)), w.astype(np.int64))
        a_auc, b_auc = roc_auc(labels[ids], scores_a[ids]), roc_auc(labels[ids], scores_b[ids])
        if a_auc is not None and b_auc is not None:
            diffs["image_auc"].append(b_auc - a_auc)
    out: dict[str, Any] = {"n_images": len(gt), "n_groups": len(set(gt.groups)), "n_boot": n_boot, "seed": seed}
    for name, (a, b) in {"map50": full[:2], "image_auc": full[2:]}.items():
        d = np.array(diffs[name])
        out[name] = {"a": a, "b": b, "difference": None if a is None or b is None else b - a,
                     "ci": [float(v) for v in np.percentile(d, [2.5, 97.5])] if len(d) else None,
                     "p_not_better": float((d <= 0).mean()) if len(d) else None}
    return out
