"""scripts/write_model_card.py renders MODEL_CARD.md from the JSON card, numbers untouched."""

import json

from scripts import write_model_card


def _card():
    ci = lambda v, lo, hi: {"value": v, "ci": [lo, hi]}  # noqa: E731
    level = {"threshold": 0.25, "sensitivity": ci(0.8, 0.7, 0.9), "specificity": ci(0.9, 0.85, 0.95),
             "ppv": ci(0.6, 0.5, 0.7), "npv": ci(0.95, 0.9, 0.99), "tp": 8, "fp": 5, "tn": 45, "fn": 2}
    part = {"n_images": 60, "n_positive": 10, "box": {"map50": 0.4321, "map50_95": 0.1234}, "image_level": {"balanced": level}}
    return {
        "name": "demo", "backend": "onnx", "architecture": "yolov8n", "classes": ["fracture"], "imgsz": 640,
        "contract": {"clahe_clip": 2.0}, "started_from": "scratch: yolov8n.yaml",
        "training": {"command": "python train.py --epochs 3", "epochs": 3, "wall_time_s": 100.0, "seconds_per_epoch": 33.3},
        "dataset": {"yaml": "data/merged/dataset.yaml", "splits_sha256": "abc123"},
        "box_rule": {"nms_iou": None, "contained": None, "max_boxes": 3}, "box_rule_chosen_on": "val", "tta": "hflip",
        "thresholds": {"screening": {"threshold": 0.05, "target": 0.95, "val_sensitivity": 0.96, "val_specificity": 0.4},
                       "balanced": {"threshold": 0.25}, "specific": {"threshold": 0.6}},
        "metrics": {"split": "test", "n_images": 60, "n_positive": 10, "box": {"map50": 0.4321, "map50_95": 0.1234, "n_gt_boxes": 12},
                    "image_level": {"balanced": level}, "boxes_per_flagged_image": {"balanced": {"median": 1, "p90": 2, "max": 3}},
                    "bootstrap": {"n_boot": 2000, "resampled": "groups"},
                    "by_source": {"fracatlas": part}, "by_region": {"hand": part},
                    "by_fracture_size": {"threshold": 0.25, "iou": 0.3, "area": "largest true box / image area", "by_source": {
                        "fracatlas": [{"n": 4, "area_min": 0.0008, "area_max": 0.003, "flagged": ci(0.5, 0.15, 0.85),
                                       "found": ci(0.25, 0.05, 0.7)}]}}},
    }


def test_renders_the_cards_numbers(tmp_path):
    card = tmp_path / "demo.json"
    card.write_text(json.dumps(_card()))
    out = tmp_path / "MODEL_CARD.md"
    assert write_model_card.main(["--card", str(card), "--out", str(out)]) == 0
    text = out.read_text()
    assert "mAP@0.5 **0.432**" in text and "0.800 [0.700–0.900]" in text and "8/5/45/2" in text
    assert "| screening | 0.0500 | 0.950 | 0.960 | 0.400 |" in text
    assert "| fracatlas | 60 | 10 | 0.432 | 0.123 |" in text and "| hand | 60 |" in text
    assert "| fracatlas | 1 | 0.08–0.30% | 4 | 0.500 [0.150–0.850] | 0.250 [0.050–0.700] |" in text
    assert "not a diagnosis" in text and "What it cannot do" in text
    assert "90th percentile 2, max 3; box rule" in text and "(chosen on val); test-time augmentation: hflip" in text
    assert "mAP@0.5 [95% CI]" not in text  # an older card without mAP intervals: no interval promised


