"""Train an Ultralytics YOLO fracture detector (YOLOv8 / YOLO11) on a Bone-R dataset tree.

    python train.py --data data/merged/dataset.yaml --model yolov8n.pt --allow-scratch \\
        --epochs 100 --imgsz 640 --batch 16 --name y8n-640
    python train.py --name y8n-640 --resume            # continue an interrupted run
    python train.py ... --export onnx --evaluate        # then export ONNX and fill the card's metrics

The dataset tree (``images/{train,val,test}``, ``labels/...``, ``dataset.yaml``,
``splits.csv``, ``contract.json``) is ALREADY harmonized by ``scripts/preprocess.py``:
nothing here harmonizes again. The contract the tree was made with is recorded
in the run folder and the model card, so `inference.Predictor` applies the same
contract to raw images at prediction time.

``--model`` takes a local ``.pt``, an Ultralytics name such as ``yolov8n.pt``
(fetched when online) or an architecture ``.yaml``. When a named ``.pt`` cannot
be fetched the run stops with one clear line, unless ``--allow-scratch`` says to
train the same architecture from its ``.yaml`` without pretrained weights.

Every run folder ``runs/<name>/`` keeps ``args.json`` (all arguments and the exact
command), ``git_commit``, ``splits_sha256``, ``contract.json``, ``run.json``
(where the weights started from), ``train_log.csv`` (one row per epoch),
``weights/{best,last}.pt`` and the model card ``weights/best.json``.

This module also holds the run-folder helpers that ``train_torchvision.py`` and
``train_mura_cls.py`` share (dataset resolution, seeds, run files, model cards).
Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bone_r import DISCLAIMER
from bone_r.card import (
    DEFAULT_IMGSZ,
    base_card,
    card_path_for,
    write_card,
)
from bone_r.contract import Contract
from bone_r.dataset import DatasetInfo, LabelError, label_path_for, load_dataset, read_label_rows
from bone_r.runs import (
    DEFAULT_DATA,
    DEFAULT_RUNS,
    TrainError,
    absolute,
    default_torch_threads,
    display_path,
    evaluate_after_training,
    given_options,
    log_epoch,
    note_resume,
    online,
    prepare_run_dir,
    read_json,
    read_train_log,
    run_cli,
    seed_everything,
    subset,
    training_summary,
    write_run_files,
)

ROOT = Path(__file__).resolve().parent

ARCH_SUFFIXES = (".yaml", ".yml")


# --------------------------------------------------------------------------- shared: dataset


# --------------------------------------------------------------------------- shared: run folder


# --------------------------------------------------------------------------- YOLO specifics


def scratch_yaml_for(name: str) -> str:
    """yolov8n.pt -> yolov8n.yaml (the same architecture, untrained)."""
    return re.sub(r"\.pt$", ".yaml", Path(name).name)


def resolve_start(model: str, allow_scratch: bool, fetch_dir: Path) -> tuple[str, str]:
    """(what to give YOLO(), the card's `started_from`) for a --model value."""
    path = Path(model)
    if path.suffix.lower() in ARCH_SUFFIXES:
        if path.parent != Path(".") and not path.is_file():
            raise TrainError(f"architecture file not found: {path}")
        return (str(path.resolve()) if path.is_file() else model), f"scratch: {path.name} (architecture only, no pretrained weights)"
    if path.suffix.lower() != ".pt":
        raise TrainError(f"--model must be a .pt checkpoint or an architecture .yaml, got {model!r}")
    if path.is_file():
        return str(path.resolve()), f"weights: {display_path(path)}"
    if path.parent != Path("."):
        raise TrainError(f"weights not found: {path}")
    from ultralytics.utils import SETTINGS
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES

    if path.name not in GITHUB_ASSETS_NAMES:
        raise TrainError(f"weights not found: {path} (and it is not an Ultralytics release name such as yolov8n.pt)")
    cached = [fetch_dir / path.name, Path(SETTINGS["weights_dir"]) / path.name]
    for candidate in cached:
        if candidate.is_file():
            return str(candidate), f"COCO-pretrained {path.name} (Ultralytics release, cached at {display_path(candidate)})"
    reason = "no network (github.com unreachable)"
    if online():
        from ultralytics.utils.downloads import attempt_download_asset

        fetch_dir.mkdir(parents=True, exist_ok=True)
        try:
            got = Path(attempt_download_asset(str(fetch_dir / path.name)))
            if got.is_file():
                return str(got), f"COCO-pretrained {path.name} (Ultralytics release, fetched)"
        except Exception as err:  # noqa: BLE001 - any download failure means the same thing here
            reason = f"download failed: {str(err).strip().splitlines()[0][:160]}"
    arch = scratch_yaml_for(path.name)
    if not allow_scratch:
        raise TrainError(f"{path.name} could not be fetched ({reason}); pass --allow-scratch to train {arch} from scratch "
                         "(no pretrained weights), or --model PATH to a local .pt")
    print(f"note: {path.name} could not be fetched ({reason}); training {arch} from scratch (--allow-scratch)")
    return arch, f"scratch: {arch} ({path.name} COCO weights could not be fetched offline)"


def build_ultralytics_view(info: DatasetInfo, view_dir: Path, *, fraction: float, val_fraction: float,
                           max_images: int | None, seed: int) -> Path:
    """A mirror of the tree (symlinked files, real folders) plus a yaml with an absolute `path`.

    Ultralytics writes label caches beside the labels and resolves relative
    yaml paths its own way; the mirror keeps both away from the dataset (which
    is never written to) and makes --fraction a fixed, seeded subset that a
    --resume sees again.
    """
    yaml_path = view_dir / "dataset.yaml"
    if yaml_path.is_file():
        return yaml_path
    import yaml

    entries = {}
    counts = {}
    for split in ("train", "val", "test"):
        images = info.images(split)
        if not images:
            if split in ("train", "val"):
                raise TrainError(f"the {split} split of {info.yaml_path} holds no images")
            continue
        if split == "train":
            images = subset(images, fraction, seed, max_images)
        elif split == "val":
            images = subset(images, val_fraction, seed, max_images)
        for image in images:
            base = next(f for f in info.splits[split] if image.is_relative_to(f))
            rel = image.relative_to(base)
            target = view_dir / "images" / split / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            _link(image, target)
            label = label_path_for(image)
            if label.is_file():
                try:
                    read_label_rows(label, boxes_only=True)  # refuse malformed labels before training starts
                except LabelError as err:
                    raise TrainError(str(err)) from None
                label_target = (view_dir / "labels" / split / rel).with_suffix(".txt")
                label_target.parent.mkdir(parents=True, exist_ok=True)
                _link(label, label_target)
        entries[split] = f"images/{split}"
        counts[split] = len(images)
    payload = {"path": str(view_dir.resolve()), **entries, "names": dict(enumerate(info.names))}
    yaml_path.write_text(f"# generated by train.py from {info.yaml_path} (images: {counts})\n" + yaml.safe_dump(payload, sort_keys=False))
    return yaml_path


def _link(source: Path, target: Path) -> None:
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        target.symlink_to(source.resolve())
    except OSError:  # filesystems without symlinks
        shutil.copy2(source, target)


class StopAfter(Exception):
    """Raised from a callback after --stop-after epochs: last.pt keeps its optimizer, so --resume continues."""


def _yolo_callbacks(model: Any, run_dir: Path, stop_after: int | None) -> dict[str, Any]:
    """Per-epoch train_log rows and the --stop-after switch, as Ultralytics callbacks."""
    state: dict[str, Any] = {"t0": None, "t_train": None, "done": 0}

    def on_train_epoch_start(trainer):
        state["t0"] = time.perf_counter()

    def on_train_epoch_end(trainer):
        state["t_train"] = time.perf_counter()

    def on_fit_epoch_end(trainer):
        if int(os.environ.get("RANK", -1)) > 0:  # a DDP worker of --device 0,1,...: rank 0 writes the log
            return
        if state["t0"] is None:  # the final validation of best.pt also fires this event: not an epoch
            return
        now = time.perf_counter()
        seconds = now - state["t0"]
        train_seconds = (state["t_train"] or now) - state["t0"]  # without validation and saving
        state["t0"] = state["t_train"] = None
        metrics = trainer.metrics or {}
        row = {"epoch": trainer.epoch + 1}
        row.update(_loss_items(trainer))
        row.update(val_mAP50=float(metrics.get("metrics/mAP50(B)", float("nan"))),
                   val_mAP50_95=float(metrics.get("metrics/mAP50-95(B)", float("nan"))),
                   train_seconds=round(train_seconds, 2), seconds=round(seconds, 2))
        log_epoch(run_dir, row)
        state["done"] += 1
        if stop_after and state["done"] >= stop_after and trainer.epoch + 1 < trainer.epochs:
            raise StopAfter(trainer.epoch + 1)

    model.add_callback("on_train_epoch_start", on_train_epoch_start)
    model.add_callback("on_train_epoch_end", on_train_epoch_end)
    model.add_callback("on_fit_epoch_end", on_fit_epoch_end)
    return state


def _loss_items(trainer: Any) -> dict[str, float]:
    """The epoch's mean training losses by name (Ultralytics keeps them as a dict or a tensor, by version)."""
    tloss = trainer.tloss
    if tloss is None:
        return {}
    if isinstance(tloss, dict):
        return {str(k).split("/")[-1]: float(v) for k, v in tloss.items()}
    values = tloss.tolist() if hasattr(tloss, "tolist") else [float(tloss)]
    values = values if isinstance(values, list) else [values]
    return {str(n): float(v) for n, v in zip(trainer.loss_names, values)}


def parse_hyp(pairs: list[str]) -> dict[str, Any]:
    """--hyp key=value pairs (values parsed as YAML scalars) passed on to Ultralytics."""
    import yaml

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise TrainError(f"--hyp expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Research and teaching tool, not a diagnosis.")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset.yaml of a harmonized tree (default: %(default)s)")
    p.add_argument("--contract", type=Path, default=None, help="the contract the tree was made with (default: its contract.json)")
    p.add_argument("--model", default="yolov8n.pt", help="a .pt (local or Ultralytics name) or an architecture .yaml")
    p.add_argument("--allow-scratch", action="store_true", help="if a named .pt cannot be fetched, train its .yaml from scratch")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--imgsz", type=int, default=DEFAULT_IMGSZ)
    p.add_argument("--batch", type=int, default=16, help="images per step in all (Ultralytics splits it over the --device GPUs)")
    p.add_argument("--workers", type=int, default=2, help="data loader workers (the machine has 2 cores)")
    p.add_argument("--device", default="cpu",
                   help="cpu, 0, or 0,1,2,3 for several GPUs: passed to Ultralytics, which then starts its own DDP process per GPU "
                        "(run train.py with python, not torchrun; --batch is the total)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patience", type=int, default=50, help="early stopping patience in epochs")
    p.add_argument("--optimizer", default="auto")
    p.add_argument("--lr0", type=float, default=None)
    p.add_argument("--close-mosaic", type=int, default=10)
    p.add_argument("--cache", default="false", choices=["false", "ram", "disk"], help="Ultralytics image cache")
    p.add_argument("--fraction", type=float, default=1.0, help="train on this seeded fraction of the train split")
    p.add_argument("--val-fraction", type=float, default=1.0, help="validate on this seeded fraction of the val split")
    p.add_argument("--max-images", type=int, default=None, help="at most this many train (and val) images")
    p.add_argument("--hyp", action="append", default=[], metavar="KEY=VALUE", help="any other Ultralytics train argument")
    p.add_argument("--project", type=Path, default=DEFAULT_RUNS, help="runs folder (default: %(default)s)")
    p.add_argument("--name", default=None, help="run name (default: <model stem>-<imgsz>)")
    p.add_argument("--exist-ok", action="store_true", help="overwrite a run folder of the same name")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run --name from weights/last.pt")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N epochs of this invocation, resumable with --resume (time-sliced training)")
    p.add_argument("--export", choices=["onnx"], default=None, help="export the best weights after training")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: Ultralytics' choice)")
    p.add_argument("--static", action="store_true", help="export a fixed imgsz x imgsz ONNX input (default: dynamic H x W)")
    p.add_argument("--evaluate", action="store_true", help="run evaluate.py --write-card on the best weights afterwards")
    p.add_argument("--quiet", action="store_true", help="less Ultralytics output")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.epochs < 1 or args.imgsz < 32 or args.batch < 1:
        raise TrainError("--epochs and --batch must be >= 1 and --imgsz >= 32")
    if args.imgsz % 32:
        raise TrainError(f"--imgsz must be a multiple of 32 (the model stride), got {args.imgsz}")
    for name in ("fraction", "val_fraction"):
        if not 0 < getattr(args, name) <= 1:
            raise TrainError(f"--{name.replace('_', '-')} must lie in (0, 1]")
    if args.stop_after is not None and args.stop_after < 1:
        raise TrainError("--stop-after must be >= 1")
    if args.stop_after and multi_device(args.device):
        raise TrainError(f"--stop-after stops one process; with --device {args.device} Ultralytics' DDP workers cannot stop "
                         "resumably: train to --epochs (or Ctrl-C and --resume)")
    if any(k in os.environ for k in ("RANK", "LOCAL_RANK")):
        raise TrainError("train.py was started by torchrun (RANK/LOCAL_RANK set): run it with python and --device 0,1,...; "
                         "Ultralytics starts its own DDP processes (torchrun is for train_torchvision.py)")


