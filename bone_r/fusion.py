"""Fusion: weighted box fusion of several detectors, and a detector fused with an image classifier; both scored on
a split with the metrics of `bone_r.metrics`. Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bone_r.contract import Contract, harmonize
from bone_r.dataset import DataError, load_ground_truth
from bone_r.detection import Detection, ImagePrediction, RecordIndex, match_predictions
from bone_r.image import ImageDecodeError, load_image
from bone_r.metrics import DEFAULT_MIN_SCORE, box_metrics, evaluate_predictions, image_scores, roc_auc, run_evaluation
from bone_r.modes import choose_operating_points
from bone_r.report import num, with_ci
from bone_r.runs import read_json

DEFAULT_IOU_THR = 0.55


DEFAULT_SKIP_BOX_THR = 0.0


DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


class EnsembleError(ValueError):
    """Bad input: the message is one line for a person."""


def weighted_boxes_fusion(per_model: Sequence[Sequence[Detection]], weights: Sequence[float] | None = None,
                          iou_thr: float = DEFAULT_IOU_THR, skip_box_thr: float = DEFAULT_SKIP_BOX_THR,
                          model_name: str = "wbf") -> list[Detection]:
    """Fuse the boxes several models found on ONE image (see the module doc). Boxes in any common unit.

    Boxes in falling weighted score join the same-label cluster whose fused box they overlap most (IoU >= iou_thr),
    else start one; a cluster's box is its members' score-weighted mean. Vectorized over the clusters: it runs in
    the prediction path of every mirrored image (2 x up to 100 boxes)."""
    n_models = len(per_model)
    weights = [1.0] * n_models if weights is None else [float(w) for w in weights]
    if len(weights) != n_models:
        raise ValueError(f"{len(weights)} weights for {n_models} models")
    if any(w <= 0 or not np.isfinite(w) for w in weights):
        raise ValueError(f"model weights must be positive, got {weights}")
    if not 0.0 <= iou_thr <= 1.0:
        raise ValueError(f"iou_thr must lie in [0, 1], got {iou_thr}")
    boxes = [(d.score * weights[m], m, d) for m, dets in enumerate(per_model) for d in dets if d.score >= skip_box_thr]
    boxes.sort(key=lambda b: b[0], reverse=True)  # stable: ties keep model order
    n = len(boxes)
    # One row per cluster, at most one per box: the fused box and the sums it is the weighted mean of.
    fused, weighted_sum, plain_sum = np.zeros((n, 4)), np.zeros((n, 4)), np.zeros((n, 4))
    score_sum, member_weight, count = np.zeros(n), np.zeros(n), np.zeros(n)
    seen_by = np.zeros((n, n_models), dtype=bool)
    label_ids: dict[Any, int] = {}
    cluster_label = np.zeros(n, dtype=np.int64)
    labels: list[Any] = []
    k = 0
    for ws, m, det in boxes:
        box = np.asarray(det.xyxy, dtype=np.float64)
        label = label_ids.setdefault(det.label, len(label_ids))
        j = -1
        if k:
            f = fused[:k]
            inter = (np.clip(np.minimum(f[:, 2], box[2]) - np.maximum(f[:, 0], box[0]), 0, None)
                     * np.clip(np.minimum(f[:, 3], box[3]) - np.maximum(f[:, 1], box[1]), 0, None))
            union = (f[:, 2] - f[:, 0]) * (f[:, 3] - f[:, 1]) + (box[2] - box[0]) * (box[3] - box[1]) - inter
            iou = np.divide(inter, union, out=np.zeros(k), where=union > 0)
            iou[cluster_label[:k] != label] = -1.0
            j = int(np.argmax(iou))  # the first of equals, as the boxes came
            if iou[j] < iou_thr:
                j = -1
        if j < 0:
            j, k = k, k + 1
            cluster_label[j] = label
            labels.append(det.label)
        weighted_sum[j] += ws * box
        plain_sum[j] += box
        score_sum[j] += ws
        count[j] += 1
        member_weight[j] += weights[m]
        seen_by[j, m] = True
        # All-zero scores would make the weighted mean undefined: fall back to the plain mean.
        fused[j] = weighted_sum[j] / score_sum[j] if score_sum[j] > 0 else plain_sum[j] / count[j]
    share = seen_by[:k] @ np.asarray(weights) / sum(weights)
    scores = np.clip(score_sum[:k] / member_weight[:k] * share, 0.0, 1.0)
    out = [Detection((float(x1), float(y1), float(max(x1, x2)), float(max(y1, y2))), float(s), lab, model_name)
           for (x1, y1, x2, y2), s, lab in zip(fused[:k], scores, labels)]
    out.sort(key=lambda d: d.score, reverse=True)
    return out


class MirrorTTA:
    """Test-time augmentation: `detector` run on the image and on its left-right mirror, the mirror's boxes mapped
    back and the two views fused by `weighted_boxes_fusion` (a finding both views see keeps its mean score; one only
    one view sees, half of it). Twice the model time. Other attributes are the wrapped detector's."""

    def __init__(self, detector: Any, iou_thr: float = DEFAULT_IOU_THR):
        self.detector, self.iou_thr = detector, iou_thr

    def __getattr__(self, name: str) -> Any:  # name, imgsz, backend, model ... of the detector itself
        if name == "detector":  # not set yet (copy, pickle): no endless lookup
            raise AttributeError(name)
        return getattr(self.detector, name)

    def predict(self, rgb: np.ndarray, conf: float) -> list[Detection]:
        # Each view down to the evaluation's floor, whatever `conf`: a box under `conf` in one view still adds to its
        # fused score, so filtering the views first would give other scores than those the thresholds were chosen on.
        floor = min(conf, DEFAULT_MIN_SCORE)
        width = rgb.shape[1]
        direct = self.detector.predict(rgb, floor)
        mirrored = [Detection((width - d.xyxy[2], d.xyxy[1], width - d.xyxy[0], d.xyxy[3]), d.score, d.label, d.model)
                    for d in self.detector.predict(np.ascontiguousarray(rgb[:, ::-1]), floor)]
        fused = weighted_boxes_fusion([direct, mirrored], iou_thr=self.iou_thr,
                                      model_name=getattr(self.detector, "name", "detector"))
        return [d for d in fused if d.score >= conf]


