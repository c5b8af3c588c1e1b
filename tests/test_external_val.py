"""scripts/external_val.py: an unseen folder scored at frozen thresholds through evaluate.py's functions."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

import scripts.external_val as xv
from bone_r.synthetic import make_phantom
from fakes import write_fake_model

WRONG_BOX = [0.0, 0.0, 10.0, 10.0]


@pytest.fixture
def external(tmp_path):
    """ext/images/{a,b,c,d}.png with ext/labels/*.txt: a and b fractured, c and d intact; predictions for them."""
    images, labels = tmp_path / "ext" / "images", tmp_path / "ext" / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    phantoms = {}
    for i, name in enumerate("abcd"):
        ph = make_phantom(256, 200, fractured=name in "ab", seed=40 + i, bits=8)
        cv2.imwrite(str(images / f"{name}.png"), ph.pixels)
        (labels / f"{name}.txt").write_text(ph.yolo_row + "\n" if ph.yolo_row else "")
        phantoms[name] = ph
    dets = {"a": [(list(phantoms["a"].box), 0.8)], "b": [], "c": [(WRONG_BOX, 0.5)], "d": []}
    records = [{"image": str(images / f"{n}.png"), "image_size": [200, 256],
                "detections": [{"xyxy": b, "score": s, "label": "fracture"} for b, s in d]} for n, d in dets.items()]
    results = tmp_path / "results.json"
    results.write_text(json.dumps(records))
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"name": "m", "thresholds": {"balanced": {"threshold": 0.6}, "screening": {"threshold": 0.4}}}))
    return images, results, card


def run(args, capsys):
    rc = xv.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_labelled_folder_at_frozen_thresholds(external, tmp_path, capsys):
    images, results, card = external
    out = tmp_path / "rep" / "ext.json"
    rc, stdout, err = run(["--images", images, "--predictions", results, "--thresholds", card, "--source", "site-x",
                           "--out", out, "--n-boot", 100, "--quiet"], capsys)
    assert rc == 0, err
    r = json.loads(out.read_text())
    b, s = r["image_level"]["balanced"], r["image_level"]["screening"]
    assert (b["tp"], b["fn"], b["fp"], b["tn"]) == (1, 1, 0, 2)  # a found; c's 0.5 stays below 0.6
    assert (s["tp"], s["fn"], s["fp"], s["tn"]) == (1, 1, 1, 1)  # at 0.4, c is a false positive
    assert r["operating_points"]["balanced"]["source"] == "given"
    # one TP ranked first, one FP, one of two true boxes never found: AP = 51 points of 1.0 / 101
    assert r["box"]["map50"] == pytest.approx(51 / 101, abs=1e-5)
    assert list(r["by_source"]) == ["site-x"] and r["external"]["truth"] == "labels"
    assert r["localization"]["balanced"]["found"] == 1
    assert (out.parent / "ext_pr.png").is_file() and "site-x" in stdout


def test_all_positive_folder_is_image_level_only(external, tmp_path, capsys):
    images, results, card = external
    out = tmp_path / "allpos.json"
    rc, _, err = run(["--images", images, "--all-positive", "--predictions", results, "--thresholds", card, "--out", out,
                      "--n-boot", 0, "--no-plots"], capsys)
    assert rc == 0, err
    r = json.loads(out.read_text())
    assert r["n_positive"] == 4 and r["box"]["map50"] is None
    assert r["image_level"]["balanced"]["sensitivity"]["value"] == 0.25  # only a reaches 0.6
    assert r["image_level"]["screening"]["sensitivity"]["value"] == 0.5  # a and c reach 0.4
    assert r["image_level"]["balanced"]["specificity"]["value"] is None  # no negatives: null, not a crash
    assert r["localization"]["balanced"]["n_positive"] == 0


def test_weights_use_the_cards_frozen_thresholds(external, tmp_path, capsys):
    images, _, _ = external
    weights = write_fake_model(tmp_path / "m", [[0.5, 0.5, 0.2, 0.2, 0.5]], thresholds={"balanced": 0.3})  # a box on every image
    out = tmp_path / "w.json"
    rc, _, err = run(["--images", images, "--weights", weights, "--out", out, "--n-boot", 0, "--no-plots", "--quiet"], capsys)
    assert rc == 0, err
    r = json.loads(out.read_text())
    assert r["operating_points"] == {"balanced": {"threshold": 0.3, "source": "model_card"}}
    assert r["image_level"]["balanced"]["sensitivity"]["value"] == 1.0 and r["image_level"]["balanced"]["specificity"]["value"] == 0.0
    # the same weights without thresholds in the card: refused, never chosen on the external data
    card = json.loads((tmp_path / "m" / "fake.json").read_text())
    card.pop("thresholds")
    (tmp_path / "m" / "fake.json").write_text(json.dumps(card))
    rc, _, err = run(["--images", images, "--weights", weights, "--out", out], capsys)
    assert rc == 2 and "no frozen thresholds" in err and err.count("\n") == 1


def test_bad_input(external, tmp_path, capsys):
    images, results, card = external
    rc, _, err = run(["--images", images, "--predictions", results, "--thresholds", card, "--out", images / "r.json"], capsys)
    assert rc == 2 and "input folder" in err
    assert not (images / "r.json").exists()
    bare = tmp_path / "bare"
    bare.mkdir()
    cv2.imwrite(str(bare / "x.png"), make_phantom(64, 64, fractured=False, bits=8).pixels)
    rc, _, err = run(["--images", bare, "--predictions", results, "--thresholds", card, "--out", tmp_path / "r.json"], capsys)
    assert rc == 2 and "--all-positive" in err  # no labels anywhere: say how to state the truth
    rc, _, err = run(["--images", images, "--predictions", results, "--thresholds", card, "--out", tmp_path / "r.json",
                      "--labels", tmp_path / "nolabels"], capsys)
    assert rc == 2
    # a prediction missing for one image is an error unless --allow-missing
    recs = json.loads(results.read_text())[:3]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(recs))
    rc, _, err = run(["--images", images, "--predictions", partial, "--thresholds", card, "--out", tmp_path / "r.json"], capsys)
    assert rc == 2 and "d.png: no prediction" in err
    assert Path(tmp_path / "r.json").exists() is False