def multi_device(device: str) -> bool:
    """Whether --device names several accelerators (Ultralytics then trains with DDP in worker processes)."""
    return device.strip().lower() not in ("cpu", "mps") and len([d for d in device.split(",") if d.strip()]) > 1


@contextlib.contextmanager
def ultralytics_ddp_keeps_run_folder():
    """Ultralytics' multi-GPU launch deletes its save_dir (our run folder) before it starts the DDP workers unless it
    resumes; the folder holds this run's files and the dataset view the workers read. Keep it: the launch is told it
    resumes (only that deletion reads the flag; the workers get the real arguments)."""
    import ultralytics.engine.trainer as trainer_module

    original = trainer_module.generate_ddp_command

    def keep(trainer):
        resume, trainer.resume = trainer.resume, True
        try:
            return original(trainer)
        finally:
            trainer.resume = resume

    trainer_module.generate_ddp_command = keep
    try:
        yield
    finally:
        trainer_module.generate_ddp_command = original


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    return run_cli(_run, get_args_parser(), argv)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    _check_args(args)
    if args.resume:
        if not args.name:
            raise TrainError("--resume needs --name of the run to continue")
        return _resume(args, argv)
    args.data, args.contract = absolute(args.data), absolute(args.contract)  # a later --resume may run elsewhere
    info = load_dataset(args.data, args.contract)
    source, started_from = resolve_start(args.model, args.allow_scratch, ROOT / "cache" / "weights")
    name = args.name or f"{Path(args.model).stem}-{args.imgsz}"
    run_dir = prepare_run_dir(args.project, name, resume=False, exist_ok=args.exist_ok)
    if args.exist_ok:
        for stale in ("train_log.csv", "dataset"):
            path = run_dir / stale
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    seed_everything(args.seed)
    view_yaml = build_ultralytics_view(info, run_dir / "dataset", fraction=args.fraction, val_fraction=args.val_fraction,
                                       max_images=args.max_images, seed=args.seed)
    run = write_run_files(run_dir, "train.py", argv, args, info, {
        "backend": "yolo", "model": args.model, "model_source": source, "started_from": started_from,
        "ultralytics_data": str(view_yaml), "epochs_planned": args.epochs, "seed": args.seed, "device": args.device,
    })
    hyp = parse_hyp(args.hyp)
    from ultralytics import YOLO

    model = YOLO(source, task="detect")
    _yolo_callbacks(model, run_dir, args.stop_after)
    train_args = dict(
        data=str(view_yaml), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, workers=args.workers,
        device=args.device, seed=args.seed, deterministic=True, project=str(run_dir.parent), name=run_dir.name,
        exist_ok=True, plots=False, amp=args.device != "cpu", patience=args.patience, optimizer=args.optimizer,
        close_mosaic=args.close_mosaic, cache=False if args.cache == "false" else args.cache, verbose=not args.quiet,
    )
    if args.lr0 is not None:
        train_args["lr0"] = args.lr0
    train_args.update(hyp)
    print(f"training {Path(source).name} on {display_path(info.yaml_path)} -> {display_path(run_dir)}")
    return _train_and_finish(model, train_args, run_dir, run, args)