def fused_score(det_score: float, p_abnormal: float, alpha: float) -> float:
    """det_score * (alpha + (1 - alpha) * p_abnormal): alpha 1 ignores the classifier, 0 multiplies by it."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if not 0.0 <= p_abnormal <= 1.0:
        raise ValueError(f"p_abnormal must lie in [0, 1], got {p_abnormal}")
    return float(det_score) * (alpha + (1.0 - alpha) * float(p_abnormal))


def fuse_with_classifier(detections: Sequence[Detection], p_abnormal: float, alpha: float, model_name: str | None = None) -> list[Detection]:
    """Every box of one image rescored with the image's p_abnormal (boxes and labels unchanged)."""
    out = [Detection(d.xyxy, fused_score(d.score, p_abnormal, alpha), d.label, model_name or d.model, d.hints) for d in detections]
    out.sort(key=lambda d: d.score, reverse=True)
    return out


def _detections(record: dict[str, Any]) -> list[Detection]:
    if record.get("error"):
        raise EnsembleError(f"{record['image']}: the prediction failed: {record['error']}")
    try:
        return [Detection.from_dict(d) for d in record.get("detections") or []]
    except (ValueError, TypeError) as err:
        raise EnsembleError(f"{record['image']}: bad detection: {err}") from None


def _fused_record(base: dict[str, Any], detections: list[Detection], name: str) -> dict[str, Any]:
    rec = {"image": base["image"], "image_size": base.get("image_size"), "model": name, "threshold": 0.0,
           "threshold_source": "none: thresholds are chosen on val by evaluate.py",
           "detections": [d.to_dict() | {"score": d.score, "xyxy": list(d.xyxy)} for d in detections]}
    if rec["image_size"] is None:
        rec.pop("image_size")
    return rec


