"""compare_overlay.py: several models on one image -> a PNG (one colour and legend entry each) and predictions.json."""

from __future__ import annotations

import json

import cv2
import jsonschema
import numpy as np
import pytest

import compare_overlay
from bone_r import site
from bone_r.draw import PALETTE
from bone_r.report import write_report
from bone_r.runs import ROOT
from bone_r.synthetic import encode, make_dicom, make_phantom
from fakes import write_fake_model

ORANGE, BLUE, GREEN = PALETTE[0], PALETTE[1], PALETTE[2]


def count(rgb, color, tol=25):
    return int((np.abs(rgb.astype(int) - np.array(color)).max(axis=2) <= tol).sum())


@pytest.fixture()
def setup(tmp_path):
    ph = make_phantom(300, 240, seed=5)
    h, w = ph.pixels.shape
    x1, y1, x2, y2 = ph.box
    cx, cy, bw, bh = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h
    image = tmp_path / "scan.dcm"
    image.write_bytes(make_dicom(ph.pixels))
    # A finds the fracture (0.8) plus a weak box (0.1, below its 0.3 threshold); B finds a box elsewhere (0.6);
    # C finds nothing.
    a = write_fake_model(tmp_path / "a", [[cx, cy, bw, bh, 0.8], [0.2, 0.9, 0.1, 0.05, 0.1]], thresholds={"balanced": 0.3})
    b = write_fake_model(tmp_path / "b", [[0.5, 0.15, 0.3, 0.1, 0.6]], thresholds={"balanced": 0.5})
    c = write_fake_model(tmp_path / "c", [], thresholds={"balanced": 0.5})
    return tmp_path, ph, image, a, b, c


def test_models_get_their_own_colours_and_the_site_json(setup, capsys):
    tmp, ph, image, a, b, c = setup
    out, site = tmp / "compare.png", tmp / "site"
    rc = compare_overlay.main(["--image", str(image), "--models", f"A={a}:fake", f"B={b}:fake", f"C={c}:fake", "--out", str(out),
                               "--site-dir", str(site)])
    assert rc == 0
    rgb = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    assert rgb.shape[1] == 240 and rgb.shape[0] > 300
    x1, y1, x2, y2 = ph.box
    assert count(rgb[y2 - 1:y2 + 2, x1 + 5:x2 - 5], ORANGE) > 20  # A's box
    assert count(rgb[:300, 120:], BLUE) > 50  # B's box (and label) in blue
    assert count(rgb[300:], GREEN, 10) > 10  # C: no box, but its swatch in the key below the image
    assert count(rgb[255:285, 20:75], ORANGE, 10) == 0  # A's 0.1 box is under A's threshold: not in the PNG

    payload = json.loads((site / "predictions.json").read_text())
    schema = json.loads((ROOT / "docs" / "data" / "predictions.schema.json").read_text())
    jsonschema.validate(payload, schema)
    assert payload["synthetic"] is False
    assert [m["name"] for m in payload["models"]] == ["A", "B", "C"]
    assert [m["color"] for m in payload["models"]] == ["#e69f00", "#56b4e9", "#009e73"]
    assert [m["threshold"] for m in payload["models"]] == [0.3, 0.5, 0.5]
    image_entry = payload["images"][0]
    assert (image_entry["width"], image_entry["height"]) == (240, 300)
    # the site gets every box down to --min-score 0.05, the 0.1 one included, in original pixels
    assert sorted(d["score"] for d in image_entry["detections"]) == [0.1, 0.6, 0.8]
    top = max(image_entry["detections"], key=lambda d: d["score"])
    assert top["model"] == "A" and np.allclose(top["xyxy"], ph.box, atol=1.0)
    assert (site / image_entry["src"]).is_file() and image_entry["src"].startswith("local-")
    bundle = (site / "bundle.js").read_text()
    assert bundle.startswith("//") and "window.BONER_SITE_DATA" in bundle and '"predictions.json"' in bundle
    assert "A 1, B 1, C 0" in capsys.readouterr().out


def test_saved_predictions_and_no_site(setup):
    tmp, ph, _, *_ = setup
    png = tmp / "scan.png"
    png.write_bytes(encode(ph.pixels, ".png"))
    rec_a = {"image": str(png), "image_size": [240, 300], "threshold": 0.3,
             "detections": [{"xyxy": list(ph.box), "score": 0.7, "model": "x"}]}
    rec_b = {"image": "/elsewhere/scan.png", "image_size": [240, 300], "threshold": 0.2,
             "detections": [{"xyxy": [10, 10, 60, 40], "score": 0.4, "model": "y"}]}
    (tmp / "a.json").write_text(json.dumps([rec_a]))
    (tmp / "b.json").write_text(json.dumps(rec_b))
    out, site = tmp / "c.png", tmp / "site"
    rc = compare_overlay.main(["--image", str(png), "--predictions", f"first={tmp / 'a.json'}", f"second={tmp / 'b.json'}",
                               "--out", str(out), "--no-site", "--site-dir", str(site)])
    assert rc == 0 and out.is_file() and not site.exists()
    rgb = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    assert count(rgb[38:42, 15:55], BLUE) > 20  # the second model's box, in the second colour


@pytest.mark.parametrize("argv_tail, message", [
    (["--models", "A={a}:fake", "A={b}:fake"], "unique"),
    ([], "no models"),
    (["--models", "A={a}:fake", "--conf", "1.5"], "--conf"),
    (["--models", "A={tmp}/missing.pt:fake"], "not found"),
])
def test_bad_input_is_one_line(setup, capsys, argv_tail, message):
    tmp, _, image, a, b, _ = setup
    argv = ["--image", str(image), "--out", str(tmp / "o.png"), "--site-dir", str(tmp / "site")]
    argv += [x.format(a=a, b=b, tmp=tmp) for x in argv_tail]
    rc = compare_overlay.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp / "o.png").exists()


def test_writing_site_json_refreshes_the_bundle(tmp_path):
    """write_report into a site data folder keeps bundle.js (the file:// copy) current."""
    import json


    site.write_bundle(tmp_path)
    write_report({"split": "test", "box": {"map50": 0.5}, "_records": []}, tmp_path / "report.json")
    bundle = (tmp_path / "bundle.js").read_text()
    payload = json.loads(bundle.split("window.BONER_SITE_DATA = ", 1)[1].rstrip().rstrip(";"))
    assert payload["files"]["report.json"]["box"]["map50"] == 0.5
    other = tmp_path / "elsewhere"
    write_report({"split": "test"}, other / "report.json")
    assert not (other / "bundle.js").exists()  # only the site's data folder has a bundle


def test_truth_goes_on_the_png_and_into_the_site_json(setup):
    tmp, ph, image, a, *_ = setup
    label = tmp / "scan.txt"
    label.write_text(ph.yolo_row + "\n")
    out, site = tmp / "compare.png", tmp / "site"
    assert compare_overlay.main(["--image", str(image), "--models", f"A={a}:fake", "--truth", str(label), "--out", str(out),
                                 "--site-dir", str(site)]) == 0
    entry = json.loads((site / "predictions.json").read_text())["images"][0]
    assert np.allclose(entry["ground_truth"][0]["xyxy"], ph.box, atol=1.0)
    jsonschema.validate(json.loads((site / "predictions.json").read_text()),
                        json.loads((ROOT / "docs" / "data" / "predictions.schema.json").read_text()))
