"""ensemble.py: weighted box fusion on hand-computed cases, classifier fusion, and both scored by evaluate.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

import ensemble
from bone_r.contract import harmonize
from bone_r.detection import Detection
from bone_r.fusion import (
    EnsembleError,
    ScoreLookup,
    classifier_scores,
    fuse_with_classifier,
    fused_score,
    load_classifier_scores,
    run_fusion,
    run_wbf,
    wbf_records,
    weighted_boxes_fusion,
)
from bone_r.image import load_image
from bone_r.synthetic import write_dataset


def det(box, score, model="m", label="fracture"):
    return Detection(tuple(box), score, label, model)


# --------------------------------------------------------------------------- WBF, by hand


def test_wbf_two_models_one_cluster():
    # IoU([0,0,10,10], [1,1,11,11]) = 81 / 119 = 0.68 >= 0.55: one cluster.
    out = weighted_boxes_fusion([[det((0, 0, 10, 10), 0.9)], [det((1, 1, 11, 11), 0.6)]])
    assert len(out) == 1
    # coordinates weighted by score: (0.9 * 0 + 0.6 * 1) / 1.5 = 0.4, (0.9 * 10 + 0.6 * 11) / 1.5 = 10.4
    assert out[0].xyxy == pytest.approx((0.4, 0.4, 10.4, 10.4))
    assert out[0].score == pytest.approx((0.9 + 0.6) / 2)
    assert out[0].model == "wbf"


def test_wbf_box_seen_by_one_of_two_models_keeps_half_its_score():
    out = weighted_boxes_fusion([[det((0, 0, 10, 10), 0.8)], []])
    assert len(out) == 1 and out[0].score == pytest.approx(0.4)
    assert out[0].xyxy == (0, 0, 10, 10)


def test_wbf_model_weights():
    # weights 2 and 1: score (2 * 0.9 + 1 * 0.6) / 3 = 0.8; coords weighted by 1.8 and 0.6 -> a quarter of the way to B
    out = weighted_boxes_fusion([[det((0, 0, 10, 10), 0.9)], [det((1, 1, 11, 11), 0.6)]], weights=[2, 1])
    assert out[0].score == pytest.approx(0.8)
    assert out[0].xyxy == pytest.approx((0.25, 0.25, 10.25, 10.25))
    # the same box found by the weight-2 model alone: 0.9 * 2/3
    alone = weighted_boxes_fusion([[det((0, 0, 10, 10), 0.9)], []], weights=[2, 1])
    assert alone[0].score == pytest.approx(0.6)


def test_wbf_separate_boxes_stay_separate():
    out = weighted_boxes_fusion([[det((0, 0, 10, 10), 0.9)], [det((50, 50, 60, 60), 0.6)]])
    assert [round(d.score, 6) for d in out] == [0.45, 0.3]
    assert out[0].xyxy == (0, 0, 10, 10) and out[1].xyxy == (50, 50, 60, 60)


def test_wbf_matches_against_the_fused_box_not_the_first():
    # A and B fuse to [1, 0, 11, 10]. C = [4, 0, 14, 10] overlaps A by 60/140 = 0.43 only,
    # but the fused box by 70/130 = 0.54 >= 0.5: it joins the cluster.
    models = [[det((0, 0, 10, 10), 0.9)], [det((2, 0, 12, 10), 0.9)], [det((4, 0, 14, 10), 0.5)]]
    out = weighted_boxes_fusion(models, iou_thr=0.5)
    assert len(out) == 1
    assert out[0].xyxy == pytest.approx((3.8 / 2.3, 0, 26.8 / 2.3, 10))
    assert out[0].score == pytest.approx((0.9 + 0.9 + 0.5) / 3)
    # at 0.55 C starts its own cluster: 0.5 / 3 models
    apart = weighted_boxes_fusion(models, iou_thr=0.55)
    assert len(apart) == 2 and apart[1].score == pytest.approx(0.5 / 3)


def test_wbf_iou_equal_to_threshold_joins():
    # IoU([0,0,10,10], [0,0,10,5]) = 50 / 100 = 0.5 exactly
    assert len(weighted_boxes_fusion([[det((0, 0, 10, 10), 0.9)], [det((0, 0, 10, 5), 0.8)]], iou_thr=0.5)) == 1
    assert len(weighted_boxes_fusion([[det((0, 0, 10, 10), 0.9)], [det((0, 0, 10, 5), 0.8)]], iou_thr=0.51)) == 2


def test_wbf_duplicates_of_one_model_count_once_towards_the_model_share():
    # one model, two overlapping boxes, the other model silent: mean 0.8, share 1/2
    out = weighted_boxes_fusion([[det((0, 0, 10, 10), 0.9), det((0, 0, 10, 11), 0.7)], []])
    assert len(out) == 1 and out[0].score == pytest.approx(0.4)


def test_wbf_skip_threshold_labels_and_empty():
    assert weighted_boxes_fusion([[], []]) == []
    out = weighted_boxes_fusion([[det((0, 0, 10, 10), 0.05)], [det((0, 0, 10, 10), 0.9)]], skip_box_thr=0.1)
    assert len(out) == 1 and out[0].score == pytest.approx(0.45)
    labelled = weighted_boxes_fusion([[det((0, 0, 10, 10), 0.9, label="a")], [det((0, 0, 10, 10), 0.9, label="b")]])
    assert sorted(d.label for d in labelled) == ["a", "b"]


def test_wbf_scores_stay_in_range_and_boxes_valid():
    rng = np.random.default_rng(0)
    models = []
    for _ in range(3):
        dets = []
        for _ in range(20):
            x, y = rng.uniform(0, 90, 2)
            dets.append(det((x, y, x + rng.uniform(1, 10), y + rng.uniform(1, 10)), rng.uniform(0, 1)))
        models.append(dets)
    out = weighted_boxes_fusion(models, weights=[1, 2, 3], iou_thr=0.3)
    assert out and all(0 <= d.score <= 1 and d.xyxy[2] >= d.xyxy[0] for d in out)
    assert len(out) <= 60


def _wbf_by_the_definition(per_model, weights, iou_thr):
    """The fusion written the plain way (box by box, cluster by cluster): the oracle for the vectorized one."""
    def iou(a, b):
        inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    boxes = sorted(((d.score * weights[m], m, d) for m, ds in enumerate(per_model) for d in ds), key=lambda b: -b[0])
    clusters = []  # [label, members, fused box]
    for ws, m, d in boxes:
        ious = [iou(c[2], d.xyxy) if c[0] == d.label else -1.0 for c in clusters]
        if not ious or max(ious) < iou_thr:
            clusters.append([d.label, [(ws, m, d)], d.xyxy])
            continue
        c = clusters[ious.index(max(ious))]
        c[1].append((ws, m, d))
        c[2] = tuple(sum(w * b.xyxy[i] for w, _, b in c[1]) / sum(w for w, _, _ in c[1]) for i in range(4))
    out = []
    for label, members, box in clusters:
        share = sum(weights[m] for m in {m for _, m, _ in members}) / sum(weights)
        out.append((label, sum(w for w, _, _ in members) / sum(weights[m] for _, m, _ in members) * share, box))
    return sorted(out, key=lambda o: -o[1])


def test_wbf_equals_the_plain_definition_on_crowded_images():
    # up to 3 models x 60 boxes of two labels: each box must join the best-overlapping cluster of its label
    rng = np.random.default_rng(3)
    for trial in range(40):
        n_models = int(rng.integers(1, 4))
        weights = [float(w) for w in rng.uniform(0.5, 2.0, n_models)]
        per_model = []
        for _ in range(n_models):
            xy = rng.uniform(0, 200, (int(rng.integers(0, 60)), 2))
            per_model.append([det((x, y, x + rng.uniform(5, 60), y + rng.uniform(5, 60)), float(rng.uniform(0.01, 1)),
                                  label=str(rng.choice(["a", "b"]))) for x, y in xy])
        iou_thr = float(rng.choice([0.0, 0.3, 0.55, 0.8]))
        got = weighted_boxes_fusion(per_model, weights, iou_thr)
        want = _wbf_by_the_definition(per_model, weights, iou_thr)
        assert len(got) == len(want), trial
        for g, (label, score, box) in zip(got, want):
            assert g.label == label and g.score == pytest.approx(score, abs=1e-9)
            assert g.xyxy == pytest.approx(box, abs=1e-6)


def test_wbf_bad_arguments():
    with pytest.raises(ValueError, match="weights"):
        weighted_boxes_fusion([[], []], weights=[1])
    with pytest.raises(ValueError, match="positive"):
        weighted_boxes_fusion([[], []], weights=[1, 0])


# --------------------------------------------------------------------------- classifier fusion


def test_fused_score_formula():
    assert fused_score(0.8, 0.2, 0.5) == pytest.approx(0.8 * (0.5 + 0.5 * 0.2))
    assert fused_score(0.8, 0.2, 1.0) == pytest.approx(0.8)  # alpha 1: the detector alone
    assert fused_score(0.8, 0.2, 0.0) == pytest.approx(0.16)  # alpha 0: times p_abnormal
    with pytest.raises(ValueError):
        fused_score(0.8, 0.2, 1.5)
    with pytest.raises(ValueError):
        fused_score(0.8, -0.1, 0.5)


def test_fuse_with_classifier_keeps_boxes_and_reorders():
    dets = [det((0, 0, 5, 5), 0.9), det((10, 10, 20, 20), 0.5)]
    out = fuse_with_classifier(dets, 0.5, 0.25, "fused")
    assert [d.xyxy for d in out] == [(0, 0, 5, 5), (10, 10, 20, 20)]
    assert [d.score for d in out] == pytest.approx([0.9 * 0.625, 0.5 * 0.625])
    assert {d.model for d in out} == {"fused"}


# --------------------------------------------------------------------------- scored by evaluate.py


@pytest.fixture()
def dataset(tmp_path):
    """24 phantoms: 8 per split, images with an even index fractured (4 positives per split)."""
    root = tmp_path / "ds"
    phantoms = write_dataset(root, n=24)
    (root / "dataset.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val",
                                                      "test": "images/test", "names": {0: "fracture"}}))
    items = []
    for i, ph in enumerate(phantoms):
        split = ["train", "val", "test"][i % 3]
        if split != "train":
            items.append((root / "images" / split / f"ph{i:03d}.png", ph, i))
    return root / "dataset.yaml", items


def record(path: Path, ph, dets):
    h, w = ph.pixels.shape
    return {"image": str(path), "image_size": [w, h], "detections": [d.to_dict() for d in dets]}


def detector_a(items):
    """True boxes at 0.6 on positives; a false positive at 0.7 on every other negative."""
    out = []
    for path, ph, i in items:
        dets = [det(ph.box, 0.6, "a")] if ph.box else ([det((5, 5, 40, 30), 0.7, "a")] if i % 4 == 1 else [])
        out.append(record(path, ph, dets))
    return out


def detector_b(items):
    """The true box shifted 2 px right at 0.6 on positives; a false positive elsewhere at 0.7 on the other negatives."""
    out = []
    for path, ph, i in items:
        if ph.box:
            x1, y1, x2, y2 = ph.box
            dets = [det((x1 + 2, y1, x2 + 2, y2), 0.6, "b")]
        else:
            dets = [det((120, 200, 170, 240), 0.7, "b")] if i % 4 == 3 else []
        out.append(record(path, ph, dets))
    return out


def test_wbf_scored_by_evaluate_beats_each_detector(dataset):
    data, items = dataset
    payload, fused = run_wbf([("a", detector_a(items)), ("b", detector_b(items))], data, n_boot=50)
    rows = {r["name"]: r for r in payload["rows"]}
    assert set(rows) == {"a", "b", "wbf(a+b)"}
    assert len(fused) == len(items)
    # each false positive is seen by one model only -> half its score (0.35) < the agreed true boxes (0.6)
    assert rows["wbf(a+b)"]["roc_auc"] == pytest.approx(1.0)
    assert rows["wbf(a+b)"]["map50"] == pytest.approx(1.0)
    for single in ("a", "b"):
        assert rows[single]["map50"] < 1.0 and rows[single]["roc_auc"] < 1.0
    assert rows["wbf(a+b)"]["balanced"]["sensitivity"]["value"] == 1.0
    assert rows["wbf(a+b)"]["balanced"]["specificity"]["value"] == 1.0


def test_fusion_scored_by_evaluate(dataset):
    data, items = dataset
    det_records = detector_a(items)
    p = {str(path): (0.9 if ph.box else 0.1) for path, ph, _ in items}
    payload, fused = run_fusion("a", det_records, ScoreLookup(p), data, alphas=[0, 0.25, 0.5, 0.75, 1],
                                         n_boot=50)
    rows = payload["rows"]
    single = rows[0]
    by_alpha = {r["alpha"]: r for r in rows[1:]}
    # alpha 1 is the detector alone, number for number
    for key in ("map50", "map50_95", "roc_auc"):
        assert by_alpha[1.0][key] == single[key]
    # an informative classifier pushes the false positives (p 0.1) below the true boxes (p 0.9)
    assert by_alpha[0.0]["map50"] == pytest.approx(1.0) and single["map50"] < 1.0
    # val mAP@0.5 is 1.0 for alpha 0 .. 0.75 (false positive 0.7 x 0.775 < 0.6 x 0.975): the largest is chosen
    assert payload["settings"]["alpha_chosen"] == 0.75
    assert [r["alpha"] for r in rows[1:] if r["chosen_on_val"]] == [0.75]
    assert by_alpha[1.0]["val_map50"] < 1.0


def test_classifier_scores_see_the_harmonized_image(dataset):
    _, items = dataset
    records = [{"image": str(path), "detections": []} for path, _, _ in items[:3]]
    seen = []

    def classifier(rgb):
        seen.append(rgb.shape)
        return float(rgb.mean() / 255.0)

    scores = classifier_scores(records, classifier, progress=False)
    for path, _, _ in items[:3]:
        rgb = harmonize(load_image(path).pixels)
        assert scores[str(path)] == pytest.approx(rgb.mean() / 255.0)
    assert all(s[2] == 3 for s in seen)
    with pytest.raises(EnsembleError, match="outside"):
        classifier_scores(records, lambda rgb: 1.5, progress=False)


def test_wbf_records_missing_image(dataset):
    _, items = dataset
    a, b = detector_a(items), detector_b(items)[1:]
    with pytest.raises(EnsembleError, match="no prediction"):
        wbf_records([a, b])
    fused, problems = wbf_records([a, b], allow_missing=True)
    assert len(fused) == len(a) and len(problems) == 1


def test_classifier_scores_file_formats(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"a/x.png": 0.2}))
    assert load_classifier_scores(f) == {"a/x.png": 0.2}
    f.write_text(json.dumps({"scores": [{"image": "x.png", "p_abnormal": 0.7}]}))
    assert ScoreLookup(load_classifier_scores(f))({"image": "/elsewhere/x.png"}) == 0.7
    f.write_text(json.dumps({"x.png": 1.7}))
    with pytest.raises(EnsembleError, match="outside"):
        load_classifier_scores(f)


# --------------------------------------------------------------------------- the command line


def write(path: Path, payload) -> Path:
    path.write_text(json.dumps(payload))
    return path


def test_cli_wbf(dataset, tmp_path, capsys):
    data, items = dataset
    a = write(tmp_path / "a.json", detector_a(items))
    b = write(tmp_path / "b.json", detector_b(items))
    out, fused = tmp_path / "wbf.json", tmp_path / "fused.json"
    rc = ensemble.main(["wbf", "--predictions", f"a={a}", f"b={b}", "--data", str(data), "--n-boot", "20", "--out", str(out),
                        "--fused-out", str(fused)])
    assert rc == 0
    payload = json.loads(out.read_text())
    assert [r["name"] for r in payload["rows"]] == ["a", "b", "wbf(a+b)"]
    assert len(json.loads(fused.read_text())) == len(items)
    assert "wbf(a+b)" in capsys.readouterr().out
    # a model's predictions saved in two files (val and test apart, say) are one model: the same fusion
    records = json.loads(a.read_text())
    a1, a2 = write(tmp_path / "a1.json", records[::2]), write(tmp_path / "a2.json", records[1::2])
    fused2 = tmp_path / "fused2.json"
    assert ensemble.main(["wbf", "--predictions", f"a={a1},{a2}", f"b={b}", "--fused-out", str(fused2)]) == 0
    assert sorted(json.loads(fused2.read_text()), key=lambda r: r["image"]) == sorted(json.loads(fused.read_text()),
                                                                                      key=lambda r: r["image"])


def write_classifier(path: Path, p_abnormal: float, imgsz: int = 32) -> Path:
    """A real checkpoint in train_mura_cls's format (untrained EfficientNet-Lite0) whose head answers `p_abnormal`
    on every image: weights 0, bias its logit. A loader that drops the saved weights answers something else."""
    import torch

    from bone_r.runs import save_checkpoint
    from models.classifier import CHECKPOINT_FORMAT, build_classifier

    torch.manual_seed(0)
    net = build_classifier(pretrained=False)
    with torch.no_grad():
        net._fc.weight.zero_()
        net._fc.bias.fill_(math.log(p_abnormal / (1 - p_abnormal)))
    config = {"arch": "efficientnet-lite0", "imgsz": imgsz, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
              "contract": None, "classes": ["normal", "abnormal"]}
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "model": net.state_dict(), "config": config, "epoch": 1})
    return path


def test_cli_fuse_with_a_classifier_checkpoint(dataset, tmp_path, torch_threads):
    """The real loading path: --classifier -> models.classifier.load_classifier -> the saved weights score every image."""
    data, items = dataset
    ckpt = write_classifier(tmp_path / "cls.pth", 0.25)
    det_file = write(tmp_path / "det.json", detector_a(items))
    saved, out, fused = tmp_path / "scores.json", tmp_path / "fuse.json", tmp_path / "fused.json"
    rc = ensemble.main(["fuse", "--detector-predictions", f"a={det_file}", "--classifier", str(ckpt), "--alpha", "0.5", "--data",
                        str(data), "--n-boot", "0", "--out", str(out), "--save-classifier-scores", str(saved),
                        "--fused-out", str(fused)])
    assert rc == 0
    scores = json.loads(saved.read_text())
    assert sorted(scores) == sorted(str(path) for path, _, _ in items)
    assert list(scores.values()) == pytest.approx([0.25] * len(items), abs=1e-6)
    rows = json.loads(out.read_text())["rows"]
    assert rows[1]["alpha"] == 0.5 and rows[1]["chosen_on_val"] is True
    # each detector score times alpha + (1 - alpha) * p_abnormal = 0.5 + 0.5 * 0.25
    before = [d["score"] for r in detector_a(items) for d in r["detections"]]
    after = [d["score"] for r in json.loads(fused.read_text()) for d in r["detections"]]
    assert before and after == pytest.approx([0.625 * x for x in before], abs=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["wbf", "--predictions", "a=missing.json", "b=missing2.json", "--fused-out", "x.json"], "not found"),
    (["wbf", "--predictions", "a=x.json"], "nothing to do"),
    (["fuse", "--detector-predictions", "d.json", "--classifier-scores", "c.json", "--alpha", "2", "--fused-out", "x.json"], None),
])
def test_cli_bad_input_is_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "fuse":
        write(tmp_path / "d.json", [{"image": "x.png", "image_size": [10, 10], "detections": [{"xyxy": [1, 1, 5, 5], "score": 0.5}]}])
        write(tmp_path / "c.json", {"x.png": 0.5})
    rc = ensemble.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert message is None or message in err
    if argv[0] == "fuse":
        assert "alpha" in err


def test_cli_simulate_on_made_up_cases(tmp_path):
    out = tmp_path / "sim.json"
    rc = ensemble.main(["simulate", "--n-val", "60", "--n-test", "80", "--classifier-auc", "0.9", "--alpha", "0", "1", "--n-boot", "0",
                        "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["kind"] for r in rows] == ["single", "single", "wbf", "fusion", "fusion"]
    detector, alpha1 = rows[0], rows[4]
    assert alpha1["alpha"] == 1.0 and alpha1["map50"] == detector["map50"] and alpha1["roc_auc"] == detector["roc_auc"]
    assert sum(r.get("chosen_on_val", False) for r in rows) == 1
    assert 0.75 < rows[3]["classifier_auc_test"] <= 1.0


def test_cli_fuse_with_a_file_that_is_no_classifier_is_one_line(dataset, tmp_path, capsys):
    data, items = dataset
    bogus = tmp_path / "cls.pth"
    bogus.write_bytes(b"not a checkpoint")
    det_file = write(tmp_path / "det.json", detector_a(items))
    rc = ensemble.main(["fuse", "--detector-predictions", f"a={det_file}", "--classifier", str(bogus), "--data", str(data)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: classifier: ") and "Traceback" not in err
