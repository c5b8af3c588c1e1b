"""scripts/preprocess.py: mirrored layout, labels beside images, manifest, re-runs, failures."""

from __future__ import annotations

import csv
import hashlib
import os

import cv2
import numpy as np
import pytest

from bone_r.contract import Contract, harmonize
from bone_r.image import load_image
from bone_r.preprocess import MANIFEST
from bone_r.synthetic import encode, make_phantom, to_8bit, truncated_jpeg
from scripts import preprocess


def _tree_digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def source(tmp_path):
    root = tmp_path / "src"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    ph = make_phantom(1400, 1100, seed=1)
    (root / "images" / "train" / "big16.png").write_bytes(encode(ph.pixels, ".png"))
    (root / "labels" / "train" / "big16.txt").write_text(ph.yolo_row + "\n")
    (root / "images" / "train" / "cut.jpg").write_bytes(truncated_jpeg(make_phantom(300, 200, seed=2).pixels))
    (root / "labels" / "train" / "cut.txt").write_text("")
    (root / "images" / "val" / "small.bmp").write_bytes(encode(to_8bit(make_phantom(200, 180, seed=3).pixels), ".bmp"))
    (root / "labels" / "val" / "small.txt").write_text("")
    (root / "notes.csv").write_text("a,b\n1,2\n")
    return root


def _manifest(out):
    with open(out / MANIFEST, newline="") as fh:
        return {os.path.basename(r["source"]): r for r in csv.DictReader(fh)}


def test_mirrors_tree_harmonizes_and_copies_sidecars(tmp_path, source):
    before = _tree_digest(source)
    out = tmp_path / "out"
    assert preprocess.main([str(source), str(out), "--workers", "1", "--quiet", "--max-side", "1024"]) == 0
    assert _tree_digest(source) == before  # the input is never touched
    assert (out / "images/train/big16.png").is_file() and (out / "images/val/small.png").is_file()
    assert (out / "labels/train/big16.txt").read_text() == (source / "labels/train/big16.txt").read_text()
    assert (out / "notes.csv").read_text() == "a,b\n1,2\n"
    assert Contract.load(out / "contract.json") == Contract(max_side=1024)
    stored = cv2.imread(str(out / "images/train/big16.png"), cv2.IMREAD_UNCHANGED)
    assert stored.ndim == 2 and stored.shape == (1024, 805)
    expected = harmonize(load_image(source / "images/train/big16.png").pixels, Contract(max_side=1024))[:, :, 0]
    assert np.array_equal(stored, expected)
    rows = _manifest(out)
    assert rows["cut.jpg"]["repaired"] == "yes" and rows["big16.png"]["repaired"] == "no"
    assert rows["big16.png"]["sha256"] == hashlib.sha256((source / "images/train/big16.png").read_bytes()).hexdigest()
    assert (rows["big16.png"]["width"], rows["big16.png"]["out_width"]) == ("1100", "805")


def test_rerun_skips_up_to_date_and_contract_change_redoes(tmp_path, source, capsys):
    out = tmp_path / "out"
    assert preprocess.main([str(source), str(out), "--workers", "1", "--quiet"]) == 0
    mtime = (out / "images/train/big16.png").stat().st_mtime_ns
    capsys.readouterr()
    assert preprocess.main([str(source), str(out), "--workers", "1", "--quiet"]) == 0
    assert "0 harmonized, 3 up to date" in capsys.readouterr().out
    assert (out / "images/train/big16.png").stat().st_mtime_ns == mtime
    assert _manifest(out)["cut.jpg"]["repaired"] == "yes"  # kept from the first run
    assert preprocess.main([str(source), str(out), "--workers", "1", "--quiet", "--clahe-clip", "3"]) == 0
    assert "3 harmonized, 0 up to date" in capsys.readouterr().out


def test_two_workers_give_the_same_pixels(tmp_path, source):
    assert preprocess.main([str(source), str(tmp_path / "one"), "--workers", "1", "--quiet"]) == 0
    assert preprocess.main([str(source), str(tmp_path / "two"), "--workers", "2", "--quiet"]) == 0
    one, two = _tree_digest(tmp_path / "one"), _tree_digest(tmp_path / "two")
    one.pop(MANIFEST), two.pop(MANIFEST)
    assert one == two


def test_undecodable_file_fails_the_run_unless_keep_going(tmp_path, source, capsys):
    (source / "images" / "val" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert preprocess.main([str(source), str(tmp_path / "a"), "--workers", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "--keep-going" in err
    assert "PNG" in _manifest(tmp_path / "a")["broken.png"]["error"]
    assert preprocess.main([str(source), str(tmp_path / "b"), "--workers", "1", "--quiet", "--keep-going"]) == 0


def test_refuses_output_inside_input_and_name_collisions(tmp_path, source, capsys):
    assert preprocess.main([str(source), str(source / "out"), "--quiet"]) == 2
    assert "outside the input" in capsys.readouterr().err
    (source / "images" / "val" / "small.png").write_bytes(encode(to_8bit(make_phantom(50, 50).pixels), ".png"))
    with pytest.raises(SystemExit, match="would both become"):
        preprocess.main([str(source), str(tmp_path / "out"), "--quiet"])
    assert preprocess.main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