def wbf_records(records_per_model: Sequence[Sequence[dict[str, Any]]], weights: Sequence[float] | None = None,
                iou_thr: float = DEFAULT_IOU_THR, skip_box_thr: float = DEFAULT_SKIP_BOX_THR, name: str = "wbf",
                allow_missing: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Fused records for the images of the first model's records; (records, problems).

    An image that another model has no record for is an error unless `allow_missing`
    (then that model contributes no box there, and the problem is listed).
    """
    if len(records_per_model) < 2:
        raise EnsembleError("weighted box fusion needs at least two models")
    indexes = [RecordIndex(r) for r in records_per_model[1:]]
    out, problems = [], []
    for base in records_per_model[0]:
        if base.get("error"):
            problems.append(f"{base['image']}: model 1's prediction failed: {base['error']}")
            continue
        per_model = [_detections(base)]
        for j, index in enumerate(indexes, start=2):
            rec = index.get(base["image"])
            if rec is None:
                if not allow_missing:
                    raise EnsembleError(f"{base['image']}: model {j} has no prediction for it (pass --allow-missing to "
                                        "fuse without it)")
                problems.append(f"{base['image']}: model {j} has no prediction; fused without it")
                per_model.append([])
                continue
            if rec.get("image_size") and base.get("image_size") and list(rec["image_size"]) != list(base["image_size"]):
                raise EnsembleError(f"{base['image']}: models saw different image sizes {base['image_size']} vs {rec['image_size']}")
            per_model.append(_detections(rec))
        out.append(_fused_record(base, weighted_boxes_fusion(per_model, weights, iou_thr, skip_box_thr, name), name))
    return out, problems


def fusion_records(det_records: Sequence[dict[str, Any]], p_abnormal: Callable[[dict[str, Any]], float], alpha: float,
                   name: str) -> list[dict[str, Any]]:
    """The detector's records rescored with each image's p_abnormal (`p_abnormal(record)`)."""
    out = []
    for rec in det_records:
        if rec.get("error"):
            out.append(rec)
            continue
        out.append(_fused_record(rec, fuse_with_classifier(_detections(rec), p_abnormal(rec), alpha, name), name))
    return out


def load_classifier_scores(path: str | Path) -> dict[str, float]:
    """{image: p_abnormal} from JSON: that mapping, {"scores": {...}}, or a list of {"image", "p_abnormal"}."""
    path = Path(path)
    data = read_json(path, "classifier scores file", EnsembleError)
    if isinstance(data, dict) and isinstance(data.get("scores"), (dict, list)):
        data = data["scores"]
    if isinstance(data, list):
        try:
            data = {str(r["image"]): r["p_abnormal"] for r in data}
        except (KeyError, TypeError):
            raise EnsembleError(f"{path}: a list must hold {{'image', 'p_abnormal'}} objects") from None
    if not isinstance(data, dict) or not data:
        raise EnsembleError(f"{path}: expected {{image: p_abnormal}} with at least one image")
    out = {}
    for image, p in data.items():
        try:
            p = float(p)
        except (TypeError, ValueError):
            raise EnsembleError(f"{path}: p_abnormal of {image} is not a number: {p!r}") from None
        if not 0.0 <= p <= 1.0:
            raise EnsembleError(f"{path}: p_abnormal of {image} is {p}, outside [0, 1]")
        out[image] = p
    return out


class ScoreLookup:
    """p_abnormal for a record: from a scores mapping (by path, else unique file name)."""

    def __init__(self, scores: dict[str, float]):
        self.index = RecordIndex([{"image": k, "p": v} for k, v in scores.items()])

    def __call__(self, record: dict[str, Any]) -> float:
        hit = self.index.get(record["image"])
        if hit is None:
            raise EnsembleError(f"{record['image']}: no classifier score for it")
        return float(hit["p"])


def classifier_scores(records: Sequence[dict[str, Any]], classifier: Callable[[np.ndarray], float],
                      contract: Contract | None = None, progress: bool = True) -> dict[str, float]:
    """Run an image classifier (`callable(rgb) -> p_abnormal`, e.g. `models.classifier.load_classifier(path)`)
    on every record's image: decoded by `load_image`, harmonized by `harmonize`."""
    from tqdm import tqdm

    out = {}
    for rec in tqdm([r for r in records if not r.get("error")], desc="classify", unit="img", disable=not progress):
        try:
            loaded = load_image(rec["image"])
        except ImageDecodeError as err:
            raise EnsembleError(f"{rec['image']}: {err}") from None
        p = float(classifier(harmonize(loaded.pixels, contract)))
        if not 0.0 <= p <= 1.0:
            raise EnsembleError(f"{rec['image']}: the classifier returned {p}, outside [0, 1]")
        out[str(rec["image"])] = p
    return out


def summarize(name: str, report: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One comparison row from an evaluate report (the benchmark table's columns)."""
    bal = report["image_level"].get("balanced") or {}
    loc = (report.get("localization") or {}).get("balanced") or {}
    return {"name": name, **extra, "map50": report["box"]["map50"], "map50_95": report["box"]["map50_95"],
            "roc_auc": report["image_auc"]["roc_auc"],
            "balanced": {"threshold": report["operating_points"].get("balanced", {}).get("threshold"),
                         "sensitivity": bal.get("sensitivity"), "specificity": bal.get("specificity")},
            "localization_sensitivity": loc.get("sensitivity"), "n_errors": len(report.get("errors", []))}


def score_records(records: Sequence[dict[str, Any]], data: str | Path, split: str, val_split: str, *, n_boot: int, seed: int,
                  allow_missing: bool, bases: Sequence[Path] = ()) -> dict[str, Any]:
    """`run_evaluation` on saved records: thresholds chosen on `val_split`, metrics on `split`."""

    try:
        return run_evaluation(list(records), data, split, val_split, n_boot=n_boot, seed=seed, allow_missing=allow_missing,
                                       progress=False, record_bases=bases)
    except DataError as err:
        raise EnsembleError(str(err)) from None


def val_map50(records: Sequence[dict[str, Any]], data: str | Path, val_split: str, bases: Sequence[Path] = ()) -> float | None:
    """Box mAP@0.5 on the val split (used only to pick alpha; the test split is never used to choose)."""

    try:
        gt = load_ground_truth(data, val_split)
    except DataError as err:
        raise EnsembleError(str(err)) from None
    preds, _, _ = match_predictions(list(records), gt, bases)
    return box_metrics(gt, preds)["map50"]


def run_wbf(named_records: list[tuple[str, list[dict[str, Any]]]], data: str | Path | None, *, split: str = "test",
            val_split: str = "val", weights: Sequence[float] | None = None, iou_thr: float = DEFAULT_IOU_THR,
            skip_box_thr: float = DEFAULT_SKIP_BOX_THR, n_boot: int = 2000, seed: int = 0, allow_missing: bool = False,
            bases: Sequence[Path] = ()) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(comparison payload, fused records). Without `data` the payload holds no metrics."""
    names = [n for n, _ in named_records]
    fused_name = "wbf(" + "+".join(names) + ")"
    fused, problems = wbf_records([r for _, r in named_records], weights, iou_thr, skip_box_thr, fused_name, allow_missing)
    payload = _payload("wbf", data, split, val_split, n_boot, seed,
                       {"models": names, "model_weights": list(weights) if weights else [1.0] * len(names), "iou_thr": iou_thr,
                        "skip_box_thr": skip_box_thr, "score": "weighted mean score x share of model weight (see ensemble.py)"})
    payload["problems"] = problems
    if data is not None:
        for name, records in named_records:
            payload["rows"].append(summarize(name, score_records(records, data, split, val_split, n_boot=n_boot, seed=seed,
                                                                  allow_missing=allow_missing, bases=bases), kind="single"))
        report = score_records(fused, data, split, val_split, n_boot=n_boot, seed=seed, allow_missing=allow_missing, bases=bases)
        payload["rows"].append(summarize(fused_name, report, kind="wbf"))
        payload["reports"][fused_name] = report
    return payload, fused


def run_fusion(name: str, det_records: list[dict[str, Any]], p_abnormal: Callable[[dict[str, Any]], float], data: str | Path | None,
               *, alphas: Sequence[float] = DEFAULT_ALPHAS, split: str = "test", val_split: str = "val", n_boot: int = 2000,
               seed: int = 0, allow_missing: bool = False, classifier: str = "", bases: Sequence[Path] = ()
               ) -> tuple[dict[str, Any], dict[float, list[dict[str, Any]]]]:
    """(comparison payload, fused records per alpha): the detector alone and fused at each alpha."""
    for alpha in alphas:
        if not 0.0 <= alpha <= 1.0:
            raise EnsembleError(f"alpha must lie in [0, 1], got {alpha}")
    fused = {float(a): fusion_records(det_records, p_abnormal, float(a), f"{name}x cls(alpha={float(a):g})") for a in alphas}
    payload = _payload("fusion", data, split, val_split, n_boot, seed,
                       {"detector": name, "classifier": classifier, "alphas": [float(a) for a in alphas],
                        "formula": "fused = det_score * (alpha + (1 - alpha) * p_abnormal)",
                        "alpha_chosen_by": "best val mAP@0.5 (ties: larger alpha)"})
    if data is not None:
        payload["rows"].append(summarize(name, score_records(det_records, data, split, val_split, n_boot=n_boot, seed=seed,
                                                             allow_missing=allow_missing, bases=bases), kind="single"))
        val_scores = {a: val_map50(recs, data, val_split, bases) for a, recs in fused.items()}
        ranked = sorted(val_scores, key=lambda a: (val_scores[a] if val_scores[a] is not None else -1.0, a))
        chosen = ranked[-1]
        for alpha, recs in fused.items():
            report = score_records(recs, data, split, val_split, n_boot=n_boot, seed=seed, allow_missing=allow_missing, bases=bases)
            payload["rows"].append(summarize(f"{name} x cls (alpha={alpha:g})", report, kind="fusion", alpha=alpha,
                                             val_map50=val_scores[alpha], chosen_on_val=alpha == chosen))
            payload["reports"][f"alpha={alpha:g}"] = report
        payload["settings"]["alpha_chosen"] = chosen
    return payload, fused


def _payload(experiment: str, data: Any, split: str, val_split: str, n_boot: int, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    return {"experiment": experiment, "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "data": None if data is None else str(data), "split": split, "val_split": val_split,
            "bootstrap": {"n_boot": n_boot, "seed": seed, "resampled": "groups"}, "settings": settings, "rows": [], "reports": {},
            "disclaimer": "Research and teaching tool, not a diagnosis."}


def format_rows(payload: dict[str, Any]) -> str:
    def ci(entry: dict | None) -> str:
        return with_ci(entry, ci_digits=2, note=False)

    lines = [f"{payload['experiment']} on {payload['split']} of {payload['data']} (thresholds chosen on {payload['val_split']})",
             f"{'model':<40} {'mAP50':>6} {'mAP50-95':>8} {'AUC':>6} {'tau':>7} {'sens [95% CI]':<20} {'spec [95% CI]':<20} {'loc.sens':>8}"]
    for r in payload["rows"]:
        mark = " *" if r.get("chosen_on_val") else ""
        lines.append(f"{(r['name'] + mark)[:40]:<40} {num(r['map50']):>6} {num(r['map50_95']):>8} {num(r['roc_auc']):>6} "
                     f"{num(r['balanced']['threshold']):>7} {ci(r['balanced']['sensitivity']):<20} {ci(r['balanced']['specificity']):<20} "
                     f"{num((r['localization_sensitivity'] or {}).get('value')):>8}")
    if any(r.get("chosen_on_val") for r in payload["rows"]):
        lines.append("* alpha chosen on the val split (best val mAP@0.5)")
    return "\n".join(lines)


def simulate(classifier_aucs: Sequence[float] = (0.6, 0.75, 0.9), alphas: Sequence[float] = DEFAULT_ALPHAS, *, n_val: int = 300,
             n_test: int = 600, seed: int = 0, n_boot: int = 500) -> dict[str, Any]:
    """Both fusions on made-up cases (`bone_r.synthetic`'s generators), scored by `bone_r.metrics`.

    Two made-up detectors whose errors are independent by construction (so WBF's gain here
    is an upper bound, not evidence), and simulated classifiers: p_abnormal =
    sigmoid(d * (2 * label - 1) + N(0, 1)), with d set so that the binormal AUC is each
    target (AUC = Phi(2d / sqrt(2))). Alpha is chosen on val (best val mAP@0.5), test reported.
    """
    import math
    from statistics import NormalDist

    from bone_r import synthetic as demo

    rng = np.random.default_rng(seed)
    gts = {"val": demo.demo_ground_truth(n_val, "val", rng), "test": demo.demo_ground_truth(n_test, "test", rng)}
    dets = {name: {s: [demo.demo_detect(name, im.boxes, (im.width, im.height), rng) for im in gt.images] for s, gt in gts.items()}
            for name in (demo.MODEL_A, demo.MODEL_B)}
    dets["wbf"] = {s: [weighted_boxes_fusion([a, b]) for a, b in zip(dets[demo.MODEL_A][s], dets[demo.MODEL_B][s])] for s in gts}

    def preds(per_image: list[list[Detection]]) -> list[Any]:
        return [ImagePrediction(np.array([d.xyxy for d in ds], dtype=np.float64).reshape(-1, 4),
                                         np.array([d.score for d in ds], dtype=np.float64)) for ds in per_image]

    def score(name: str, by_split: dict[str, list[list[Detection]]], **extra: Any) -> dict[str, Any]:
        val_preds, test_preds = preds(by_split["val"]), preds(by_split["test"])
        ops = choose_operating_points(gts["val"].labels, image_scores(val_preds))
        report = evaluate_predictions(gts["test"], test_preds, ops, n_boot=n_boot, seed=0, breakdown=False)
        return summarize(name, report, **extra, val_map50=box_metrics(gts["val"], val_preds)["map50"])

    rows = [score("detector A (made up)", dets[demo.MODEL_A], kind="single"), score("detector B (made up)", dets[demo.MODEL_B], kind="single"),
            score("wbf(A+B)", dets["wbf"], kind="wbf")]
    for auc in classifier_aucs:
        if not 0.5 <= auc < 1.0:
            raise EnsembleError(f"a simulated classifier AUC must lie in [0.5, 1), got {auc}")
        d = math.sqrt(2) * NormalDist().inv_cdf(auc) / 2
        p = {s: [1.0 / (1.0 + math.exp(-(d * (2 * im.label - 1) + rng.normal()))) for im in gt.images] for s, gt in gts.items()}
        measured = roc_auc(gts["test"].labels, p["test"])
        group = [score(f"A x cls(AUC {auc:g}) alpha={a:g}",
                       {s: [fuse_with_classifier(ds, pi, a) for ds, pi in zip(dets[demo.MODEL_A][s], p[s])] for s in gts},
                       kind="fusion", alpha=float(a), classifier_auc_target=auc, classifier_auc_test=round(measured, 4))
                 for a in alphas]
        best = max(group, key=lambda r: (r["val_map50"] if r["val_map50"] is not None else -1.0, r["alpha"]))
        for r in group:
            r["chosen_on_val"] = r is best
        rows += group
    payload = _payload("simulate", "synthetic made-up cases (no images)", "test", "val", n_boot, 0,
                       {"n_val": n_val, "n_test": n_test, "seed": seed, "classifier_aucs": list(classifier_aucs),
                        "alphas": [float(a) for a in alphas],
                        "note": "detectors' errors independent by construction: an upper bound for WBF, not evidence"})
    payload["rows"] = rows
    return payload
