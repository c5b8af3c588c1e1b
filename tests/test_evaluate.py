"""evaluate.py: metric functions against hand-computed answers, pycocotools agreement,
threshold selection, group bootstrap, the --predictions/--weights CLI on a phantom tree,
and the model card update.

Hand-computed COCO APs use pycocotools' 101-point interpolation: AP = mean over recall
r in {0, 0.01, ..., 1} of the highest precision at recall >= r (0 past the last recall).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

import evaluate as ev
import inference
from bone_r.card import ModelCard, update_model_card
from bone_r.contract import Contract, harmonize
from bone_r.dataset import IDENTITY_CONTRACT, DataError, GroundTruth, GTImage, load_ground_truth
from bone_r.detection import BoxRule, Detection, ImagePrediction, match_predictions
from bone_r.image import load_image
from bone_r.metrics import (
    AP50,
    BOX_RULE_MAX_P90,
    bootstrap_counts,
    box_iou,
    box_metrics,
    choose_box_rule,
    confusion_metrics,
    evaluate_predictions,
    froc,
    group_weights,
    image_level,
    image_scores,
    localization_metrics,
    map50_interval,
    predict_split,
    roc_auc,
    run_evaluation,
    ultralytics_crosscheck,
    wilson_interval,
)
from bone_r.modes import choose_operating_points, resolve_threshold
from bone_r.report import format_report, with_ci
from bone_r.runs import sha256_file
from bone_r.synthetic import write_dataset

# --------------------------------------------------------------------------- helpers (also used by the other test files)


def make_gt(boxes_per_image, size=(100, 100), groups=None, sources=None, regions=None) -> GroundTruth:
    images = []
    for i, boxes in enumerate(boxes_per_image):
        b = np.array(boxes, dtype=float).reshape(-1, 4)
        key = f"images/test/{i:03d}.png"
        images.append(GTImage(Path("/fixture") / key, key, size[0], size[1], b, int(len(b) > 0),
                                 (sources or {}).get(i, "unknown"), (regions or {}).get(i, "unknown"),
                                 groups[i] if groups else key))
    return GroundTruth(images, "test", "fixture")


def pred(boxes=(), scores=()) -> ImagePrediction:
    return ImagePrediction(np.array(boxes, dtype=float).reshape(-1, 4), np.array(scores, dtype=float))


N_TREE = 18  # write_dataset: image i goes to split ("train", "val", "test")[i % 3], fractured iff i is even
VAL = [1, 4, 7, 10, 13, 16]  # positives 4, 10, 16
TEST = [2, 5, 8, 11, 14, 17]  # positives 2, 8, 14
WRONG_BOX = [0.0, 0.0, 10.0, 10.0]  # a corner: no phantom's fracture box is there


def write_tree(root: Path, *, splits_csv: bool = True, contract: bool = False, yaml_path: str | None = ".") -> list:
    """The phantom tree used by the CLI tests: 18 images of 200x256, 6 per split."""
    phantoms = write_dataset(root, n=N_TREE, size=(256, 200), positives=0.5)
    lines = ([f"path: {yaml_path}"] if yaml_path else []) + ["train: images/train", "val: images/val", "test: images/test",
                                                                "names:", "  0: fracture"]
    (root / "dataset.yaml").write_text("\n".join(lines) + "\n")
    if splits_csv:
        with open(root / "splits.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "split", "source", "region", "group", "label", "sha256", "weak"])
            for i, ph in enumerate(phantoms):
                split = ("train", "val", "test")[i % 3]
                rel = f"images/{split}/ph{i:03d}.png"
                w.writerow([rel, split, "alpha" if i < 9 else "beta", "hand" if i % 2 else "leg", f"g{i}",
                            int(ph.box is not None), hashlib.sha256((root / rel).read_bytes()).hexdigest(), 0])
    if contract:
        Contract().save(root / "contract.json")
    return phantoms


def image_path(root: Path, i: int) -> Path:
    return root / "images" / ("train", "val", "test")[i % 3] / f"ph{i:03d}.png"


# (image index -> detections [xyxy, score]); "exact" = the phantom's own fracture box.
HANDCRAFTED = {
    4: [("exact", 0.9)], 10: [("exact", 0.6)], 16: [("exact", 0.4)], 1: [(WRONG_BOX, 0.5)], 7: [(WRONG_BOX, 0.2)], 13: [],
    2: [("exact", 0.8)], 8: [(WRONG_BOX, 0.7)], 14: [("exact", 0.3)], 5: [(WRONG_BOX, 0.45)], 11: [], 17: [(WRONG_BOX, 0.65)],
}


def handcrafted_records(root: Path, phantoms, skip=()) -> list[dict]:
    records = []
    for i, dets in HANDCRAFTED.items():
        if i in skip:
            continue
        out = [{"xyxy": list(phantoms[i].box) if box == "exact" else box, "score": s, "label": "fracture", "model": "hand"}
               for box, s in dets]
        records.append({"image": str(image_path(root, i)), "image_size": [200, 256], "fracture_detected": False,
                        "threshold": 0.25, "mode": "balanced", "detections": out})
    return records


def rgb_key(rgb: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rgb).tobytes()).hexdigest()


class OracleDetector:
    """A detector that knows the answer for each image it was told about (keyed by the RGB it receives)."""

    built_at: list = []  # the input size of every oracle built (what the caller handed the backend)

    def __init__(self, weights, device: str = "cpu", imgsz: int | None = None):
        self.table = json.loads(Path(weights).read_text())
        self.name = "oracle"
        self.unknown = 0
        OracleDetector.built_at.append(imgsz)

    def predict(self, rgb, conf):
        rows = self.table.get(rgb_key(rgb))
        if rows is None:
            self.unknown += 1
            return []
        return [Detection(tuple(r[:4]), r[4], "fracture", self.name) for r in rows if r[4] >= conf]


def write_oracle(folder: Path, root: Path, phantoms, contract: Contract | None, card: dict | None = None) -> Path:
    """Oracle weights answering HANDCRAFTED for the images as harmonized by `contract` (None = fed as stored)."""
    table = {}
    for i, dets in HANDCRAFTED.items():
        gray = load_image(image_path(root, i)).pixels
        rgb = harmonize(gray, contract or IDENTITY_CONTRACT)
        table[rgb_key(rgb)] = [(list(phantoms[i].box) if box == "exact" else box) + [s] for box, s in dets]
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "oracle.bin"
    weights.write_text(json.dumps(table))
    if card is not None:
        (folder / "oracle.json").write_text(json.dumps(card))
    return weights


@pytest.fixture
def oracle_backend(monkeypatch):
    import models

    monkeypatch.setitem(models._REGISTRY, "oracle", f"{__name__}:OracleDetector")


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "ds"
    phantoms = write_tree(root)
    return root, phantoms


# --------------------------------------------------------------------------- box metrics


def test_box_iou_known_values():
    iou = box_iou([[0, 0, 10, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]])
    assert iou[0].tolist() == pytest.approx([1.0, 50 / 150, 0.0, 0.0])


def test_box_metrics_perfect_predictions_score_one():
    gt = make_gt([[[10, 10, 50, 50]], [[20, 20, 60, 70], [70, 70, 90, 95]], []])
    preds = [pred([[10, 10, 50, 50]], [0.9]), pred([[20, 20, 60, 70], [70, 70, 90, 95]], [0.8, 0.7]), pred()]
    m = box_metrics(gt, preds)
    assert (m["map50"], m["map50_95"], m["n_gt_boxes"]) == (1.0, 1.0, 3)


def test_box_metrics_worst_predictions_score_zero():
    gt = make_gt([[[10, 10, 50, 50]], []])
    preds = [pred([[60, 60, 90, 90]], [0.9]), pred([[10, 10, 50, 50]], [0.8])]  # misses, plus a box on the negative
    m = box_metrics(gt, preds)
    assert (m["map50"], m["map50_95"]) == (0.0, 0.0)


def test_box_metrics_no_detections_and_no_boxes():
    m = box_metrics(make_gt([[[10, 10, 50, 50]], []]), [pred(), None])
    assert (m["map50"], m["map50_95"], m["n_detections"]) == (0.0, 0.0, 0)
    m = box_metrics(make_gt([[], []]), [pred([[1, 1, 5, 5]], [0.9]), pred()])  # all negatives: AP undefined
    assert m["map50"] is None and m["map50_95"] is None and "undefined" in m["note"]


def test_box_metrics_duplicate_detection_on_one_box():
    # ranked: TP (0.9), duplicate of it = FP (0.8), TP (0.7) -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    # interpolated: 1.0 for r <= 0.50 (51 points), 2/3 for r in 0.51..1.00 (50 points)
    gt = make_gt([[[10, 10, 50, 50]], [[20, 20, 60, 70]]])
    preds = [pred([[10, 10, 50, 50], [10, 10, 50, 50]], [0.9, 0.8]), pred([[20, 20, 60, 70]], [0.7])]
    m = box_metrics(gt, preds)
    expected = (51 * 1.0 + 50 * 2 / 3) / 101
    assert m["map50"] == pytest.approx(expected, abs=1e-6)
    assert m["map50_95"] == pytest.approx(expected, abs=1e-6)


def test_box_metrics_agree_with_direct_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(3)
    gt_boxes, preds = [], []
    for _ in range(12):
        n = int(rng.integers(0, 3))
        xy = rng.uniform(0, 120, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 60, (n, 2))], axis=1)
        gt_boxes.append(boxes.tolist())
        jitter = boxes + rng.normal(0, 4, boxes.shape)
        jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 1)
        fxy = rng.uniform(0, 150, (3, 2))
        fps = np.concatenate([fxy, fxy + rng.uniform(5, 40, (3, 2))], axis=1)
        preds.append(pred(np.vstack([jitter, fps]), rng.uniform(0.01, 1, n + 3)))
    gt = make_gt(gt_boxes, size=(200, 200))
    ours = box_metrics(gt, preds)

    # the reference: pycocotools with its default settings, from files
    ds = {"images": [{"id": i + 1, "width": 200, "height": 200} for i in range(12)], "categories": [{"id": 1, "name": "f"}],
          "annotations": []}
    dets = []
    for i, (boxes, p) in enumerate(zip(gt_boxes, preds)):
        for x1, y1, x2, y2 in boxes:
            ds["annotations"].append({"id": len(ds["annotations"]) + 1, "image_id": i + 1, "category_id": 1,
                                      "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        for (x1, y1, x2, y2), s in zip(p.boxes, p.scores):
            dets.append({"image_id": i + 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)})
    (tmp_path / "gt.json").write_text(json.dumps(ds))
    coco = COCO(str(tmp_path / "gt.json"))
    e = COCOeval(coco, coco.loadRes(dets), "bbox")
    e.evaluate()
    e.accumulate()
    e.summarize()
    assert 0.05 < e.stats[1] < 0.99  # a fixture that exercises partial matches
    assert ours["map50_95"] == pytest.approx(e.stats[0], abs=1e-6)
    assert ours["map50"] == pytest.approx(e.stats[1], abs=1e-6)


# --------------------------------------------------------------------------- image level


def test_image_level_hand_computed():
    # labels 1,1,1,0,0,0; scores .9 .5 0 .6 .1 0 at tau .5: TP 2 (0.5 counts: ties are positive), FN 1, FP 1, TN 2
    r = image_level([1, 1, 1, 0, 0, 0], [0.9, 0.5, 0.0, 0.6, 0.1, 0.0], 0.5, n_boot=0)
    assert (r["tp"], r["fn"], r["fp"], r["tn"]) == (2, 1, 1, 2)
    for k in ("sensitivity", "specificity", "ppv", "npv"):
        assert r[k]["value"] == pytest.approx(2 / 3, abs=1e-6)
        assert r[k]["ci"] is None


def test_image_level_score_zero_is_never_positive():
    r = image_level([1, 0], [0.0, 0.0], 0.0, n_boot=0)
    assert (r["tp"], r["fp"]) == (0, 0)


def test_image_level_perfect_and_worst():
    perfect = image_level([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.0], 0.5, n_boot=200)
    # 2 cases per rate: a value, but no interval (the bootstrap could only say [1, 1])
    assert all(perfect[k]["value"] == 1.0 and perfect[k]["ci"] is None and perfect[k]["note"] == "too few (n=2) for an interval"
               for k in ("sensitivity", "specificity", "ppv", "npv"))
    worst = image_level([1, 1, 0, 0], [0.1, 0.0, 0.9, 0.8], 0.5, n_boot=200)
    assert all(worst[k]["value"] == 0.0 for k in ("sensitivity", "specificity", "ppv", "npv"))


def test_image_level_undefined_metrics_are_null_not_errors():
    r = image_level([0, 0, 0], [0.9, 0.1, 0.0], 0.5, n_boot=100)  # all negatives
    assert r["sensitivity"]["value"] is None and r["sensitivity"]["ci"] is None and "no positive" in r["sensitivity"]["note"]
    assert r["npv"]["value"] == 1.0 and r["specificity"]["value"] == pytest.approx(2 / 3, abs=1e-6)
    r = image_level([1, 0], [0.1, 0.2], 0.5, n_boot=100)  # nothing predicted positive
    assert r["ppv"]["value"] is None and "predicted positive" in r["ppv"]["note"]
    r = image_level([], [], 0.5, n_boot=100)  # no images at all
    assert r["n_images"] == 0 and r["sensitivity"]["value"] is None


def test_bootstrap_is_deterministic_under_seed():
    rng = np.random.default_rng(0)
    labels, scores = rng.integers(0, 2, 60), rng.uniform(0, 1, 60)
    a = image_level(labels, scores, 0.5, n_boot=300, seed=7)
    b = image_level(labels, scores, 0.5, n_boot=300, seed=7)
    c = image_level(labels, scores, 0.5, n_boot=300, seed=8)
    assert a == b
    assert a["sensitivity"]["ci"] != c["sensitivity"]["ci"] or a["specificity"]["ci"] != c["specificity"]["ci"]


def test_bootstrap_resamples_groups_not_images():
    # 40 positives in 10 groups of 4 identical images: 6 groups found, 4 missed (sensitivity 0.6).
    labels = [1] * 40
    scores = [0.9] * 24 + [0.1] * 16
    groups = [i // 4 for i in range(40)]
    clustered = image_level(labels, scores, 0.5, groups=groups, n_boot=2000, seed=0)["sensitivity"]
    independent = image_level(labels, scores, 0.5, groups=None, n_boot=2000, seed=0)["sensitivity"]
    assert clustered["value"] == independent["value"] == 0.6
    assert clustered["ci_method"] == independent["ci_method"] == "group bootstrap"
    width = lambda e: e["ci"][1] - e["ci"][0]  # noqa: E731
    assert width(clustered) > width(independent) + 0.1
    # one group per image is the same as no groups
    assert image_level(labels, scores, 0.5, groups=[f"{i:02d}" for i in range(40)], n_boot=500)["sensitivity"] == \
        image_level(labels, scores, 0.5, n_boot=500)["sensitivity"]


def test_bootstrap_counts_draws_whole_groups():
    counts = np.array([[1, 0], [0, 3], [2, 2]])  # per group: two cells
    sums = bootstrap_counts(counts, 500, 0)
    assert sums.shape == (500, 2)
    # every resample is the sum of 3 whole rows drawn with replacement: only these 10 (cell 0, cell 1) pairs can occur
    import itertools

    possible = {tuple(counts[list(pick)].sum(axis=0)) for pick in itertools.combinations_with_replacement(range(3), 3)}
    assert len(possible) == 10
    drawn = {tuple(row) for row in sums.astype(int)}
    assert drawn <= possible and len(drawn) >= 8  # 500 draws reach (nearly) every combination
    assert abs(sums[:, 0].mean() - 3.0) < 0.2  # E = 3 * mean(1, 0, 2)


# --------------------------------------------------------------------------- operating points

CRAFTED_POS = [0.9, 0.8, 0.7, 0.6, 0.3]
CRAFTED_NEG = [0.85, 0.5, 0.4, 0.2, 0.1, 0.05, 0.0, 0.0, 0.0, 0.0]


def crafted():
    return [1] * 5 + [0] * 10, CRAFTED_POS + CRAFTED_NEG


def test_choose_operating_points_crafted_set():
    labels, scores = crafted()
    ops = choose_operating_points(labels, scores, 0.95, 0.95)
    # screening: every positive needed -> the largest tau keeping 0.3 in: 0.3 (negatives .85 .5 .4 above: spec 0.7)
    assert ops["screening"]["threshold"] == 0.3
    assert (ops["screening"]["val_sensitivity"], ops["screening"]["val_specificity"]) == (1.0, 0.7)
    # balanced: J = 0.7 at tau 0.3 and at tau 0.6 (sens 0.8, spec 0.9): the tie goes to the higher tau
    assert ops["balanced"]["threshold"] == 0.6
    # specific: no false positive allowed (10 negatives) -> above 0.85 -> the next observed score 0.9
    assert ops["specific"]["threshold"] == 0.9
    assert (ops["specific"]["val_sensitivity"], ops["specific"]["val_specificity"]) == (0.2, 1.0)
    assert all(op["target_reached"] and op["source"] == "val" for op in ops.values())


def test_choose_operating_points_other_targets():
    labels, scores = crafted()
    ops = choose_operating_points(labels, scores, target_sensitivity=0.8, target_specificity=0.9)
    assert ops["screening"]["threshold"] == 0.6  # 4 of 5 positives: keep 0.6, drop 0.3
    assert ops["specific"]["threshold"] == 0.6  # one false positive (0.85) allowed: smallest tau above 0.5


def test_choose_operating_points_thresholds_reproduce_val_numbers():
    labels, scores = crafted()
    for op in choose_operating_points(labels, scores).values():
        r = image_level(labels, scores, op["threshold"], n_boot=0)
        assert r["sensitivity"]["value"] == op["val_sensitivity"]
        assert r["specificity"]["value"] == op["val_specificity"]


def test_choose_operating_points_unreachable_and_bad_input():
    # one positive has no detection: sensitivity can never exceed 0.5
    ops = choose_operating_points([1, 1, 0], [0.5, 0.0, 0.2], 0.95, 0.95)
    assert ops["screening"]["target_reached"] is False
    assert ops["screening"]["threshold"] == 0.5 and ops["screening"]["val_sensitivity"] == 0.5
    # the top score is a negative: only a tau above every score gives specificity 1
    ops = choose_operating_points([1, 0], [0.3, 0.7])
    assert ops["specific"]["threshold"] > 0.7 and ops["specific"]["val_specificity"] == 1.0
    with pytest.raises(ValueError, match="positives and negatives"):
        choose_operating_points([1, 1], [0.5, 0.6])
    with pytest.raises(ValueError, match="no validation image has a detection"):
        choose_operating_points([1, 0], [0.0, 0.0])


# --------------------------------------------------------------------------- localization and FROC


def loc_fixture():
    gt = make_gt([[[10, 10, 30, 30]], [[50, 50, 90, 90]], []])
    preds = [pred([[12, 12, 30, 30]], [0.8]),  # IoU 324/400 = 0.81: found
             pred([[0, 0, 20, 20]], [0.9]),  # flagged but in the wrong place
             pred([[0, 0, 10, 10]], [0.7])]  # a false positive on the negative
    return gt, preds


def test_localization_counts_only_boxes_on_the_fracture():
    gt, preds = loc_fixture()
    loc = localization_metrics(gt, preds, 0.5, iou=0.3, n_boot=0)
    assert (loc["found"], loc["mislocalized"], loc["missed"], loc["n_positive"]) == (1, 1, 1, 2)
    assert loc["sensitivity"]["value"] == 0.5
    assert image_level(gt.labels, image_scores(preds), 0.5, n_boot=0)["sensitivity"]["value"] == 1.0
    # with a looser IoU requirement the 0.81 box still counts, with a stricter one it does not
    assert localization_metrics(gt, preds, 0.5, iou=0.85, n_boot=0)["found"] == 0


def test_froc_points():
    gt, preds = loc_fixture()
    pts = {p["threshold"]: p for p in froc(gt, preds, iou=0.3, thresholds=[0.5, 0.85, 0.95])}
    assert (pts[0.5]["sensitivity"], pts[0.5]["fp_per_image"]) == (0.5, pytest.approx(2 / 3, abs=1e-6))
    assert (pts[0.85]["sensitivity"], pts[0.85]["fp_per_image"]) == (0.0, pytest.approx(1 / 3, abs=1e-6))
    assert (pts[0.95]["sensitivity"], pts[0.95]["fp_per_image"]) == (0.0, 0.0)
    assert pts[0.5]["n_lesions"] == 2


def test_roc_auc_with_ties():
    assert roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.0]) == 1.0
    assert roc_auc([1, 0], [0.5, 0.5]) == 0.5
    assert roc_auc([0, 0], [0.5, 0.1]) is None


# --------------------------------------------------------------------------- ground truth


def test_load_ground_truth_phantom_tree(tree):
    root, phantoms = tree
    gt = load_ground_truth(root / "dataset.yaml", "test")
    assert [Path(im.key).name for im in gt.images] == [f"ph{i:03d}.png" for i in TEST]
    assert gt.n_positive == 3 and gt.splits_sha256 == sha256_file(root / "splits.csv")
    for im, i in zip(gt.images, TEST):
        assert (im.width, im.height) == (200, 256)
        if phantoms[i].box is None:
            assert im.boxes.shape == (0, 4) and im.label == 0
        else:
            np.testing.assert_allclose(im.boxes[0], phantoms[i].box, atol=0.01)
        assert (im.source, im.region, im.group) == ("alpha" if i < 9 else "beta", "hand" if i % 2 else "leg", f"g{i}")
    assert gt.notes == []


def test_load_ground_truth_without_splits_csv_and_path_key(tmp_path):
    root = tmp_path / "ds"
    write_tree(root, splits_csv=False, yaml_path=None)
    gt = load_ground_truth(root / "dataset.yaml", "val")
    assert len(gt) == 6 and {im.source for im in gt.images} == {"unknown"}
    assert gt.groups == [im.key for im in gt.images]
    assert any("no splits.csv" in n for n in gt.notes)
    # a yaml elsewhere with a relative path: relative to the yaml's folder
    (tmp_path / "other.yaml").write_text("path: ds\nval: images/val\ntest: images/test\nnames: {0: fracture}\n")
    assert len(load_ground_truth(tmp_path / "other.yaml", "test")) == 6


def test_load_ground_truth_weak_positive_and_bad_input(tree):
    root, _ = tree
    rows = list(csv.DictReader(open(root / "splits.csv")))
    for row in rows:
        if row["path"].endswith("ph011.png"):  # a negative of the test split becomes a weak positive
            row["label"], row["weak"] = "1", "1"
    with open(root / "splits.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    gt = load_ground_truth(root / "dataset.yaml", "test")
    weak = next(im for im in gt.images if im.key.endswith("ph011.png"))
    assert weak.label == 1 and weak.boxes_known is False and gt.n_positive == 4
    assert box_metrics(gt, [None] * len(gt))["n_images"] == 5  # left out of box metrics
    (root / "labels" / "test" / "ph005.txt").write_text("0 0.5 0.5\n")
    with pytest.raises(DataError, match="ph005.txt:1"):
        load_ground_truth(root / "dataset.yaml", "test")
    with pytest.raises(DataError, match="not found"):
        load_ground_truth(root / "missing.yaml", "test")


def test_splits_csv_listing_an_image_under_another_split_is_an_error(tree):
    root, _ = tree
    text = (root / "splits.csv").read_text().replace("images/test/ph002.png,test", "images/test/ph002.png,train")
    (root / "splits.csv").write_text(text)
    with pytest.raises(DataError, match="another split"):
        load_ground_truth(root / "dataset.yaml", "test")


# --------------------------------------------------------------------------- matching predictions


def test_match_predictions_paths_relative_foreign_and_collisions(tree):
    root, phantoms = tree
    # the same file name in val and test must never be confused
    cv2.imwrite(str(root / "images" / "val" / "ph002.png"), cv2.imread(str(image_path(root, 2)), cv2.IMREAD_UNCHANGED))
    (root / "labels" / "val" / "ph002.txt").write_text("")
    gt = load_ground_truth(root / "dataset.yaml", "test")
    recs = [
        {"image": "images/test/ph002.png", "detections": []},  # relative to the dataset root
        {"image": "/another/machine/ds/images/test/ph005.png", "detections": []},  # made elsewhere
        {"image": str(root / "images" / "val" / "ph002.png"), "detections": []},  # val's ph002: not test's
        {"image": str(image_path(root, 8)), "image_size": [100, 100], "detections": []},  # wrong size
        {"image": str(image_path(root, 11)), "error": "the file is empty"},
        {"image": str(image_path(root, 14)), "detections": []},
        {"image": str(image_path(root, 14)), "detections": []},  # duplicate
    ]
    preds, rest, errors = match_predictions(recs, gt)
    keys = [im.key for im in gt.images]
    assert preds[keys.index("images/test/ph002.png")] is not None
    assert preds[keys.index("images/test/ph005.png")] is not None
    assert [r["image"] for r in rest] == [str(root / "images" / "val" / "ph002.png")]
    assert any("ph008.png" in e and "100x100" in e for e in errors)
    assert any("ph011.png" in e and "prediction failed" in e for e in errors)
    assert any("ph014.png" in e and "more than one" in e for e in errors)


# --------------------------------------------------------------------------- the CLI on saved predictions


def run_cli(args, capsys):
    rc = ev.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_predictions_end_to_end_exact_numbers(tree, tmp_path, capsys):
    root, phantoms = tree
    results = tmp_path / "results.json"
    results.write_text(json.dumps(handcrafted_records(root, phantoms)))
    out = tmp_path / "out" / "report.json"
    rc, stdout, err = run_cli(["--predictions", results, "--data", root / "dataset.yaml", "--split", "test", "--out", out,
                               "--n-boot", 200, "--quiet"], capsys)
    assert rc == 0, err
    r = json.loads(out.read_text())
    # thresholds chosen on val: positives .9 .6 .4, negatives .5 .2 (and one without boxes)
    ops = r["operating_points"]
    assert (ops["screening"]["threshold"], ops["balanced"]["threshold"], ops["specific"]["threshold"]) == (0.4, 0.6, 0.6)
    assert (ops["screening"]["val_sensitivity"], ops["screening"]["val_specificity"]) == (1.0, pytest.approx(2 / 3, abs=1e-6))
    # test at 0.4: positives .8 .7 found, .3 missed; negatives .45 .65 flagged, one clean
    s = r["image_level"]["screening"]
    assert (s["tp"], s["fn"], s["fp"], s["tn"]) == (2, 1, 2, 1)
    assert (s["sensitivity"]["value"], s["ppv"]["value"], s["npv"]["value"]) == (pytest.approx(2 / 3, abs=1e-6), 0.5, 0.5)
    b = r["image_level"]["balanced"]
    assert (b["tp"], b["fn"], b["fp"], b["tn"]) == (2, 1, 1, 2)
    assert b["sensitivity"]["ci"] is None and b["sensitivity"]["note"] == "too few (n=3) for an interval"
    # localization at 0.6: only ph002 has its box on the fracture; ph008's box is in a corner
    loc = r["localization"]["balanced"]
    assert (loc["found"], loc["mislocalized"], loc["missed"]) == (1, 1, 2)
    # boxes: ranked TP .8, FP .7, FP .65, FP .45, TP .3 of 3 true boxes:
    # precision envelope 1.0 up to recall 1/3 (34 points), 0.4 up to 2/3 (33 points), then 0
    assert r["box"]["map50"] == pytest.approx((34 + 33 * 0.4) / 101, abs=1e-5)
    assert r["box"]["map50_95"] == pytest.approx((34 + 33 * 0.4) / 101, abs=1e-5)
    assert (r["n_images"], r["n_positive"], r["box"]["n_gt_boxes"]) == (6, 3, 3)
    # breakdowns with counts: alpha = ph002, ph005, ph008; beta = ph011, ph014, ph017
    assert r["by_source"]["alpha"]["n_images"] == 3 and r["by_source"]["alpha"]["n_positive"] == 2
    assert r["by_source"]["beta"]["image_level"]["balanced"]["tp"] == 0
    assert set(r["by_region"]) == {"hand", "leg"} and r["by_region"]["leg"]["n_positive"] == 3
    assert r["froc"] and r["pr_curve"]["image"] and len(r["pr_curve"]["box_iou50"]) == 101
    assert r["errors"] == [] and any("other splits" in n for n in r["notes"]) is False
    # records saved at the 0.25 operating threshold (inference.py without --conf 0.001): said loudly
    assert any(n.startswith("WARNING") and ">= 0.25" in n for n in r["notes"])
    assert (out.parent / "report_pr.png").stat().st_size > 1000 and (out.parent / "report_froc.png").is_file()
    assert "screening" in stdout and "mAP@0.5" in stdout


def test_cli_predictions_errors_for_unmatched(tree, tmp_path, capsys):
    root, phantoms = tree
    data = root / "dataset.yaml"
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps(handcrafted_records(root, phantoms, skip={17})))
    rc, _, err = run_cli(["--predictions", missing, "--data", data, "--out", tmp_path / "r.json", "--no-plots"], capsys)
    assert rc == 2 and "ph017.png: no prediction" in err and err.count("\n") == 1 and "Traceback" not in err
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps(handcrafted_records(root, phantoms) + [{"image": "/nowhere/x.png", "detections": []}]))
    rc, _, err = run_cli(["--predictions", extra, "--data", data, "--out", tmp_path / "r.json", "--no-plots"], capsys)
    assert rc == 2 and "matches no image" in err
    # --allow-missing: scored as 'no detection' and listed
    rc, _, err = run_cli(["--predictions", missing, "--data", data, "--out", tmp_path / "r.json", "--no-plots", "--n-boot", 0,
                          "--allow-missing"], capsys)
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text())
    # ph017 (0.65, a false positive at 0.6) now counts as a true negative
    assert r["errors"] == ["images/test/ph017.png: no prediction"] and r["image_level"]["balanced"]["tn"] == 3
    # predictions without the val split cannot choose thresholds ...
    test_only = tmp_path / "test_only.json"
    test_only.write_text(json.dumps([rec for rec in handcrafted_records(root, phantoms) if "/test/" in rec["image"]]))
    rc, _, err = run_cli(["--predictions", test_only, "--data", data, "--out", tmp_path / "r.json", "--no-plots"], capsys)
    assert rc == 2 and "no predictions for the 'val' split" in err
    # ... unless thresholds are given (a model card works)
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"thresholds": {"balanced": {"threshold": 0.6}, "screening": 0.4}}))
    rc, _, err = run_cli(["--predictions", test_only, "--data", data, "--out", tmp_path / "r.json", "--no-plots", "--n-boot", 0,
                          "--thresholds", card], capsys)
    assert rc == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["image_level"]) == {"balanced", "screening"} and r["operating_points"]["balanced"]["source"] == "given"
    # broken input files: one line, exit 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    rc, _, err = run_cli(["--predictions", bad, "--data", data, "--no-plots"], capsys)
    assert rc == 2 and "not valid JSON" in err
    rc, _, err = run_cli(["--predictions", test_only, "--data", data, "--write-card"], capsys)
    assert rc == 2 and "--write-card needs --weights" in err
    rc, _, err = run_cli(["--predictions", test_only, "--data", data, "--threads", "0"], capsys)
    assert rc == 2 and "--threads must be >= 1" in err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    rc, _, err = run_cli(["--weights", corrupt, "--data", data, "--no-plots"], capsys)
    assert rc == 2 and "cannot load" in err and "Traceback" not in err


def test_scoring_the_threshold_split_itself(tree, tmp_path, capsys):
    root, phantoms = tree
    results = tmp_path / "results.json"
    results.write_text(json.dumps(handcrafted_records(root, phantoms)))
    rc, _, err = run_cli(["--predictions", results, "--data", root / "dataset.yaml", "--split", "val", "--out", tmp_path / "v.json",
                          "--n-boot", 0, "--no-plots"], capsys)
    assert rc == 0, err
    r = json.loads((tmp_path / "v.json").read_text())
    b = r["image_level"]["balanced"]  # val at its own balanced threshold 0.6: the val numbers themselves
    assert (b["sensitivity"]["value"], b["specificity"]["value"]) == (pytest.approx(2 / 3, abs=1e-6), 1.0)
    assert r["errors"] == [] and any("optimistic" in n for n in r["notes"])


def test_val_and_test_on_the_same_images_is_a_clear_error(tree, tmp_path, capsys):
    root, phantoms = tree
    yaml_text = (root / "dataset.yaml").read_text()
    (root / "same.yaml").write_text(yaml_text.replace("val: images/val", "val: images/test"))
    (root / "splits.csv").unlink()  # a user's own tree: no manifest to say which split an image belongs to
    results = tmp_path / "results.json"
    results.write_text(json.dumps(handcrafted_records(root, phantoms)))
    rc, _, err = run_cli(["--predictions", results, "--data", root / "same.yaml", "--out", tmp_path / "s.json", "--no-plots"], capsys)
    assert rc == 2 and "Traceback" not in err
    assert "'val' and 'test' splits" in err and "share 6 of 6 image(s)" in err and "--val-split test" in err
    assert not (tmp_path / "s.json").exists()


# --------------------------------------------------------------------------- model card


def test_update_model_card_preserves_other_keys(tmp_path):
    labels, scores = crafted()
    ops = choose_operating_points(labels, scores)
    gt = make_gt([[[10, 10, 50, 50]], []], groups=["p1", "p2"], sources={0: "a", 1: "b"})
    report = evaluate_predictions(gt, [pred([[10, 10, 50, 50]], [0.95]), pred()], ops, n_boot=100)
    card_path = tmp_path / "w" / "model.json"
    card_path.parent.mkdir()
    original = {"name": "model", "backend": "yolo", "imgsz": 640, "contract": Contract().to_dict(),
                "training": {"epochs": 3, "data": "x.yaml"}, "thresholds": {"balanced": {"threshold": 0.01}}}
    card_path.write_text(json.dumps(original))
    update_model_card(card_path, report, report)
    card = json.loads(card_path.read_text())
    for key in ("name", "backend", "imgsz", "contract", "training"):
        assert card[key] == original[key]
    assert card["thresholds"]["balanced"] == {"threshold": 0.6, "val_sensitivity": 0.8, "val_specificity": 0.9,
                                              "target_reached": True, "chosen_on": "val"}
    assert card["thresholds"]["screening"]["target"] == 0.95
    assert resolve_threshold("specific", ModelCard.from_dict(card)) == (0.9, "model_card")
    m = card["metrics"]
    assert m["box"]["map50"] == 1.0 and m["n_images"] == 2 and m["split"] == "test"
    assert m["image_level"]["balanced"]["sensitivity"]["value"] == 1.0
    assert m["by_source"]["a"]["n_positive"] == 1 and m["by_source"]["b"]["n_images"] == 1
    assert not (card_path.parent / "model.json.tmp").exists()


# --------------------------------------------------------------------------- --weights through the same code


def test_cli_weights_matches_predictions_and_writes_card(tree, tmp_path, capsys, oracle_backend):
    root, phantoms = tree
    card = {"name": "oracle", "backend": "oracle", "training": {"epochs": 1}}
    weights = write_oracle(tmp_path / "w", root, phantoms, Contract(), card)  # no contract.json: harmonized
    out = tmp_path / "weights_report.json"
    rc, stdout, err = run_cli(["--weights", weights, "--data", root / "dataset.yaml", "--out", out, "--n-boot", 200, "--quiet",
                               "--no-plots", "--write-card", "--save-predictions", tmp_path / "saved.json"], capsys)
    assert rc == 0, err
    by_weights = json.loads(out.read_text())
    results = tmp_path / "results.json"
    results.write_text(json.dumps(handcrafted_records(root, phantoms)))
    rc, _, err = run_cli(["--predictions", results, "--data", root / "dataset.yaml", "--out", tmp_path / "rec.json",
                          "--n-boot", 200, "--no-plots"], capsys)
    by_records = json.loads((tmp_path / "rec.json").read_text())
    for key in ("box", "operating_points", "image_level", "localization", "froc", "by_source", "by_region"):
        assert by_weights[key] == by_records[key], key
    assert not any("WARNING" in n for n in by_weights["notes"])  # predicted down to 0.001
    written = json.loads((tmp_path / "w" / "oracle.json").read_text())
    assert written["training"] == {"epochs": 1} and written["backend"] == "oracle"
    assert {m: t["threshold"] for m, t in written["thresholds"].items()} == {"screening": 0.4, "balanced": 0.6, "specific": 0.6}
    assert written["metrics"]["split"] == "test" and written["metrics"]["splits_sha256"] == sha256_file(root / "splits.csv")
    saved = json.loads((tmp_path / "saved.json").read_text())
    assert len(saved) == 12 and all("detections" in s for s in saved)
    assert "model card updated" in stdout
    # a second run without --write-card uses the card's (frozen) thresholds
    rc, _, err = run_cli(["--weights", weights, "--data", root / "dataset.yaml", "--out", out, "--n-boot", 0, "--quiet", "--no-plots"],
                         capsys)
    assert rc == 0 and json.loads(out.read_text())["operating_points"]["balanced"]["source"] == "model_card"


def test_pre_harmonized_tree_is_fed_as_stored(tmp_path, oracle_backend):
    root = tmp_path / "ds"
    phantoms = write_tree(root, contract=True)  # contract.json: the tree is already harmonized
    weights = write_oracle(tmp_path / "w", root, phantoms, None, {"backend": "oracle"})  # answers for the stored pixels
    predictor = inference.Predictor(weights)
    report = run_evaluation(predictor, root / "dataset.yaml", n_boot=0, progress=False)
    assert predictor.detector.unknown == 0  # every image reached the model exactly as stored
    assert report["operating_points"]["balanced"]["threshold"] == 0.6
    assert any("no second harmonization" in n for n in report["notes"])
    assert predictor.contract == Contract()  # restored afterwards
    # the direct path other tools use (ensemble.py) decides the same way
    records = predict_split(predictor, load_ground_truth(root / "dataset.yaml", "test"), progress=False)
    assert predictor.detector.unknown == 0 and sum(len(r["detections"]) for r in records) == 5
    forced = run_evaluation(predictor, root / "dataset.yaml", n_boot=0, progress=False, harmonize="yes",
                               thresholds={"balanced": 0.6})
    assert predictor.detector.unknown == 6  # CLAHE'd pixels are not what the oracle knows
    assert forced["image_level"]["balanced"]["tp"] == 0


def test_evaluate_predictions_shapes_and_json(tmp_path):
    gt, preds = loc_fixture()
    r = evaluate_predictions(gt, preds, {"balanced": 0.5}, n_boot=50)
    json.dumps(r)  # plain JSON, no numpy types
    assert r["localization"]["iou"] == 0.3 and r["image_level"]["balanced"]["threshold"] == 0.5
    assert not any(isinstance(v, float) and math.isnan(v) for v in r["box"].values() if v is not None)
    with pytest.raises(DataError, match="unknown mode"):
        evaluate_predictions(gt, preds, {"lenient": 0.5})
    with pytest.raises(ValueError, match="predictions for"):
        evaluate_predictions(gt, preds[:2], {"balanced": 0.5})


@pytest.mark.slow
def test_ultralytics_crosscheck_runs_offline_without_touching_the_tree(tree, tmp_path):
    import glob

    import yaml
    from ultralytics import YOLO
    from ultralytics.utils import ROOT as UL_ROOT

    root, _ = tree
    cfg = yaml.safe_load(Path(glob.glob(str(UL_ROOT / "cfg/models/v8/yolov8.yaml"))[0]).read_text())
    cfg["nc"], cfg["scales"] = 1, {"n": cfg["scales"]["n"]}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    YOLO(str(tmp_path / "tiny.yaml"), task="detect").save(str(tmp_path / "tiny.pt"))  # untrained: no download
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    cc = ultralytics_crosscheck(tmp_path / "tiny.pt", root / "dataset.yaml", "test", imgsz=256,
                                   ours={"box": {"map50": 0.25, "map50_95": 0.125}})
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # no labels cache written into the tree
    assert 0.0 <= cc["ultralytics"]["map50"] <= 1.0 and 0.0 <= cc["ultralytics"]["map50_95"] <= cc["ultralytics"]["map50"]
    assert cc["difference_ours_minus_ultralytics"]["map50"] == pytest.approx(0.25 - cc["ultralytics"]["map50"], abs=1e-6)


# --------------------------------------------------------------------------- one box per finding, chosen on val


def test_choose_box_rule_removes_nested_copies_and_keeps_map():
    truth = [[[10, 10, 50, 50]] if i % 2 == 0 else [] for i in range(10)]
    gt = make_gt(truth)
    preds = []
    for i in range(10):
        if i % 2 == 0:  # the fracture, boxed 5 times (nested), the best box first; tops 0.9 .. 0.5 (balanced: 0.5)
            top = 0.9 - 0.05 * i
            preds.append(pred([[10, 10, 50, 50], [11, 11, 49, 49], [9, 9, 52, 52], [14, 14, 46, 46], [20, 20, 30, 30]],
                              [top, top - 0.001, top - 0.002, top - 0.003, top - 0.004]))
        else:
            preds.append(pred([[60, 60, 70, 70]], [0.3]))
    rule, table = choose_box_rule(gt, preds)
    raw = next(r for r in table if r["rule"] == {"nms_iou": None, "contained": None, "max_boxes": None})
    chosen = next(r for r in table if r["chosen"])
    assert raw["p90"] == 5 and chosen["p90"] <= BOX_RULE_MAX_P90
    assert chosen["map50"] >= raw["map50"] and chosen["p90"] == 1
    assert BoxRule(**chosen["rule"]) == rule and rule != BoxRule()
    assert sum(r["chosen"] for r in table) == 1


def test_choose_box_rule_keeps_the_budget_in_every_mode_not_only_balanced():
    # 6 positives (one barely scored: screening must go down to 0.1 to keep its sensitivity) and 6 negatives; each
    # positive also has 4 faint, separate boxes (0.15) that only screening mode shows, and no NMS or containment removes
    truth = [[[10, 10, 50, 50]] if i < 6 else [] for i in range(12)]
    gt = make_gt(truth)
    faint = [[60, 60, 70, 70], [80, 10, 90, 20], [10, 80, 20, 90], [80, 80, 90, 90]]
    preds = [pred([[10, 10, 50, 50]] + faint, [0.9 - 0.04 * i if i < 5 else 0.1] + [0.15] * 4) if i < 6
             else pred([[30, 60, 40, 70]], [0.3]) for i in range(12)]
    rule, table = choose_box_rule(gt, preds)
    raw = next(r for r in table if r["rule"] == {"nms_iou": None, "contained": None, "max_boxes": None})
    chosen = next(r for r in table if r["chosen"])
    assert raw["p90_by_mode"]["balanced"] == 1 and raw["p90_by_mode"]["screening"] == 5  # fine at balanced only
    assert raw["worst_mode"] == "screening" and raw["p90"] == 5
    assert all(v <= BOX_RULE_MAX_P90 for v in chosen["p90_by_mode"].values()) and rule.max_boxes is not None


def test_cli_chooses_a_box_rule_on_val_and_writes_it_to_the_card(tree, tmp_path, capsys, oracle_backend):
    root, phantoms = tree
    weights = write_oracle(tmp_path / "m", root, phantoms, Contract(), {"backend": "oracle"})
    table = json.loads(weights.read_text())
    for key, rows in table.items():  # every box comes with two nested near-copies scoring a little lower
        table[key] = [r for x1, y1, x2, y2, sc in rows for r in ([x1, y1, x2, y2, sc], [x1 + 1, y1 + 1, x2 - 1, y2 - 1, sc - 1e-3],
                                                                 [x1 - 1, y1, x2 + 1, y2, sc - 2e-3])]
    weights.write_text(json.dumps(table))
    out = tmp_path / "r.json"
    rc, _, err = run_cli(["--weights", weights, "--data", root / "dataset.yaml", "--out", out, "--n-boot", 0, "--quiet",
                          "--no-plots", "--box-rule", "choose", "--write-card"], capsys)
    assert rc == 0, err
    report = json.loads(out.read_text())
    assert report["box_rule"]["source"] == "val" and len(report["box_rule"]["search"]) == 48
    assert report["boxes_per_flagged_image"]["balanced"]["max"] == 1
    card = json.loads((tmp_path / "m" / "oracle.json").read_text())
    assert card["box_rule"] == report["box_rule"]["rule"] and card["box_rule_chosen_on"] == "val"
    assert card["metrics"]["boxes_per_flagged_image"]["balanced"]["p90"] == 1
    # choosing again on a model whose card already holds thresholds re-chooses them on val too
    rc, _, err = run_cli(["--weights", weights, "--data", root / "dataset.yaml", "--out", out, "--n-boot", 0, "--quiet",
                          "--no-plots", "--box-rule", "choose"], capsys)
    assert rc == 0, err
    assert json.loads(out.read_text())["operating_points"]["balanced"]["source"] != "model_card"
    # the model's users get the rule from the card; asking for none shows the raw boxes again
    rc, _, err = run_cli(["--weights", weights, "--data", root / "dataset.yaml", "--out", out, "--n-boot", 0, "--quiet",
                          "--no-plots", "--box-rule", "none"], capsys)
    assert rc == 0 and json.loads(out.read_text())["boxes_per_flagged_image"]["balanced"]["max"] == 3
    rc, _, err = run_cli(["--predictions", tmp_path / "nope.json", "--data", root / "dataset.yaml", "--box-rule", "choose"], capsys)
    assert rc == 2 and "Traceback" not in err


def test_cli_chooses_a_box_rule_for_saved_predictions_and_saves_them_ruled(tree, tmp_path, capsys, oracle_backend):
    # saved predictions (an ensemble's, say) get their own rule on val, like a model: the nested copies go
    root, phantoms = tree
    weights = write_oracle(tmp_path / "m", root, phantoms, Contract(), {"backend": "oracle"})
    table = json.loads(weights.read_text())
    for key, rows in table.items():
        table[key] = [r for x1, y1, x2, y2, sc in rows for r in ([x1, y1, x2, y2, sc], [x1 + 1, y1 + 1, x2 - 1, y2 - 1, sc - 1e-3])]
    weights.write_text(json.dumps(table))
    raw, ruled, out = tmp_path / "raw.json", tmp_path / "ruled.json", tmp_path / "r.json"
    common = ["--data", root / "dataset.yaml", "--out", out, "--n-boot", 0, "--quiet", "--no-plots"]
    assert run_cli(["--weights", weights, "--box-rule", "none", "--save-predictions", raw, *common], capsys)[0] == 0
    before = raw.read_bytes()
    rc, _, err = run_cli(["--predictions", raw, "--box-rule", "choose", "--save-predictions", ruled, *common], capsys)
    assert rc == 0, err
    report = json.loads(out.read_text())
    assert report["box_rule"]["source"] == "val" and report["boxes_per_flagged_image"]["balanced"]["max"] == 1
    assert raw.read_bytes() == before  # the input is never changed
    n_raw = [len(r["detections"]) for r in json.loads(before)]
    n_ruled = [len(r["detections"]) for r in json.loads(ruled.read_text())]
    assert len(n_ruled) == len(n_raw) and max(n_raw) == 2 and max(n_ruled) == 1 and sum(n_ruled) == sum(n_raw) // 2
    # as they were made (card), there is nothing to save; none cannot undo a rule already applied
    for bad in (["--save-predictions", ruled], ["--box-rule", "none"]):
        rc, _, err = run_cli(["--predictions", raw, *bad, *common], capsys)
        assert rc == 2 and "error:" in err and "Traceback" not in err


def test_cli_measures_mirror_tta_and_writes_it_to_the_card(tree, tmp_path, capsys, oracle_backend):
    from bone_r.fusion import MirrorTTA

    root, phantoms = tree
    weights = write_oracle(tmp_path / "m", root, phantoms, Contract(), {"backend": "oracle"})
    out = tmp_path / "r.json"
    rc, _, err = run_cli(["--weights", weights, "--data", root / "dataset.yaml", "--out", out, "--n-boot", 0, "--quiet",
                          "--no-plots", "--tta", "hflip", "--write-card"], capsys)
    assert rc == 0, err
    assert json.loads(out.read_text())["model"]["tta"] == "hflip"
    card = json.loads((tmp_path / "m" / "oracle.json").read_text())
    # the oracle knows the images, not their mirrors: each box is seen by one view only and keeps half its score,
    # so the thresholds chosen on val are half those without augmentation (0.4 / 0.6 / 0.6)
    assert card["tta"] == "hflip"
    assert {m: t["threshold"] for m, t in card["thresholds"].items()} == {"screening": 0.2, "balanced": 0.3, "specific": 0.3}
    predictor = inference.Predictor(weights)  # the card's users predict the same way
    assert isinstance(predictor.detector, MirrorTTA) and predictor.settings.sources["tta"] == "model_card"
    assert not isinstance(inference.Predictor(weights, tta="none").detector, MirrorTTA)
    rc, _, err = run_cli(["--predictions", out, "--data", root / "dataset.yaml", "--tta", "hflip"], capsys)
    assert rc == 2 and "--tta needs --weights" in err


def test_cli_evaluates_at_another_input_size_and_writes_it_to_the_card(tree, tmp_path, capsys, oracle_backend):
    root, phantoms = tree
    weights = write_oracle(tmp_path / "m", root, phantoms, Contract(), {"backend": "oracle", "imgsz": 640,
                                                                        "thresholds": {"balanced": {"threshold": 0.99}}})
    out = tmp_path / "r.json"
    OracleDetector.built_at.clear()
    rc, _, err = run_cli(["--weights", weights, "--data", root / "dataset.yaml", "--out", out, "--n-boot", 0, "--quiet",
                          "--no-plots", "--imgsz", 800], capsys)
    assert rc == 0, err
    report = json.loads(out.read_text())
    assert OracleDetector.built_at == [800] and report["model"]["imgsz"] == 800
    # the card's thresholds were chosen at 640: at another size they are chosen on val again
    assert report["operating_points"]["balanced"]["source"] != "model_card"
    assert json.loads((tmp_path / "m" / "oracle.json").read_text())["imgsz"] == 640  # no --write-card: card untouched
    rc, _, err = run_cli(["--weights", weights, "--data", root / "dataset.yaml", "--out", out, "--n-boot", 0, "--quiet",
                          "--no-plots", "--imgsz", 800, "--write-card"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "m" / "oracle.json").read_text())["imgsz"] == 800
    assert inference.Predictor(weights).settings.imgsz == 800  # the card's users predict at the size it was measured at
    rc, _, err = run_cli(["--weights", weights, "--data", root / "dataset.yaml", "--imgsz", 8], capsys)
    assert rc == 2 and "--imgsz must lie in" in err
    rc, _, err = run_cli(["--predictions", out, "--data", root / "dataset.yaml", "--imgsz", 800], capsys)
    assert rc == 2 and "--imgsz needs --weights" in err


# --------------------------------------------------------------------------- intervals at small n


def test_wilson_interval_known_values():
    assert wilson_interval(3, 3) == pytest.approx((0.438503, 1.0), abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    assert wilson_interval(50, 100) == pytest.approx((0.403831, 0.596169), abs=1e-6)


def test_small_n_intervals_are_wilson_or_absent_never_degenerate():
    # 3 positives all found, 4 negatives: the bootstrap can only say [1, 1]
    tiny = confusion_metrics([1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 1], n_boot=500)
    assert tiny["sensitivity"]["ci"] is None and tiny["sensitivity"]["note"] == "too few (n=3) for an interval"
    assert tiny["specificity"]["ci"] is None and "n=4" in tiny["specificity"]["note"]
    # 8 positives all found: Wilson, not the bootstrap's [1, 1]
    small = confusion_metrics([1] * 8 + [0] * 40, [1] * 8 + [0] * 38 + [1] * 2, n_boot=500)
    assert small["sensitivity"]["ci_method"] == "wilson" and small["sensitivity"]["ci"] == pytest.approx([0.675592, 1.0], abs=1e-6)
    # 40 negatives: the group bootstrap, a real interval around 38/40
    assert small["specificity"]["ci_method"] == "group bootstrap"
    lo, hi = small["specificity"]["ci"]
    assert lo < 0.95 < hi and lo < hi
    assert "too few (n=3)" in with_ci(tiny["sensitivity"])


def test_per_source_headline_counts_each_radiograph_once_with_its_own_auc():
    # source "a": 3 radiographs; r0 has 3 augmented copies (same group). source "b": 4 single images.
    truth = [[[10, 10, 30, 30]]] * 3 + [[]] * 2 + [[[10, 10, 30, 30]], [[10, 10, 30, 30]], [], []]
    groups = ["r0", "r0", "r0", "r1", "r2", "b0", "b1", "b2", "b3"]
    sources = {i: "a" if i < 5 else "b" for i in range(9)}
    gt = make_gt(truth, groups=groups, sources=sources)
    hit = [10, 10, 30, 30]
    preds = [pred([hit], [0.9]), pred([hit], [0.2]), pred([hit], [0.1]), pred([], []), pred([[50, 50, 60, 60]], [0.5]),
             pred([hit], [0.8]), pred([hit], [0.3]), pred([[50, 50, 60, 60]], [0.4]), pred([], [])]
    report = evaluate_predictions(gt, preds, {"balanced": 0.35}, n_boot=0)
    a, b = report["by_source_radiographs"]["a"], report["by_source_radiographs"]["b"]
    assert (a["n_images"], a["n_positive"]) == (3, 1) and report["by_source"]["a"]["n_images"] == 5
    assert a["image_auc"] == 1.0  # r0's first copy (0.9) above r1 (0) and r2 (0.5)
    assert b["image_auc"] == pytest.approx(0.75)  # positives .8 .3 vs negatives .4 0: 3 of 4 pairs ordered
    assert (a["image_level"]["balanced"]["tp"], a["image_level"]["balanced"]["fp"]) == (1, 1)
    mean = report["mean_over_sources"]
    assert mean["image_auc"] == {"value": pytest.approx(0.875), "n_sources": 2}
    # every rate here rests on fewer than 5 cases: too few for the mean, as for an interval
    assert mean["sensitivity"] == {"value": None, "n_sources": 0}
    report = evaluate_predictions(make_gt(truth * 5, groups=[f"{g}{k}" for k in range(5) for g in groups],
                                             sources={i: sources[i % 9] for i in range(45)}), preds * 5, {"balanced": 0.35}, n_boot=0)
    a, b = report["by_source_radiographs"]["a"], report["by_source_radiographs"]["b"]
    assert a["image_level"]["balanced"]["sensitivity"]["value"] == 1.0 and b["image_level"]["balanced"]["sensitivity"]["value"] == 0.5
    assert report["mean_over_sources"]["sensitivity"] == {"value": pytest.approx(0.75), "n_sources": 2}
    text = format_report(report)
    assert text.index("each radiograph once") < text.index("pooled over every source")


def test_sensitivity_by_fracture_size_cuts_each_sources_positives_by_their_largest_box():
    # source "a": six fractures of 5..30 px squares on 100x100 images (areas 0.25%..9%), one with a second, smaller
    # box (the largest box counts), a copy of the 30-px radiograph (same group: counted once) and a negative.
    sq = lambda s: [10, 10, 10 + s, 10 + s]  # noqa: E731
    truth = [[sq(20)], [sq(5)], [sq(30)], [sq(10)], [sq(25), sq(4)], [sq(15)], [sq(30)], []]
    groups = ["g20", "g5", "g30", "g10", "g25", "g15", "g30", "neg"]
    sources = {i: "a" for i in range(8)} | {7: "b"}
    gt = make_gt(truth, groups=groups, sources=sources)
    elsewhere = [60, 60, 90, 90]
    preds = [pred([elsewhere], [0.9]), pred([], []), pred([sq(30)], [0.9]), pred([sq(10)], [0.2]),
             pred([sq(25)], [0.9]), pred([], []), pred([], []), pred([elsewhere], [0.9])]
    report = evaluate_predictions(gt, preds, {"balanced": 0.5}, n_boot=0)
    sizes = report["by_fracture_size"]
    assert sizes["threshold"] == 0.5 and list(sizes["by_source"]) == ["a"]  # "b" has no positive
    rows = sizes["by_source"]["a"]
    assert [r["n"] for r in rows] == [2, 2, 2]
    assert [(r["area_min"], r["area_max"]) for r in rows] == [(0.0025, 0.01), (0.0225, 0.04), (0.0625, 0.09)]
    assert [r["flagged"]["k"] for r in rows] == [0, 1, 2]  # 20 px flagged by a box elsewhere
    assert [r["found"]["k"] for r in rows] == [0, 0, 2]  # ... which does not find it; 10 px scored below threshold
    assert rows[2]["found"]["value"] == 1.0 and rows[0]["flagged"]["ci"][0] == 0 and 0 < rows[0]["flagged"]["ci"][1] < 1
    assert "sensitivity by fracture size" in format_report(report)


def random_case(rng, n_images: int, max_true: int = 3, max_dets: int = 8):
    """Crowded random truth and predictions: near-miss and overlapping boxes, repeated scores, empty images."""
    truth, preds = [], []
    tied = rng.random() < 0.3  # scores from three values: ties within and between images
    for _ in range(n_images):
        true = [[x, y, x + w, y + h] for x, y, w, h in zip(*rng.uniform([0, 0, 5, 5], [60, 60, 40, 40], (rng.integers(0, max_true + 1), 4)).T)]
        jittered = [np.array(t) + rng.normal(0, 4, 4) for t in true for _ in range(rng.integers(0, 3))]
        boxes = [np.r_[np.minimum(b[:2], b[2:]), np.maximum(b[:2], b[2:])] for b in jittered]  # x1 <= x2, y1 <= y2
        boxes += [rng.uniform(0, 60, 2).tolist() * 2 + np.r_[0, 0, rng.uniform(5, 40, 2)] for _ in range(rng.integers(0, max_dets))]
        scores = rng.choice([0.2, 0.5, 0.9], len(boxes)) if tied else rng.uniform(0.001, 1, len(boxes))
        truth.append(true)
        preds.append(pred(boxes, scores) if boxes or rng.random() < 0.5 else None)
    return make_gt(truth), preds


def test_fast_ap50_equals_pycocotools_also_on_resamples():
    rng = np.random.default_rng(7)
    resampled = 0
    for case in range(60):
        gt, preds = random_case(rng, int(rng.integers(1, 30)))
        if case % 5 == 0:  # a weak positive (boxes unknown) is left out by both
            gt.images[0].boxes_known = False
        ref = box_metrics(gt, preds)["map50"]
        assert (AP50(gt, preds)() is None) == (ref is None) and (ref is None or AP50(gt, preds)() == pytest.approx(ref, abs=1e-6)), case
        scores = np.concatenate([p.scores for p in preds if p is not None] + [np.zeros(0)])
        if len(np.unique(scores)) < len(scores):
            continue  # tied scores of two images rank in image order, which a resample reshuffles in pycocotools
        # a resample (images drawn with replacement) scored both ways: pycocotools on the duplicated images
        ids = rng.integers(0, len(gt), len(gt))
        weights = np.bincount(ids, minlength=len(gt)).astype(float)
        order = np.repeat(np.arange(len(gt)), weights.astype(int))
        ref = box_metrics(gt.subset(order.tolist()), [preds[i] for i in order])["map50"]
        got = AP50(gt, preds)(weights)
        assert (got is None) == (ref is None) and (ref is None or got == pytest.approx(ref, abs=1e-6)), case
        resampled += 1
    assert resampled >= 20
    # a box as close to two true boxes goes to the last of them (pycocotools' rule): the next box, which overlaps
    # only that one, is then a false positive
    gt = make_gt([[[0, 0, 10, 10], [2, 0, 12, 10]]])
    two = [pred([[1, 0, 11, 10], [4, 0, 14, 10]], [0.9, 0.8])]
    assert AP50(gt, two)() == pytest.approx(box_metrics(gt, two)["map50"], abs=1e-6) == pytest.approx(51 / 101)  # recall 1/2 at precision 1
    # max_dets: only each image's best-scoring boxes count
    gt = make_gt([[[10, 10, 50, 50]]])
    late = [pred([[60, 60, 70, 70], [61, 61, 71, 71], [10, 10, 50, 50]], [0.9, 0.8, 0.7])]
    assert AP50(gt, late, max_dets=2)() == 0.0 and AP50(gt, late)() == pytest.approx(box_metrics(gt, late)["map50"], abs=1e-6)
    assert box_metrics(gt, late, max_dets=2)["map50"] == 0.0 and AP50(gt, late)() == pytest.approx(1 / 3)


def test_map50_interval_is_a_group_bootstrap_interval():
    rng = np.random.default_rng(3)
    gt, preds = random_case(rng, 60)
    value = box_metrics(gt, preds)["map50"]
    res = map50_interval(gt, preds, n_boot=400, seed=0)
    assert res["ci_method"] == "group bootstrap" and res["ci"][0] < value < res["ci"][1] and res["ci"][1] - res["ci"][0] > 0.05
    assert map50_interval(gt, preds, n_boot=400, seed=0) == res  # seeded
    # one group holding every image: every resample is the whole set, the interval collapses onto the value
    one = make_gt([im.boxes for im in gt.images], groups=["g"] * len(gt))
    one_group = map50_interval(one, preds, n_boot=50, seed=0)
    assert one_group is None  # fewer than 5 groups with a true box: no interval
    groups = [f"g{i % 6}" for i in range(len(gt))]
    weights = group_weights(groups, 30, 0)  # a group is drawn whole: its images share a weight; 6 draws per resample
    assert all(len({w[i] for i in range(len(gt)) if groups[i] == g}) == 1 for w in weights for g in set(groups))
    assert (weights[:, :6].sum(axis=1) == 6).all() and weights.std() > 0
    many = make_gt([im.boxes for im in gt.images], groups=groups)
    assert map50_interval(many, preds, n_boot=0) is None
    report = evaluate_predictions(gt, preds, {"balanced": 0.5}, n_boot=200, seed=0, breakdown=True)
    assert report["box"]["map50_interval"]["ci"][0] < report["box"]["map50"] < report["box"]["map50_interval"]["ci"][1]
    assert f"mAP@0.5 {report['box']['map50']:.3f} [" in format_report(report)


def test_paired_bootstrap_says_when_one_model_beats_another_and_when_not():
    from bone_r.metrics import paired_bootstrap

    truth = [[[10, 10, 50, 50]] if i % 2 == 0 else [] for i in range(20)]
    gt = make_gt(truth, groups=[f"g{i // 2}" for i in range(20)])  # 10 groups of two images: never split
    good = [pred([[10, 10, 50, 50]], [0.9]) if i % 2 == 0 else pred([[60, 60, 70, 70]], [0.1]) for i in range(20)]
    # A finds half of the fractures (the others boxed in the wrong place, scored like the negatives' boxes)
    weak = [pred([[10, 10, 50, 50]] if i % 4 == 0 else [[60, 60, 90, 90]], [0.9 if i % 4 == 0 else 0.5])
            if i % 2 == 0 else pred([[60, 60, 70, 70]], [0.5]) for i in range(20)]
    better = paired_bootstrap(gt, weak, good, n_boot=200, seed=1)
    assert better["n_groups"] == 10 and better["map50"]["b"] == pytest.approx(1.0)
    assert better["map50"]["difference"] > 0.3 and better["map50"]["ci"][0] > 0 and better["map50"]["p_not_better"] == 0
    assert better["image_auc"]["difference"] > 0
    same = paired_bootstrap(gt, good, good, n_boot=50)
    assert same["map50"]["difference"] == 0 and same["map50"]["ci"] == [0, 0] and same["map50"]["p_not_better"] == 1


def test_paired_compare_refuses_predictions_that_miss_images(tmp_path, capsys):
    from scripts import paired_compare

    root = tmp_path / "tree"
    write_tree(root)
    records = tmp_path / "a.json"
    records.write_text("[]")
    assert paired_compare.main(["--data", str(root / "dataset.yaml"), str(records), str(records)]) == 2
    assert "without a prediction" in capsys.readouterr().err