def _resume(args: argparse.Namespace, argv: list[str]) -> int:
    run_dir = prepare_run_dir(args.project, args.name, resume=True, exist_ok=False)
    last = run_dir / "weights" / "last.pt"
    if not last.is_file():
        raise TrainError(f"cannot resume {run_dir}: weights/last.pt is missing (no epoch finished yet?)")
    saved = read_json(run_dir / "args.json")["args"]
    planned = int(saved["epochs"])
    done = len(read_train_log(run_dir))
    if done >= planned or (run_dir / "weights" / "best.json").is_file():
        raise TrainError(f"{run_dir.name} already finished its {planned} epochs; to train further start a new run "
                         f"with --model {display_path(last)}")
    run = note_resume(run_dir, "train.py", argv)
    given = given_options(argv)
    for key in ("export", "opset", "static", "evaluate"):  # what to do after training: as first asked, unless given now
        if key not in given and key in saved:
            setattr(args, key, saved[key])
    seed_everything(int(saved["seed"]))
    from ultralytics import YOLO

    model = YOLO(str(last), task="detect")
    _yolo_callbacks(model, run_dir, args.stop_after)
    print(f"resuming {run_dir.name} after epoch {done} of {planned}")
    train_args = dict(resume=str(last), workers=args.workers, plots=False, device=saved["device"])
    return _train_and_finish(model, train_args, run_dir, run, args)


