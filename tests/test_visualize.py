"""visualize.py and draw_overlay: boxes, scores, hints, legend, band; PNG/JPEG/DICOM in."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

import visualize
from bone_r.detection import Detection, Prediction, guess_type_and_severity
from bone_r.draw import PALETTE, draw_overlay, overlay_for, render
from bone_r.image import load_image
from bone_r.synthetic import encode, make_dicom, make_phantom, to_8bit, truncated_jpeg
from fakes import write_fake_model

ORANGE, BLUE, GREEN = PALETTE[0], PALETTE[1], PALETTE[2]


def count(rgb: np.ndarray, color, tol: int = 10) -> int:
    return int((np.abs(rgb.astype(int) - np.array(color)).max(axis=2) <= tol).sum())


def read_rgb(path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture()
def phantom():
    return make_phantom(300, 240, seed=4)


def yolo_box(ph):
    h, w = ph.pixels.shape
    x1, y1, x2, y2 = ph.box
    return [(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]


# --------------------------------------------------------------------------- the drawing code


def test_draw_overlay_boxes_legend_band():
    gray = np.full((300, 400, 3), 60, np.uint8)
    dets = [Detection((200, 150, 300, 200), 0.9, "fracture", "a"), Detection((50, 220, 120, 260), 0.4, "fracture", "b")]
    out = draw_overlay(gray, dets, legend=["a", "b", "c"])
    assert out.shape[1] == 400 and out.shape[0] > 300  # band added below
    assert out[300:].mean() < 80  # the band is dark...
    assert (out[300:] > 200).any()  # ...with white text
    # box edges in each model's colour, in order of the legend
    assert count(out[150:152, 210:290], ORANGE) > 100
    assert count(out[258:262, 60:110], BLUE) > 50
    # "c" has no box here but a key entry: its swatch, below the image (the key never covers the radiograph)
    assert count(out[300:], GREEN) > 20 and count(out[:300], GREEN) == 0
    assert count(draw_overlay(gray, dets)[300:], GREEN) == 0


def test_draw_overlay_labels_do_not_cover_each_other():
    gray = np.full((300, 400, 3), 60, np.uint8)
    same = (150, 140, 250, 160)
    dets = [Detection(same, 0.9, "fracture", "a"), Detection(same, 0.8, "fracture", "b")]
    out = draw_overlay(gray, dets, show_hints=False)
    # both labels' text is visible (orange and blue text pixels outside the box lines)
    outside = np.ones(out.shape[:2], bool)
    outside[136:165, 146:255] = False
    outside[300:] = False
    for color in (ORANGE, BLUE):
        mask = (np.abs(out.astype(int) - np.array(color)).max(axis=2) <= 10) & outside
        assert mask[:, 60:].sum() > 15, color  # not counting the legend at the left


def test_hints_line_is_written_and_can_be_left_out():
    gray = np.full((300, 400, 3), 60, np.uint8)
    det = Detection((150, 140, 250, 160), 0.9, "fracture", "a")
    det.hints = guess_type_and_severity(det, (400, 300))
    with_hints = draw_overlay(gray, [det])
    without = draw_overlay(gray, [det], show_hints=False)
    assert count(with_hints, ORANGE) > count(without, ORANGE) + 50


def test_narrow_image_band_still_says_not_a_diagnosis():
    out = draw_overlay(np.zeros((200, 60, 3), np.uint8), [])
    assert out.shape[1] == 60 and (out[200:] > 200).any()


def test_visualize_render_is_the_service_overlay(phantom):
    loaded = load_image(encode(phantom.pixels, ".png"))
    det = Detection(phantom.box, 0.8, "fracture", "m")
    pred = Prediction("x", 240, 300, "balanced", 0.5, "conf", [det], {})
    assert np.array_equal(render(loaded, [det]), overlay_for(pred, loaded))


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("fmt", ["png16", "jpeg", "dicom"])
def test_cli_predicts_and_draws_each_format(tmp_path, phantom, fmt, capsys):
    weights = write_fake_model(tmp_path / "m", [[*yolo_box(phantom), 0.8]])
    image = tmp_path / {"png16": "x.png", "jpeg": "x.jpg", "dicom": "x.dcm"}[fmt]
    if fmt == "png16":
        image.write_bytes(encode(phantom.pixels, ".png"))
    elif fmt == "jpeg":
        image.write_bytes(encode(to_8bit(phantom.pixels), ".jpg"))
    else:
        image.write_bytes(make_dicom(phantom.pixels))
    out = tmp_path / "out" / "overlay.png"
    assert visualize.main(["--image", str(image), "--weights", str(weights), "--out", str(out)]) == 0
    rgb = read_rgb(out)
    assert rgb.shape[:2][1] == 240 and rgb.shape[0] > 300
    x1, y1, x2, y2 = phantom.box
    assert count(rgb[y2 - 1:y2 + 2, x1 + 5:x2 - 5], ORANGE, 25) > 20  # the box's bottom edge
    assert "1 box(es) drawn" in capsys.readouterr().out


def test_cli_saved_predictions_use_the_record_threshold_and_conf(tmp_path, phantom):
    image = tmp_path / "x.png"
    image.write_bytes(encode(phantom.pixels, ".png"))
    record = {"image": str(image), "image_size": [240, 300], "threshold": 0.25,
              "detections": [{"xyxy": list(phantom.box), "score": 0.9, "model": "m"},
                             {"xyxy": [10, 250, 60, 280], "score": 0.05, "model": "m"}]}
    preds = tmp_path / "results.json"
    preds.write_text(json.dumps([record]))
    out = tmp_path / "o.jpg"
    assert visualize.main(["--image", str(image), "--predictions", str(preds), "--out", str(out), "--no-hints"]) == 0
    low_box = read_rgb(out)[278:282, 15:55]
    assert count(low_box, ORANGE, 40) < 5  # 0.05 < the record's threshold: not drawn
    assert visualize.main(["--image", str(image), "--predictions", str(preds), "--out", str(out), "--conf", "0.01"]) == 0
    assert count(read_rgb(out)[278:282, 15:55], ORANGE, 40) > 10


def test_cli_folder_mode_counts_failures(tmp_path, phantom, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "a.png").write_bytes(encode(phantom.pixels, ".png"))
    (scans / "b.jpg").write_bytes(truncated_jpeg(phantom.pixels))  # repaired by load_image
    (scans / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # corrupt
    weights = write_fake_model(tmp_path / "m", [[*yolo_box(phantom), 0.8]])
    out = tmp_path / "overlays"
    rc = visualize.main(["--image", str(scans), "--weights", str(weights), "--out", str(out), "--format", "jpg"])
    assert rc == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg", "b.jpg"]
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "c.png" in err[0]
    assert sorted(p.name for p in scans.iterdir()) == ["a.png", "b.jpg", "c.png"]  # inputs untouched


@pytest.mark.parametrize("case", ["missing", "suffix", "inside", "overwrite", "size", "no-record", "conf"])
def test_cli_bad_input_is_one_line(tmp_path, phantom, capsys, case):
    image = tmp_path / "x.png"
    image.write_bytes(encode(phantom.pixels, ".png"))
    preds = tmp_path / "r.json"
    preds.write_text(json.dumps([{"image": str(image), "image_size": [240, 300], "detections": []}]))
    argv = {
        "missing": ["--image", str(tmp_path / "nope.png"), "--predictions", str(preds), "--out", str(tmp_path / "o.png")],
        "suffix": ["--image", str(image), "--predictions", str(preds), "--out", str(tmp_path / "o.gif")],
        "inside": ["--image", str(tmp_path), "--predictions", str(preds), "--out", str(tmp_path / "sub")],
        "overwrite": ["--image", str(image), "--predictions", str(preds), "--out", str(image)],
        "size": None,
        "no-record": ["--image", str(image), "--predictions", str(tmp_path / "r2.json"), "--out", str(tmp_path / "o.png")],
        "conf": ["--image", str(image), "--predictions", str(preds), "--out", str(tmp_path / "o.png"), "--conf", "2"],
    }[case]
    if case == "size":
        preds.write_text(json.dumps([{"image": str(image), "image_size": [100, 100], "detections": []}]))
        argv = ["--image", str(image), "--predictions", str(preds), "--out", str(tmp_path / "o.png")]
    if case == "no-record":
        (tmp_path / "r2.json").write_text(json.dumps([{"image": "other.png", "detections": []}]))
    before = image.read_bytes()
    rc = visualize.main(argv)
    err = capsys.readouterr().err
    assert rc in (1, 2) and err.startswith("error: ") and err.count("\n") == 1, err
    assert image.read_bytes() == before


def test_cli_draws_the_ground_truth_dashed(tmp_path, phantom):
    image = tmp_path / "x.png"
    image.write_bytes(encode(phantom.pixels, ".png"))
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "x.txt").write_text(phantom.yolo_row + "\n")
    preds = tmp_path / "r.json"
    preds.write_text(json.dumps([{"image": str(image), "image_size": [240, 300], "threshold": 0.5, "detections": []}]))
    x1, y1, x2, y2 = phantom.box

    def top_edge(argv):
        out = tmp_path / "o.png"
        assert visualize.main(["--image", str(image), "--predictions", str(preds), "--out", str(out), *argv]) == 0
        rgb = read_rgb(out)
        return rgb, (rgb[y1, x1 + 2:x2 - 2] >= 250).all(axis=1)

    rgb, white = top_edge(["--truth", str(labels)])  # a folder of <stem>.txt
    assert white.sum() >= 6 and np.count_nonzero(np.diff(white.astype(int))) >= 2  # white dashes with gaps between
    assert top_edge(["--truth", str(labels / "x.txt")])[1].sum() == white.sum()  # or the label file itself
    plain, none = top_edge([])
    assert none.sum() <= 2 and white.sum() >= none.sum() + 6  # (the phantom's cortex has a near-white pixel or two)
    assert (rgb[300:] >= 250).all(axis=2).sum() > (plain[300:] >= 250).all(axis=2).sum() + 50  # "ground truth (dashed)" in the key
    # an image without a label file in the folder: no fracture marked (the key says so), not an error
    (labels / "x.txt").unlink()
    assert top_edge(["--truth", str(labels)])[1].sum() == none.sum()
    assert visualize.main(["--image", str(image), "--predictions", str(preds), "--out", str(tmp_path / "o.png"),
                           "--truth", str(tmp_path / "missing.txt")]) == 2