def test_renders_map50_intervals_where_the_card_has_them(tmp_path):
    data = _card()
    interval = {"ci": [0.31, 0.55], "ci_method": "group bootstrap", "n_boot": 2000}
    data["metrics"]["box"]["map50_interval"] = interval
    data["metrics"]["by_source"]["fracatlas"] = dict(data["metrics"]["by_source"]["fracatlas"],
                                                     box={"map50": 0.4321, "map50_95": 0.1234, "map50_interval": interval})
    card = tmp_path / "demo.json"
    card.write_text(json.dumps(data))
    out = tmp_path / "MODEL_CARD.md"
    assert write_model_card.main(["--card", str(card), "--out", str(out)]) == 0
    text = out.read_text()
    assert "mAP@0.5 **0.432 [0.310–0.550]**" in text
    assert "| mAP@0.5 [95% CI] |" in text and "| fracatlas | 60 | 10 | 0.432 [0.310–0.550] | 0.123 |" in text
    assert "| hand | 60 | 10 | 0.432 | 0.123 |" in text  # the region table has none: its header promises none


def test_rejects_what_is_not_a_card(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2]")
    assert write_model_card.main(["--card", str(bad), "--out", str(tmp_path / "o.md")]) == 2
    assert write_model_card.main(["--card", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o.md")]) == 2
    assert "error" in capsys.readouterr().err


def test_candidates_table_from_run_folders(tmp_path, capsys):
    card = tmp_path / "demo.json"
    card.write_text(json.dumps(_card()))
    run = tmp_path / "runs" / "frcnn-a"
    run.mkdir(parents=True)
    (run / "train_log.csv").write_text("epoch,val_mAP50,val_mAP50_95,train_seconds\n1,0.02,0.005,100\n2,0.05,0.015,120\n"
                                       "3,0.04,0.012,200\n")
    (run / "args.json").write_text(json.dumps({"args": {"imgsz": 512, "fraction": 0.25, "val_fraction": 1.0}}))
    (run / "run.json").write_text(json.dumps({"backend": "fasterrcnn", "started_from": "ImageNet EfficientNet-Lite0",
                                              "train_images": 970, "val_images": 842}))
    out = tmp_path / "MODEL_CARD.md"
    assert write_model_card.main(["--card", str(card), "--out", str(out), "--candidates", str(run)]) == 0
    text = out.read_text()
    # best epoch by val mAP@0.5 (epoch 2, not the last), median train seconds per epoch
    assert "| frcnn-a | fasterrcnn | 512 | ImageNet backbone | 970 | 842 | 3 | 2 | 0.050 | 0.015 | 120 |" in text
    (run / "train_log.csv").write_text("epoch,val_mAP50\n")
    assert write_model_card.main(["--card", str(card), "--out", str(out), "--candidates", str(run)]) == 2
    assert "has no epochs" in capsys.readouterr().err


def test_speed_table_from_benchmark_json(tmp_path, capsys):
    card = tmp_path / "demo.json"
    card.write_text(json.dumps(_card()))
    stage = lambda m: {"median": m, "p90": m + 1}  # noqa: E731
    speed = {"commit": "abc", "machine": {"threads": 2, "cpu_count": 2}, "images": {"n": 5, "sizes_wh": [[2000, 2500]]},
             "baseline": {"what": "the .pth"}, "models": [
                 {"name": "onnx", "backend": "onnx:x", "speedup_vs_plain_pytorch": 1.9,
                  "stages_ms": {"decode": stage(30.0), "harmonize": stage(5.0), "model": stage(60.0), "post": stage(0.5),
                                "end_to_end": stage(96.0)}}]}
    (tmp_path / "speed.json").write_text(json.dumps(speed))
    out = tmp_path / "MODEL_CARD.md"
    assert write_model_card.main(["--card", str(card), "--out", str(out), "--speed", str(tmp_path / "speed.json")]) == 0
    text = out.read_text()
    assert "| onnx | onnx:x | 30.0 | 5.0 | 60.0 | 0.5 | 96.0 | 97.0 | 1.9 |" in text and "2 thread(s)" in text
    # a speed file that is not benchmark.py --speed output: one line, exit 2
    (tmp_path / "speed.json").write_text(json.dumps({"models": [{"name": "x"}]}))
    assert write_model_card.main(["--card", str(card), "--out", str(out), "--speed", str(tmp_path / "speed.json")]) == 2
    assert "cannot read --speed" in capsys.readouterr().err
