"""scripts/make_site_cases.py: the site's real cases, on a synthetic tree (phantoms) and a fake model.

The tree mimics data/merged: images/test/<source>__<name>.png with labels, splits.csv with the
`original` column, and the "original" radiographs in an originals folder (one folder per source,
at twice the size of the dataset copies, so boxes must be scaled back to the original's pixels).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest

from bone_r.detection import Detection
from bone_r.runs import ROOT
from bone_r.synthetic import make_phantom
from fakes import write_fake_model
from scripts import make_site_cases as msc

SCHEMA = json.loads((ROOT / "docs" / "data" / "cases.schema.json").read_text())
# (source, region, images, every k-th is fractured, copies per group)
LAYOUT = [
    ("fracatlas", "hand", 8, 2, 1),
    ("fracatlas", "leg", 6, 3, 1),
    ("proximal-femur", "hip", 9, 3, 3),  # Roboflow-style: 3 augmented copies of one radiograph share a group
    ("other-set", "wrist", 4, 2, 1),  # no credit line in make_site_cases.CREDITS: never shown
]
# every image gets the same two boxes: 0.6 in the middle, 0.25 near the top-left corner
BOXES = [[0.5, 0.5, 0.3, 0.1, 0.6], [0.15, 0.1, 0.1, 0.05, 0.25]]
THRESHOLDS = {"screening": 0.2, "balanced": 0.5, "specific": 0.9}


def build_tree(root: Path) -> tuple[Path, Path, dict[str, tuple]]:
    """(dataset yaml, originals folder, {dataset path: the phantom's box in original pixels or None})."""
    tree, originals = root / "merged", root / "originals"
    rows, truth = [], {}
    for s, (source, region, n, every, copies) in enumerate(LAYOUT):
        for i in range(n):
            fractured = i % every == 0
            ph = make_phantom(240, 200, fractured=fractured, seed=100 * s + i, bits=8)  # the original: 200x240
            name = f"{region}{i:02d}"
            orig_rel = f"images/{name}.png"
            (originals / source / "images").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(originals / source / orig_rel), ph.pixels)
            key = f"images/test/{source}__{name}.png"
            (tree / "images" / "test").mkdir(parents=True, exist_ok=True)
            (tree / "labels" / "test").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tree / key), cv2.resize(ph.pixels, (100, 120), interpolation=cv2.INTER_AREA))  # the dataset copy
            (tree / "labels" / "test" / f"{source}__{name}.txt").write_text(ph.yolo_row + "\n" if ph.yolo_row else "")
            group = f"{source}:{region}{i // copies:02d}"
            rows.append({"path": key, "split": "test", "source": source, "region": region, "group": group,
                         "label": int(fractured), "sha256": "", "original": orig_rel})
            truth[key] = ph.box
    for split in ("train", "val"):
        (tree / "images" / split).mkdir(parents=True, exist_ok=True)
    (tree / "dataset.yaml").write_text("train: images/train\nval: images/val\ntest: images/test\nnc: 1\nnames:\n  0: fracture\n")
    with (tree / "splits.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return tree / "dataset.yaml", originals, truth


@pytest.fixture()
def tree(tmp_path):
    data, originals, truth = build_tree(tmp_path)
    weights = write_fake_model(tmp_path / "model", BOXES, thresholds=THRESHOLDS)
    return tmp_path, data, originals, truth, weights


def run(tmp, data, originals, weights, out, *extra) -> int:
    return msc.main(["--weights", str(weights), "--backend", "fake", "--data", str(data), "--originals", str(originals),
                     "--out", str(out), *extra])


def test_cases_json_is_valid_seeded_stratified_and_credited(tree, capsys):
    tmp, data, originals, truth, weights = tree
    out = tmp / "site"
    out.mkdir()
    (out / "case-stale-old.jpg").write_bytes(b"old")  # a case of an earlier run: removed
    (out / "predictions.json").write_text("{}")  # other site files: left alone
    assert run(tmp, data, originals, weights, out, "--n", "8", "--max-extra", "3") == 0
    payload = json.loads((out / "cases.json").read_text())
    jsonschema.validate(payload, SCHEMA)
    images = payload["images"]
    assert len(images) == 8 and payload["selection"]["n"] == 8
    # the pool: credited sources only, one image per group (the 9 hip copies are 3 radiographs)
    assert payload["data"]["pool"] == 8 + 6 + 3
    assert {im["source"] for im in images} <= {"fracatlas", "proximal-femur"}
    assert len({im["group"] for im in images}) == len(images)
    # stratified: 6 strata (hand, leg, hip x fractured or not), each drawn at least once before any twice
    strata = {im["stratum"] for im in images}
    assert len(strata) == 6 and payload["data"]["strata"] == 6
    # the fake model flags every image at balanced (0.6 >= 0.5): no miss exists, so 3 extra positives were tried
    assert payload["selection"]["extra_predictions"] == 3 and all(im["picked_as"] == "draw" for im in images)
    assert payload["summary"]["balanced"]["FN"] == 0 and payload["summary"]["balanced"]["FP"] > 0
    # credits: each source's line, CC BY 4.0, and the changes made
    assert set(payload["sources"]) == {im["source"] for im in images}
    assert all(c["licence"] == "CC BY 4.0" and "JPEG" in c["changes"] for c in payload["sources"].values())
    credits = (out / "cases-credits.txt").read_text()
    assert all(im["src"] in credits for im in images) and "CC BY 4.0" in credits
    # files: one JPEG per case, the stale one gone, the rest untouched, bundle.js carries cases.json
    jpgs = sorted(p.name for p in out.glob("case-*.jpg"))
    assert jpgs == sorted(im["src"] for im in images)
    assert (out / "predictions.json").read_text() == "{}"
    bundle = (out / "bundle.js").read_text()
    assert json.loads(bundle.split("window.BONER_SITE_DATA = ", 1)[1].rstrip().rstrip(";"))["files"]["cases.json"] == payload
    assert "8 cases" in capsys.readouterr().out


def test_boxes_truth_and_decisions_are_in_original_pixels(tree):
    tmp, data, originals, truth, weights = tree
    out = tmp / "site"
    assert run(tmp, data, originals, weights, out, "--n", "8") == 0
    payload = json.loads((out / "cases.json").read_text())
    for im in payload["images"]:
        assert (im["width"], im["height"]) == (200, 240)  # the original's size, not the 100x120 dataset copy
        box = truth[im["dataset_path"]]
        assert im["label"] == int(box is not None) and len(im["ground_truth"]) == int(box is not None)
        if box is not None:
            assert np.allclose(im["ground_truth"][0]["xyxy"], box, atol=1.0)
        # the fake model's boxes, in the original's pixels: the 0.6 box centred, the 0.25 box near the corner
        scores = [d["score"] for d in im["detections"]]
        assert scores == [0.6, 0.25]
        assert np.allclose(im["detections"][0]["xyxy"], [70, 108, 130, 132], atol=1.0)
        for mode, t in THRESHOLDS.items():
            dec = im["decisions"][mode]
            shown = [d for d in im["detections"] if d["score"] >= t]
            assert dec["threshold"] == t and dec["boxes"] == len(shown) and dec["flagged"] == bool(shown)
            assert dec["hits"] == sum(d["match"] is not None for d in shown)
            assert dec["outcome"] == ("TP" if shown else "FN") if im["label"] else ("FP" if shown else "TN")
            found = [g["found_score"] is not None and g["found_score"] >= t for g in im["ground_truth"]]
            assert dec["truth_found"] == found


def test_same_seed_same_cases_other_seed_other_draw(tree):
    tmp, data, originals, truth, weights = tree
    outs = [tmp / "a", tmp / "b", tmp / "c"]
    for out, seed in zip(outs, ("0", "0", "7")):
        assert run(tmp, data, originals, weights, out, "--n", "8", "--seed", seed) == 0
    a, b, c = (json.loads((o / "cases.json").read_text()) for o in outs)
    assert a["images"] == b["images"] and a["selection"] == b["selection"]  # all but the time stamp
    assert all((outs[0] / im["src"]).read_bytes() == (outs[1] / im["src"]).read_bytes() for im in a["images"])
    assert [im["dataset_path"] for im in a["images"]] != [im["dataset_path"] for im in c["images"]]


def test_jpegs_fit_the_long_side_and_the_budget(tree):
    tmp, data, originals, truth, weights = tree
    out = tmp / "site"
    assert run(tmp, data, originals, weights, out, "--n", "6", "--max-side", "96") == 0
    payload = json.loads((out / "cases.json").read_text())
    for im in payload["images"]:
        data_ = (out / im["src"]).read_bytes()
        assert data_[:3] == b"\xff\xd8\xff" and len(data_) == im["bytes"]  # a JPEG, as large as recorded
        pixels = cv2.imdecode(np.frombuffer(data_, np.uint8), cv2.IMREAD_UNCHANGED)
        assert pixels.ndim == 2 and max(pixels.shape) <= 96  # grayscale, long side within --max-side
        assert (pixels.shape[1], pixels.shape[0]) == (im["display_width"], im["display_height"])
    # a budget the first quality misses: the quality, then the size, come down until it fits
    total_q85 = payload["images_total_bytes"]
    budget = total_q85 * 0.6
    assert run(tmp, data, originals, weights, out, "--n", "6", "--max-side", "96", "--budget-mb", str(budget / 1e6)) == 0
    small = json.loads((out / "cases.json").read_text())
    assert small["images_total_bytes"] <= budget
    assert small["jpeg"]["quality"] < 85 or small["jpeg"]["max_side"] < 96


def test_a_miss_and_a_false_alarm_are_put_in_when_the_draw_has_none():
    """Rule 3 on hand-made outcomes: the first miss in seeded order replaces the last-drawn image of its stratum."""
    def case(i, source, region, label):
        im = type("GT", (), {})()
        im.source, im.region, im.label, im.key, im.group, im.boxes_known = source, region, label, f"k{i}", f"g{i}", True
        im.boxes, im.width, im.height = np.zeros((label, 4)), 100, 100
        return msc.Case(im, Path(f"/o/{i}"), f"o/{i}", f"{i:04d}")

    pool = [case(i, "s", "r", i % 2) for i in range(20)]  # one stratum per label, in order 0..19
    missed = {13}  # the only positive the model misses; no negative is flagged
    predicted = []

    def predict(c):
        predicted.append(c.gt.key)
        flagged = c.gt.label == 1 and int(c.gt.key[1:]) not in missed
        c.detections = [Detection((1, 1, 5, 5), 0.9 if flagged else 0.1)]

    picks, extra = msc.choose(pool, 6, predict, 0.5, max_extra=10)
    assert [c.gt.key for c in msc.draw(pool, 6)] == ["k0", "k1", "k2", "k3", "k4", "k5"]  # outcome-blind draw
    keys = [c.gt.key for c in picks]
    assert keys == ["k0", "k1", "k2", "k3", "k4", "k13"]  # k13 replaced k5, the last-drawn positive
    assert picks[-1].picked_as == "miss"
    # positives k7, k9, k11, k13 tried for a miss; then every other negative tried for a false alarm, up to the cap
    assert predicted[:10] == ["k0", "k1", "k2", "k3", "k4", "k5", "k7", "k9", "k11", "k13"]
    assert extra == 10 and len(predicted) == 16


@pytest.mark.parametrize("case, message", [("originals", "--originals"), ("data", "dataset yaml"), ("n", "--n")])
def test_bad_input_is_one_line(tree, capsys, case, message):
    tmp, data, originals, truth, weights = tree
    args = {"originals": (data, tmp / "nope", ()), "data": (tmp / "nope.yaml", originals, ()), "n": (data, originals, ("--n", "0"))}[case]
    assert run(tmp, args[0], args[1], weights, tmp / "site", *args[2]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp / "site" / "cases.json").exists()