def _train_and_finish(model: Any, train_args: dict[str, Any], run_dir: Path, run: dict[str, Any], args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        with ultralytics_ddp_keeps_run_folder() if multi_device(str(train_args["device"])) else contextlib.nullcontext():
            model.train(**train_args)
    except StopAfter as stop:
        print(f"stopped after epoch {stop.args[0]} as asked (--stop-after); continue with: "
              f"python train.py --name {run_dir.name} --resume")
        return 0
    wall = time.perf_counter() - t0
    best = run_dir / "weights" / "best.pt"
    if not best.is_file():
        raise TrainError(f"training ended without {best}")
    saved = read_json(run_dir / "args.json")["args"]
    seed, device, imgsz = int(saved["seed"]), str(saved["device"]), int(saved["imgsz"])
    info_contract = Contract.load(run_dir / "contract.json")
    arch = _architecture_name(model, run.get("model", ""))
    training = training_summary(run_dir, run, seed, device)
    best_row = max(read_train_log(run_dir), key=lambda r: _num(r.get("val_mAP50")), default={})
    card = base_card(
        name=run_dir.name, backend="yolo", architecture=arch, imgsz=imgsz, contract=info_contract,
        started_from=run["started_from"], training=training,
        dataset_yaml=display_path(saved["data"]), splits_sha256=(run.get("dataset") or {}).get("splits_sha256"),
        training_validation={"best_epoch": int(best_row["epoch"]) if best_row else None,
                             "val_mAP50": _num(best_row.get("val_mAP50")) if best_row else None,
                             "val_mAP50_95": _num(best_row.get("val_mAP50_95")) if best_row else None,
                             "note": "Ultralytics' own validation during training; evaluate.py gives the reported metrics"},
    )
    card_path = write_card(best, card)
    rows = read_train_log(run_dir)
    print(f"done: {len(rows)} epoch(s), {training['seconds_per_epoch']} s/epoch, this invocation {wall:.0f} s; "
          f"best weights {display_path(best)}, card {display_path(card_path)}")
    rc = 0
    if args.export == "onnx":
        from models.export import export_onnx

        onnx_path = export_onnx(best, imgsz=imgsz, opset=args.opset, dynamic=not args.static)
        print(f"exported {display_path(onnx_path)} (card {display_path(card_path_for(onnx_path))})")
    if args.evaluate:
        rc = evaluate_after_training(best, Path(saved["data"]), default_torch_threads())
    else:
        print("next: python evaluate.py --weights " + display_path(best) + " --data " + display_path(saved["data"]) + " --write-card")
    print(DISCLAIMER)
    return 1 if rc else 0


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return float("-inf")
    return out if out == out else float("-inf")


def _architecture_name(model: Any, requested: str) -> str:
    """yolov8n / yolo11s ... from the model's yaml, else the --model stem."""
    try:
        yaml_file = model.model.yaml.get("yaml_file", "")
        if yaml_file:
            return Path(yaml_file).stem
    except AttributeError:
        pass
    return Path(requested).stem


if __name__ == "__main__":
    sys.exit(main())
