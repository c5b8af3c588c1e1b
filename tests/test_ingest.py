"""Ingest scripts on tiny synthetic exports with known answers (FracAtlas COCO, Roboflow, GRAZPEDWRI, MURA)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from bone_r.dataset import IngestError
from bone_r.synthetic import encode, make_phantom
from scripts import fracatlas_to_yolo, ingest_yolo, mura_to_yolo


def write_image(path: Path, width: int = 200, height: int = 100, seed: int = 0, bits: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = make_phantom(height, width, fractured=False, seed=seed, bits=bits).pixels
    path.write_bytes(encode(pixels, path.suffix.lower()))
    return path


def read_manifest(folder: Path) -> dict[str, dict]:
    with open(folder / "manifest.csv", newline="") as fh:
        return {Path(r["image"]).stem: r for r in csv.DictReader(fh)}


def labels(folder: Path, stem: str) -> list[str]:
    return (folder / "labels" / f"{stem}.txt").read_text().splitlines()


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- FracAtlas (COCO)


@pytest.fixture
def fracatlas(tmp_path: Path) -> Path:
    root = tmp_path / "fracatlas"
    write_image(root / "images" / "Fractured" / "IMG1.jpg", seed=1)  # 200 x 100
    write_image(root / "images" / "Fractured" / "IMG2.png", seed=2)
    write_image(root / "images" / "Fractured" / "IMG3.jpeg", seed=3)
    write_image(root / "images" / "Non_fractured" / "IMG4.jpg", seed=4)
    write_image(root / "images" / "Non_fractured" / "IMG5.jpg", seed=5)  # flagged fractured, no box: left out
    write_image(root / "images" / "Fractured" / "IMG6.jpg", seed=6)  # every box degenerate: left out
    coco = {
        "images": [{"id": i, "file_name": f"IMG{i}.jpg", "width": 200, "height": 100} for i in (1, 2, 3, 6)],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 0, "bbox": [10, 20, 30, 40]},
            {"id": 2, "image_id": 1, "category_id": 0, "bbox": [180, -10, 40, 30]},  # crosses the right and top edges
            {"id": 3, "image_id": 1, "category_id": 0, "bbox": [50, 50, 0, 10]},  # zero width
            {"id": 4, "image_id": 2, "category_id": 0, "bbox": [300, 10, 20, 20]},  # wholly outside
            {"id": 5, "image_id": 2, "category_id": 0, "bbox": [0, 0, 200, 100]},
            {"id": 6, "image_id": 3, "category_id": 0, "bbox": [100, 50, 20, 10]},
            {"id": 7, "image_id": 6, "category_id": 0, "bbox": [10, 10, 0, 0]},
        ],
        "categories": [{"id": 0, "name": "fractured"}],
    }
    (root / "Annotations" / "COCO JSON").mkdir(parents=True)
    (root / "Annotations" / "COCO JSON" / "COCO_fracture_masks.json").write_text(json.dumps(coco))
    header = "image_id,hand,leg,hip,shoulder,mixed,hardware,multiscan,fractured,fracture_count,frontal,lateral,oblique\n"
    rows = [
        "IMG1.jpg,1,0,0,0,0,0,0,1,2,1,0,0",
        "IMG2.jpg,0,1,1,0,0,0,0,1,1,1,0,0",
        "IMG3.jpg,0,0,0,0,0,0,0,0,0,1,0,0",  # annotated although fractured=0: a positive
        "IMG4.jpg,1,0,0,0,1,0,0,0,0,1,0,0",
        "IMG5.jpg,0,1,0,0,0,0,0,1,1,1,0,0",
        "IMG6.jpg,0,1,0,0,0,0,0,1,1,1,0,0",
    ]
    (root / "dataset.csv").write_text(header + "\n".join(rows) + "\n")
    return root


def test_fracatlas_rows_clipping_regions_and_negatives(fracatlas: Path, tmp_path: Path, capsys):
    before = tree_digest(fracatlas)
    out = tmp_path / "out"
    assert fracatlas_to_yolo.main([str(fracatlas), str(out)]) == 0
    printed = capsys.readouterr().out
    assert tree_digest(fracatlas) == before  # the source is never written
    # the edge-crossing box is clipped by its edges (180..200 x 0..20), not value by value
    assert labels(out, "IMG1") == ["0 0.125000 0.400000 0.150000 0.400000", "0 0.950000 0.100000 0.100000 0.200000"]
    assert labels(out, "IMG2") == ["0 0.500000 0.500000 1.000000 1.000000"]
    assert labels(out, "IMG3") == ["0 0.550000 0.550000 0.100000 0.100000"]
    assert labels(out, "IMG4") == []  # non-fractured: an empty label file
    assert not (out / "labels" / "IMG5.txt").exists() and not (out / "labels" / "IMG6.txt").exists()
    m = read_manifest(out)
    assert sorted(m) == ["IMG1", "IMG2", "IMG3", "IMG4"]
    assert {k: (r["label"], r["boxes"], r["group"]) for k, r in m.items()} == {
        "IMG1": ("1", "2", "IMG1"),
        "IMG2": ("1", "1", "IMG2"),
        "IMG3": ("1", "1", "IMG3"),
        "IMG4": ("0", "0", "IMG4"),
    }
    assert {k: (r["region"], r["regions"]) for k, r in m.items()} == {
        "IMG1": ("hand", "hand"),
        "IMG2": ("mixed", "leg;hip"),
        "IMG3": ("unknown", ""),
        "IMG4": ("mixed", "hand;mixed"),
    }
    assert m["IMG2"]["image"] == "images/IMG2.png" and m["IMG3"]["image"] == "images/IMG3.jpeg"  # all suffixes handled
    assert (out / "images" / "IMG1.jpg").is_symlink()
    assert (out / "images" / "IMG1.jpg").resolve() == (fracatlas / "images" / "Fractured" / "IMG1.jpg").resolve()
    assert "degenerate boxes dropped: 3" in printed
    assert "annotated but fractured=0 in dataset.csv (kept as positives): 1 (IMG3)" in printed
    assert "flagged fractured (csv or folder) but no annotation: 1 (IMG5)" in printed
    assert "every box degenerate: 1 (IMG6)" in printed


def test_fracatlas_refuses_non_empty_output(fracatlas: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert fracatlas_to_yolo.main([str(fracatlas), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert fracatlas_to_yolo.main([str(fracatlas), str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_display_to_stored_matches_pil_exif_transpose(orientation: int):
    from PIL import Image, ImageOps

    stored = np.zeros((40, 60), np.uint8)
    stored[5:9, 30:40] = 255  # a bright block: rows 5..9, columns 30..40
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="PNG", exif=exif.tobytes())  # lossless, with the orientation tag
    with Image.open(io.BytesIO(buf.getvalue())) as tagged:
        display = np.asarray(ImageOps.exif_transpose(tagged))
    ys, xs = np.nonzero(display)
    h, w = display.shape
    box_display = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
    got = fracatlas_to_yolo.display_to_stored(box_display, orientation)
    assert got == pytest.approx((30 / 60, 5 / 40, 40 / 60, 9 / 40))


def test_fracatlas_moves_boxes_of_exif_rotated_images(tmp_path: Path):
    from PIL import Image

    root = tmp_path / "fa"
    stored = np.full((100, 200), 60, np.uint8)  # stored 200 wide x 100 high; displayed (orientation 6) 100 x 200
    path = root / "images" / "Fractured" / "IMG7.jpg"
    path.parent.mkdir(parents=True)
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(path, exif=exif.tobytes(), quality=95)
    coco = {
        "images": [{"id": 7, "file_name": "IMG7.jpg", "width": 100, "height": 200}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 0, "bbox": [10, 20, 30, 40]}],  # on the displayed image
    }
    (root / "Annotations" / "COCO JSON").mkdir(parents=True)
    (root / "Annotations" / "COCO JSON" / "COCO_fracture_masks.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    assert fracatlas_to_yolo.main([str(root), str(out)]) == 0
    # displayed box u 0.1..0.4, v 0.1..0.3 -> stored (orientation 6): u' = v, v' = 1 - u
    assert labels(out, "IMG7") == ["0 0.200000 0.750000 0.200000 0.300000"]


# --------------------------------------------------------------------------- Roboflow / YOLO exports


@pytest.fixture
def roboflow(tmp_path: Path) -> Path:
    root = tmp_path / "femur-export"
    root.mkdir()
    (root / "data.yaml").write_text("names:\n- dislocation\n- neck\n- normal\nnc: 3\ntrain: ../train/images\n")
    imgs, labs = root / "train" / "images", root / "train" / "labels"
    polygon = "1 0.1 0.2 0.3 0.25 0.2 0.4"
    for i, h in enumerate(("aaa", "bbb", "ccc")):  # three augmented copies of one radiograph
        write_image(imgs / f"femur1_png.rf.{h}.jpg", 64, 64, seed=10 + i)
        (labs / f"femur1_png.rf.{h}.txt").parent.mkdir(parents=True, exist_ok=True)
        (labs / f"femur1_png.rf.{h}.txt").write_text(f"{polygon}\n2 0.5 0.5 0.2 0.2\n")
    write_image(imgs / "femur2_png.rf.ddd.jpg", 64, 64, seed=20)
    (labs / "femur2_png.rf.ddd.txt").write_text("2 0.5 0.5 0.2 0.2\n0 0.1 0.1 0.5 0.5 0.3 0.3\n")  # normal + dislocation only
    write_image(imgs / "femur3_png.rf.eee.jpg", 64, 64, seed=21)
    (labs / "femur3_png.rf.eee.txt").write_text("1 0.95 0.5 0.2 0.2\n1 0.5 0.5 0.0 0.1\n")  # edge-crossing + degenerate box
    write_image(imgs / "101.rf.fff.jpg", 64, 64, seed=22)
    (labs / "101.rf.fff.txt").write_text("")  # an empty label file
    write_image(imgs / "101_jpg.rf.ggg.jpg", 64, 64, seed=23)
    (labs / "101_jpg.rf.ggg.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    return root


def test_roboflow_polygons_classes_negatives_and_groups(roboflow: Path, tmp_path: Path, capsys):
    before = tree_digest(roboflow)
    out = tmp_path / "out"
    assert ingest_yolo.main([str(roboflow), str(out), "--source", "femur", "--class-names", "neck", "--region", "hip", "--group", "roboflow"]) == 0
    printed = capsys.readouterr().out
    assert tree_digest(roboflow) == before
    for h in ("aaa", "bbb", "ccc"):
        assert labels(out, f"femur1_png.rf.{h}") == ["0 0.200000 0.300000 0.200000 0.200000"]  # polygon -> its box
    assert labels(out, "femur2_png.rf.ddd") == []  # only normal/dislocation rows: a negative
    assert labels(out, "femur3_png.rf.eee") == ["0 0.925000 0.500000 0.150000 0.200000"]  # clipped by its edges
    assert labels(out, "101.rf.fff") == []
    m = read_manifest(out)
    assert {k: r["group"] for k, r in m.items()} == {
        "femur1_png.rf.aaa": "femur1_png",
        "femur1_png.rf.bbb": "femur1_png",
        "femur1_png.rf.ccc": "femur1_png",
        "femur2_png.rf.ddd": "femur2_png",
        "femur3_png.rf.eee": "femur3_png",
        "101.rf.fff": "101",
        "101_jpg.rf.ggg": "101_jpg",  # a different radiograph than 101
    }
    assert {k: r["label"] for k, r in m.items() if r["label"] == "0"} == {"femur2_png.rf.ddd": "0", "101.rf.fff": "0"}
    assert all(r["source"] == "femur" and r["region"] == "hip" and r["weak"] == "0" for r in m.values())
    assert m["femur1_png.rf.aaa"]["original"] == "train/images/femur1_png.rf.aaa.jpg"
    assert "polygon rows turned into boxes: 3; degenerate boxes dropped: 1" in printed
    assert "dislocation 1, normal 4" in printed


def test_roboflow_empty_label_skip_and_class_choices(roboflow: Path, tmp_path: Path, capsys):
    out = tmp_path / "skip"
    assert ingest_yolo.main([str(roboflow), str(out), "--all-classes", "--empty", "skip"]) == 0
    m = read_manifest(out)
    assert "101.rf.fff" not in m  # an empty label file is not a verified normal here
    assert "left out (--empty skip) 1" in capsys.readouterr().out
    assert labels(out, "femur2_png.rf.ddd") == ["0 0.500000 0.500000 0.200000 0.200000", "0 0.300000 0.300000 0.400000 0.400000"]
    out2 = tmp_path / "idx"
    assert ingest_yolo.main([str(roboflow), str(out2), "--classes", "0"]) == 0
    assert labels(out2, "femur2_png.rf.ddd") == ["0 0.300000 0.300000 0.400000 0.400000"]
    assert read_manifest(out2)["femur1_png.rf.aaa"]["label"] == "0"


def test_unknown_class_name_lists_the_known_ones(roboflow: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert ingest_yolo.main([str(roboflow), str(out), "--class-names", "fracture"]) == 2
    err = capsys.readouterr().err
    assert "unknown class name(s) ['fracture']" in err and "dislocation, neck, normal" in err
    assert not out.exists()


def test_grazpedwri_patient_groups_and_dict_names(tmp_path: Path):
    root = tmp_path / "graz"
    (root / "data").mkdir(parents=True)
    (root / "data" / "meta.yaml").write_text("nc: 9\nnames:\n  3: fracture\n  8: text\n")
    files = {
        "train/0001_1297860395_01_WRI-L1_M014": "8 0.4 0.2 0.07 0.1\n3 0.5 0.5 0.1 0.2\n",
        "train/0001_1297860435_01_WRI-L2_M014": "8 0.4 0.2 0.07 0.1\n",
        "valid/0004_0542630449_01_WRI-L1_M003": "",
    }
    for i, (stem, text) in enumerate(files.items()):
        write_image(root / "data" / "images" / f"{stem}.png", 48, 64, seed=30 + i, bits=16)  # 16-bit like the real set
        (root / "data" / "labels" / f"{stem}.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / "data" / "labels" / f"{stem}.txt").write_text(text)
    out = tmp_path / "out"
    assert ingest_yolo.main([str(root), str(out), "--class-names", "fracture", "--region", "wrist"]) == 0  # group auto
    m = read_manifest(out)
    assert {k: (r["group"], r["label"], r["note"]) for k, r in m.items()} == {
        "0001_1297860395_01_WRI-L1_M014": ("0001", "1", ""),
        "0001_1297860435_01_WRI-L2_M014": ("0001", "0", "only other classes"),
        "0004_0542630449_01_WRI-L1_M003": ("0004", "0", "empty label file"),
    }
    assert labels(out, "0001_1297860395_01_WRI-L1_M014") == ["0 0.500000 0.500000 0.100000 0.200000"]
    assert ingest_yolo.group_for("0001_1297860395_01_WRI-L1_M014_png.rf.abc", "auto") == "0001"  # Roboflow copy of a GRAZPEDWRI image
    with pytest.raises(IngestError):
        ingest_yolo.group_for("femur1_png.rf.abc", "patient")


# --------------------------------------------------------------------------- MURA


@pytest.fixture
def mura(tmp_path: Path) -> Path:
    root = tmp_path / "MURA-v1.1"
    for i, rel in enumerate(
        [
            "train/XR_WRIST/patient00001/study1_positive/image1.png",
            "train/XR_WRIST/patient00001/study1_positive/image2.png",
            "train/XR_WRIST/patient00001/study2_negative/image1.png",
            "valid/XR_ELBOW/patient00002/study1_negative/image1.png",
        ]
    ):
        write_image(root / rel, 32, 32, seed=40 + i)
    (root / "train_labeled_studies.csv").write_text("MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/,1\n")
    return root


def test_mura_classification_tree(mura: Path, tmp_path: Path):
    out = tmp_path / "cls"
    assert mura_to_yolo.main([str(mura), str(out)]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "negative/train__XR_WRIST__patient00001__study2_negative__image1.png",
        "negative/valid__XR_ELBOW__patient00002__study1_negative__image1.png",
        "positive/train__XR_WRIST__patient00001__study1_positive__image1.png",
        "positive/train__XR_WRIST__patient00001__study1_positive__image2.png",
    ]
    m = read_manifest(out)
    row = m["train__XR_WRIST__patient00001__study1_positive__image2"]
    assert (row["region"], row["patient"], row["study"], row["label"], row["group"], row["subset"]) == ("wrist", "patient00001", "study1", "1", "patient00001", "train")
    assert m["valid__XR_ELBOW__patient00002__study1_negative__image1"]["region"] == "elbow"


def test_mura_weak_boxes_are_marked_weak(mura: Path, tmp_path: Path):
    out = tmp_path / "weak"
    assert mura_to_yolo.main([str(mura), str(out), "--mode", "weakbox"]) == 0
    m = read_manifest(out)
    pos, neg = "train__XR_WRIST__patient00001__study1_positive__image1", "train__XR_WRIST__patient00001__study2_negative__image1"
    assert labels(out, pos) == ["0 0.500000 0.500000 1.000000 1.000000"]
    assert labels(out, neg) == []
    assert (m[pos]["weak"], m[pos]["boxes"], m[neg]["weak"]) == ("1", "1", "0")
    assert "weak" in m[pos]["note"]


def test_ingest_links_decode_like_the_originals(roboflow: Path, tmp_path: Path):
    from bone_r.image import load_image

    out = tmp_path / "out"
    assert ingest_yolo.main([str(roboflow), str(out), "--all-classes"]) == 0
    linked = load_image(out / "images" / "femur1_png.rf.aaa.jpg").pixels
    original = cv2.imdecode(np.frombuffer((roboflow / "train" / "images" / "femur1_png.rf.aaa.jpg").read_bytes(), np.uint8), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(linked, original)


# --------------------------------------------------------------------------- the real sets (skip when absent)

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.realdata
@pytest.mark.skipif(not (REAL / "fracatlas" / "dataset.csv").is_file(), reason="../shared/data/fracatlas is not here")
def test_real_fracatlas_counts(tmp_path: Path, capsys):
    out = tmp_path / "fa"
    assert fracatlas_to_yolo.main([str(REAL / "fracatlas"), str(out)]) == 0
    printed = capsys.readouterr().out
    m = read_manifest(out)
    assert len(m) == 4083 and sum(r["label"] == "1" for r in m.values()) == 717
    assert sum(int(r["boxes"]) for r in m.values()) == 922
    assert m["IMG0003298"]["label"] == "1"  # the known quirk: a box but fractured=0
    assert "differ from the shipped YOLO labels (of 717 compared): 0" in printed


@pytest.mark.realdata
@pytest.mark.skipif(not (REAL / "proximal-femur" / "data.yaml").is_file(), reason="../shared/data/proximal-femur is not here")
def test_real_proximal_femur_groups(tmp_path: Path):
    import yaml

    entry = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "sources.yaml").read_text())["sources"]["proximal-femur"]
    out = tmp_path / "pf"
    args = [str(REAL / "proximal-femur"), str(out), "--class-names", ",".join(entry["classes"]), "--region", "hip", "--group", "roboflow"]
    assert ingest_yolo.main(args) == 0
    m = read_manifest(out)
    groups: dict[str, set] = {}
    for r in m.values():
        groups.setdefault(r["group"], set()).add(r["label"])
    assert len(m) == 1062 and sum(r["label"] == "1" for r in m.values()) == 369
    assert len(groups) == 354 and all(len(v) == 1 for v in groups.values())  # 3 copies per radiograph, one label each


def test_fracatlas_compares_its_boxes_with_the_shipped_yolo_labels_through_the_one_reader(tmp_path):
    shipped = tmp_path / "a.txt"
    shipped.write_text("\ufeff0 0.5 0.5 0.2 0.4\n\n0 0.1 0.1 0.1 0.1\n")  # a BOM and a blank line: still read
    ours = [(0.05, 0.05, 0.15, 0.15), (0.4, 0.3, 0.6, 0.7)]
    assert fracatlas_to_yolo.compare_with_yolo(ours, shipped)
    assert not fracatlas_to_yolo.compare_with_yolo([(0.4, 0.3, 0.6, 0.72)] + ours[:1], shipped)  # 0.02 off
    assert not fracatlas_to_yolo.compare_with_yolo(ours[:1], shipped)  # a box missing
    shipped.write_text("0 0.5 0.5 0.2\n")  # a row the reader refuses: no match, not a crash
    assert not fracatlas_to_yolo.compare_with_yolo(ours[:1], shipped)
