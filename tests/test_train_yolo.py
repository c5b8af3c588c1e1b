"""train.py: dataset resolution, offline behaviour, run-folder discipline, resume, model card, ONNX export.

The training smoke test runs Ultralytics for two tiny epochs on phantoms (64 px), split
over two invocations (--stop-after 1, then --resume), so it also proves that resume
continues an interrupted run.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bone_r.contract import Contract
from bone_r.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[1]


def phantom_tree(root: Path, n: int = 12, size: tuple[int, int] = (160, 128), *, contract: Contract | None = None,
                 positives: float = 0.5) -> Path:
    """A harmonized-looking YOLO tree with dataset.yaml (relative `path`), splits.csv and contract.json; returns the yaml."""
    phantoms = write_dataset(root, n=n, size=size, positives=positives)
    (root / "dataset.yaml").write_text("path: .\ntrain: images/train\nval: images/val\ntest: images/test\nnames:\n  0: fracture\n")
    (contract or Contract(clahe_clip=0.0)).save(root / "contract.json")
    with open(root / "splits.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "split", "source", "region", "group", "label", "sha256"])
        for i, ph in enumerate(phantoms):
            split = ["train", "val", "test"][i % 3]
            writer.writerow([f"images/{split}/ph{i:03d}.png", split, "phantom", "leg", f"g{i}", int(ph.box is not None), ""])
    return root / "dataset.yaml"


def tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(*args: str, env_extra: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "YOLO_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


# --------------------------------------------------------------------------- fast


def test_load_dataset_resolves_relative_path_against_the_yaml_folder(tmp_path):
    from bone_r.dataset import load_dataset

    data = tmp_path / "somewhere" / "tree"
    phantom_tree(data, n=6, contract=Contract(clahe_clip=3.0, max_side=512))
    yaml_elsewhere = tmp_path / "configs" / "d.yaml"
    yaml_elsewhere.parent.mkdir()
    yaml_elsewhere.write_text("path: ../somewhere/tree\ntrain: images/train\nval: images/val\nnames: {0: fracture}\n")
    # the contract is looked up in the dataset root when the yaml's folder has none
    info = load_dataset(yaml_elsewhere)
    assert info.root == data.resolve()
    assert info.splits["train"] == [data.resolve() / "images" / "train"]
    assert len(info.images("train")) == 2 and len(info.images("val")) == 2
    assert info.contract == Contract(clahe_clip=3.0, max_side=512)
    # splits.csv: beside the yaml, else in the dataset root (as evaluate.py looks for it)
    assert info.splits_sha256 == hashlib.sha256((data / "splits.csv").read_bytes()).hexdigest()
    (data / "splits.csv").unlink()
    info2 = load_dataset(data / "dataset.yaml")
    assert info2.splits_sha256 is None and "splits.csv" in info2.notes[0]


def test_load_dataset_without_contract_is_a_clear_error(tmp_path):
    from bone_r.dataset import load_dataset
    from bone_r.runs import TrainError

    yaml_path = phantom_tree(tmp_path / "t", n=6)
    (tmp_path / "t" / "contract.json").unlink()
    with pytest.raises(TrainError, match="contract.json"):
        load_dataset(yaml_path)
    info = load_dataset(yaml_path, contract_path=_write(tmp_path / "c.json", Contract(clahe_clip=1.5)))
    assert info.contract.clahe_clip == 1.5


def _write(path: Path, contract: Contract) -> Path:
    contract.save(path)
    return path


def test_ultralytics_view_links_files_and_never_writes_into_the_dataset(tmp_path):
    from bone_r.dataset import load_dataset
    from train import build_ultralytics_view

    yaml_path = phantom_tree(tmp_path / "t", n=12)
    before = tree_files(tmp_path / "t")
    info = load_dataset(yaml_path)
    view = build_ultralytics_view(info, tmp_path / "run" / "dataset", fraction=0.5, val_fraction=1.0, max_images=None, seed=0)
    import yaml

    cfg = yaml.safe_load(view.read_text())
    assert Path(cfg["path"]).is_absolute() and cfg["train"] == "images/train"
    train_imgs = sorted((tmp_path / "run" / "dataset" / "images" / "train").iterdir())
    assert len(train_imgs) == 2  # half of the 4 train images, seeded
    assert all(p.is_symlink() for p in train_imgs)
    assert len(list((tmp_path / "run" / "dataset" / "images" / "val").iterdir())) == 4
    assert tree_files(tmp_path / "t") == before


def test_named_pt_offline_without_allow_scratch_fails_clearly(tmp_path):
    yaml_path = phantom_tree(tmp_path / "t", n=6)
    done = run_cli("--data", str(yaml_path), "--model", "yolov8n.pt", "--epochs", "1", "--imgsz", "64",
                   "--project", str(tmp_path / "runs"), "--name", "x", env_extra={"BONE_R_OFFLINE": "1"})
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "yolov8n.pt could not be fetched" in err[0] and "--allow-scratch" in err[0]
    assert not (tmp_path / "runs" / "x").exists()  # nothing started


def test_bad_arguments_are_one_line_errors(tmp_path):
    from train import main

    yaml_path = phantom_tree(tmp_path / "t", n=6)
    assert main(["--data", str(tmp_path / "missing.yaml"), "--model", "yolov8n.yaml"]) == 2
    assert main(["--data", str(yaml_path), "--imgsz", "100"]) == 2  # not a multiple of 32
    assert main(["--resume", "--name", "nope", "--project", str(tmp_path / "runs")]) == 2


def test_several_gpus_go_to_ultralytics_ddp_with_the_run_folder_kept(tmp_path, monkeypatch, capsys):
    """--device 0,1,... is Ultralytics' own DDP: its launch would delete the run folder (train.py's files and the
    dataset view its workers read) before starting them; train.py keeps it, and refuses what cannot work there."""
    from types import SimpleNamespace

    import ultralytics.engine.trainer as trainer_module
    import ultralytics.utils.dist as ultralytics_dist

    from train import get_args_parser, main, multi_device, ultralytics_ddp_keeps_run_folder

    assert [multi_device(d) for d in ("cpu", "0", "0,1", "0,1,2,3", "cuda:0")] == [False, False, True, True, False]
    assert "0,1,2,3" in get_args_parser().format_help()
    monkeypatch.setattr(ultralytics_dist, "generate_ddp_file", lambda trainer: str(tmp_path / "ddp.py"))
    run_dir = tmp_path / "runs" / "y"
    for keep in (True, False):
        (run_dir / "dataset").mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text("{}")
        trainer = SimpleNamespace(resume=False, save_dir=run_dir, world_size=2)
        with ultralytics_ddp_keeps_run_folder() if keep else contextlib.nullcontext():
            cmd, _ = trainer_module.generate_ddp_command(trainer)
        assert "--nproc_per_node" in cmd and trainer.resume is False
        assert (run_dir / "args.json").is_file() == keep  # Ultralytics alone deletes the folder
    yaml_path = phantom_tree(tmp_path / "t", n=6)
    assert main(["--data", str(yaml_path), "--device", "0,1", "--stop-after", "1", "--model", "yolov8n.yaml"]) == 2
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["--data", str(yaml_path), "--model", "yolov8n.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--stop-after" in err[0] and "torchrun" in err[1]


# --------------------------------------------------------------------------- slow: real training


@pytest.mark.slow
def test_yolo_smoke_train_resume_card_and_export(tmp_path, capsys):
    from models import build_detector
    from train import main

    yaml_path = phantom_tree(tmp_path / "tree", n=12)
    before = tree_files(tmp_path / "tree")
    runs = tmp_path / "runs"
    common = ["--project", str(runs), "--name", "smoke", "--quiet"]
    rc = main(["--data", str(yaml_path), "--model", "yolov8n.pt", "--allow-scratch", "--epochs", "2", "--stop-after", "1",
               "--imgsz", "64", "--batch", "4", "--workers", "0", "--seed", "3", *common])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("could not be fetched") == 1 and "--allow-scratch" in out  # said once
    run = runs / "smoke"
    for name in ("args.json", "git_commit", "splits_sha256", "contract.json", "run.json", "train_log.csv", "weights/last.pt"):
        assert (run / name).is_file(), name
    args = json.loads((run / "args.json").read_text())
    assert args["args"]["seed"] == 3 and args["args"]["epochs"] == 2 and "--allow-scratch" in args["command"]
    assert (run / "splits_sha256").read_text().split()[0] == hashlib.sha256((tmp_path / "tree" / "splits.csv").read_bytes()).hexdigest()
    assert Contract.load(run / "contract.json") == Contract.load(tmp_path / "tree" / "contract.json")
    assert json.loads((run / "run.json").read_text())["started_from"].startswith("scratch: yolov8n.yaml")
    with open(run / "train_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1"]
    assert {"val_mAP50", "val_mAP50_95", "seconds", "box_loss"} <= set(rows[0])
    assert not (run / "weights" / "best.json").exists()  # not finished yet

    rc = main(["--resume", "--export", "onnx", *common])
    assert rc == 0
    with open(run / "train_log.csv") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1", "2"]  # continued, not restarted
    best = run / "weights" / "best.pt"
    card = json.loads((run / "weights" / "best.json").read_text())
    assert card["backend"] == "yolo" and card["architecture"] == "yolov8n" and card["classes"] == ["fracture"]
    assert card["imgsz"] == 64 and card["contract"] == Contract.load(run / "contract.json").to_dict()
    assert card["started_from"].startswith("scratch: yolov8n.yaml")
    training = card["training"]
    assert training["epochs"] == 2 and training["seed"] == 3 and training["wall_time_s"] > 0
    assert training["command"].startswith("python train.py") and len(training["resumed_with"]) == 1
    assert card["dataset"]["splits_sha256"] == (run / "splits_sha256").read_text().split()[0]
    assert "not a diagnosis" in card["disclaimer"]
    assert tree_files(tmp_path / "tree") == before  # no label caches or anything else written into the dataset

    # a finished run cannot be resumed
    assert main(["--resume", *common]) == 2
    # the registry's yolo backend loads the best weights and returns Detections in the given image's pixels
    import numpy as np

    from bone_r.detection import Detection

    detector = build_detector("yolo", best, imgsz=64)
    assert build_detector("yolo", best).imgsz == 64  # no size given: the one it was trained at, as Ultralytics' val()
    rgb = np.full((100, 80, 3), 128, np.uint8)
    dets = detector.predict(rgb, 0.0)
    assert dets and all(isinstance(d, Detection) for d in dets)
    assert all(0 <= d.xyxy[0] <= d.xyxy[2] <= 80 and 0 <= d.xyxy[1] <= d.xyxy[3] <= 100 for d in dets)
    # --export onnx wrote the ONNX model and its own card (backend onnx), away from best.pt's card
    onnx_path = run / "weights" / "onnx" / "best.onnx"
    onnx_card = json.loads(onnx_path.with_suffix(".json").read_text())
    assert onnx_card["backend"] == "onnx" and onnx_card["export"]["dynamic"] is True and onnx_card["imgsz"] == 64
    assert onnx_card["contract"] == card["contract"]
    assert build_detector("onnx", onnx_path).predict(rgb, 0.0)
