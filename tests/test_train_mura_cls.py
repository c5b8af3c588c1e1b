"""train_mura_cls.py: a tolerant manifest reader and a classifier that learns fractured vs intact phantoms.

MURA itself is not available here: the manifests follow scripts/mura_to_yolo.py's columns
(image, source, region, regions, group, label, boxes, weak, original, note, patient, study, subset)
and point at synthetic phantoms in MURA's layout.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from bone_r.runs import read_train_log
from bone_r.synthetic import make_phantom

FIELDS = ["image", "source", "region", "regions", "group", "label", "boxes", "weak", "original", "note", "patient", "study", "subset"]


def mura_manifest(root: Path, n: int = 64, valid_share: float = 0.2, size: tuple[int, int] = (160, 128)) -> Path:
    """`n` phantoms, two views per study, alternating abnormal (fractured) and normal studies; the last
    `valid_share` of the patients in MURA's `valid` subset. Returns the manifest path."""
    rows = []
    for i in range(n):
        patient, abnormal = f"patient{i // 2:05d}", (i // 2) % 2 == 0
        subset = "valid" if i >= n * (1 - valid_share) else "train"
        rel = Path(subset) / "XR_WRIST" / patient / f"study1_{'positive' if abnormal else 'negative'}" / f"image{i % 2 + 1}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / rel), make_phantom(*size, fractured=abnormal, seed=1000 + i, bits=16).pixels)
        rows.append({"image": rel.as_posix(), "source": "mura", "region": "wrist", "regions": "wrist", "group": patient,
                     "label": int(abnormal), "boxes": 0, "weak": 0, "original": rel.as_posix(), "note": "study-level label",
                     "patient": patient, "study": "study1", "subset": subset})
    path = root / "manifest.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_manifest_reader_follows_mura_to_yolo_columns(tmp_path):
    from train_mura_cls import read_manifest

    manifest = mura_manifest(tmp_path, n=40)
    samples, notes = read_manifest(manifest, val_fraction=0.25, seed=0)
    assert len(samples) == 40
    assert {s.split for s in samples} == {"train", "val", "test"}  # MURA's `valid` is our test
    assert all(s.split == "test" for s in samples if "valid/" in s.path.as_posix())
    assert any("no val split" in n for n in notes)
    train_groups = {s.group for s in samples if s.split == "train"}
    val_groups = {s.group for s in samples if s.split == "val"}
    assert train_groups and val_groups and not train_groups & val_groups  # patients never cross
    assert samples[0].study == "patient00000/wrist/study1" and samples[0].label == 1
    again, _ = read_manifest(manifest, val_fraction=0.25, seed=0)
    assert [s.split for s in again] == [s.split for s in samples]  # hashed: the same split every time


def test_manifest_reader_is_tolerant_and_strict_where_it_matters(tmp_path):
    from bone_r.runs import TrainError
    from train_mura_cls import read_manifest

    img = tmp_path / "a.png"
    cv2.imwrite(str(img), make_phantom(64, 64, bits=8).pixels)
    path = tmp_path / "m.csv"
    path.write_text("Path,Label,Patient,Split\na.png,Abnormal,p1,train\na.png,normal,p2,val\n")
    samples, _ = read_manifest(path)
    assert [(s.label, s.group, s.split) for s in samples] == [(1, "p1", "train"), (0, "p2", "val")]
    path.write_text("image,label\na.png,maybe\n")
    with pytest.raises(TrainError, match="neither positive nor negative"):
        read_manifest(path)
    path.write_text("image,label\nmissing.png,1\n")
    with pytest.raises(TrainError, match="do not exist"):
        read_manifest(path)
    path.write_text("file_name_typo,label\na.png,1\n")
    with pytest.raises(TrainError, match="needs an image column"):
        read_manifest(path)


def test_missing_manifest_is_a_one_line_error(tmp_path, capsys):
    from train_mura_cls import main

    assert main(["--manifest", str(tmp_path / "nope.csv"), "--project", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err


@pytest.mark.slow
def test_classifier_learns_phantoms_resumes_and_loads(tmp_path):
    from bone_r.contract import Contract, harmonize
    from bone_r.image import load_image
    from models.classifier import load_classifier
    from train_mura_cls import main

    manifest = mura_manifest(tmp_path / "mura", n=64)
    runs = tmp_path / "runs"
    common = ["--project", str(runs), "--name", "cls", "--quiet"]
    assert main(["--manifest", str(manifest), "--imgsz", "96", "--epochs", "4", "--stop-after", "2", "--batch", "8",
                 "--lr", "1e-3", "--workers", "0", "--val-fraction", "0.25", *common]) == 0
    run = runs / "cls"
    for name in ("args.json", "git_commit", "splits_sha256", "contract.json", "run.json", "train_log.csv", "weights/last.pth"):
        assert (run / name).is_file(), name
    assert json.loads((run / "run.json").read_text())["harmonized_by_trainer"] is True  # raw MURA-style images
    assert main(["--resume", *common]) == 0
    with open(run / "train_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert max(float(r["val_auc"]) for r in rows) >= 0.9  # fractured vs intact is learnable in a few epochs
    card = json.loads((run / "weights" / "best.json").read_text())
    assert card["backend"] == "classifier" and card["test"]["auc"] is not None and card["test"]["n"] == 12
    assert card["started_from"].startswith("ImageNet EfficientNet-Lite0")
    assert Contract.from_dict(card["contract"]) == Contract()

    clf = load_classifier(run / "weights" / "best.pth")
    probs = {True: [], False: []}
    for i in range(8):
        ph = make_phantom(160, 128, fractured=i % 2 == 0, seed=5000 + i, bits=16)
        path = tmp_path / f"x{i}.png"
        cv2.imwrite(str(path), ph.pixels)
        p = clf(harmonize(load_image(path).pixels, clf.contract))
        assert 0.0 <= p <= 1.0
        probs[ph.box is not None].append(p)
    assert np.mean(probs[True]) > np.mean(probs[False])  # unseen phantoms: abnormal scores higher
    # extended with --epochs and stopped inside the extension, a plain --resume trains to its end (not refused at 4)
    assert main(["--resume", "--epochs", "6", "--stop-after", "1", *common]) == 0
    assert main(["--resume", *common]) == 0
    assert len(read_train_log(run)) == 6
