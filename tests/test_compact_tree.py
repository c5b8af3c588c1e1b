"""scripts/compact_tree.py (pack a tree small for an accelerator, unpack it there) and scripts/gpu_train.sh (train
inside a time budget from such a pack), run on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_train_yolo import phantom_tree, tree_files

from bone_r.contract import fit_long_side
from bone_r.dataset import load_ground_truth

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compact_tree.py"


def run(*args: str | Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_pack_then_unpack_gives_the_same_tree_at_the_training_size(tmp_path):
    data = phantom_tree(tmp_path / "tree", n=12, size=(400, 300))
    before = tree_files(tmp_path / "tree")
    proc = run("pack", data, tmp_path / "pack", "--imgsz", "256", "--quality", "90", "--val-max", "2")
    assert proc.returncode == 0, proc.stderr
    assert tree_files(tmp_path / "tree") == before  # the source tree is read, never changed
    info = json.loads((tmp_path / "pack" / "pack.json").read_text())
    assert info["images"] == {"train": 4, "val": 2} and info["imgsz"] == 256 and info["codec"] == "webp"
    assert info["psnr_db"]["min"] > 35 and info["image_bytes"] == sum(
        p.stat().st_size for p in (tmp_path / "pack" / "images").rglob("*.webp"))
    assert (tmp_path / "pack" / "splits.csv").read_bytes() == (tmp_path / "tree" / "splits.csv").read_bytes()

    proc = run("unpack", tmp_path / "pack", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    src = load_ground_truth(data, "train")
    out = load_ground_truth(tmp_path / "out" / "dataset.yaml", "train")
    assert [im.key for im in out.images] == [im.key for im in src.images]  # same names: splits.csv rows still match
    assert out.splits_sha256 == src.splits_sha256 and {im.source for im in out.images} == {"phantom"}
    for a, b in zip(src.images, out.images):
        assert (b.width, b.height) == (192, 256)  # 300 x 400 (w x h): long side 400 -> 256, aspect kept
        np.testing.assert_allclose(b.boxes, a.boxes * 256 / 400, atol=1e-6)  # the same normalized labels
        original = fit_long_side(cv2.imread(str(a.path), cv2.IMREAD_GRAYSCALE), 256)
        unpacked = cv2.imread(str(b.path), cv2.IMREAD_GRAYSCALE)
        assert np.abs(unpacked.astype(int) - original).mean() < 2.0  # lossy, close
    assert len(load_ground_truth(tmp_path / "out" / "dataset.yaml", "val").images) == 2


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    data = phantom_tree(tmp_path / "tree", n=6)
    not_a_pack = tmp_path / "empty"
    not_a_pack.mkdir()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "pack.json").write_text('{"format": "bone-r-pack-v1"}')  # no per-split counts
    for args, says in [(["unpack", not_a_pack, tmp_path / "o1"], "is not a pack"),
                       (["unpack", foreign, tmp_path / "o2"], "pack description"),
                       (["pack", data, tmp_path / "p1", "--splits", "train", "holdout"], "no 'holdout'"),
                       (["pack", data, tmp_path / "p2", "--quality", "0"], "--quality")]:
        proc = run(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert says in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_gpu_train_fills_a_budget_and_collects_float16_weights(tmp_path):
    """The accelerator script end to end on the CPU (--device cpu overrides its cuda): a tarred pack, the two-epoch
    probe, the epochs that fit, and what comes back."""
    data = phantom_tree(tmp_path / "tree", n=12, size=(200, 160))
    assert run("pack", data, tmp_path / "pack", "--imgsz", "128").returncode == 0
    with tarfile.open(tmp_path / "pack.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "pack", arcname="pack")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "PROBE_IMAGES": "4", "TREE": str(tmp_path / "t"), "RUNS": str(tmp_path / "r")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_train.sh"), str(tmp_path / "pack.tar.gz"), "90", str(out),
                           "g", "--arch", "fasterrcnn", "--imgsz", "128", "--batch", "2", "--device", "cpu", "--threads", "1"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "probe: 4 images, 2 epochs" in proc.stdout and "s per epoch" in proc.stdout
    rows = (out / "train_log.csv").read_text().strip().splitlines()[1:]
    planned = json.loads((out / "run.json").read_text())["epochs_planned"]
    assert planned >= 1 and len(rows) == planned  # every planned epoch ran inside the budget
    card = json.loads((out / "best-fp16.json").read_text())
    assert card["training"]["epochs"] == planned
    from models.torchvision_det import load_checkpoint
    for name in ("best", "last"):
        ckpt = load_checkpoint(out / f"{name}-fp16.pth")
        assert ckpt["stored_dtype"] == "float16" and "optimizer" not in ckpt
    assert (out / "gpu_train.log").read_text().count("collected at") == 1
