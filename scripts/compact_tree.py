"""Carry a harmonized tree to an accelerator: pack it small here, unpack it into a normal tree there.

    python scripts/compact_tree.py pack data/merged/dataset.yaml device/pack --imgsz 640 --quality 70 --val-max 300
    python scripts/compact_tree.py unpack device/pack /tmp/tree        # on the accelerator: /tmp/tree/dataset.yaml

``pack`` stores each image of the chosen splits at the size the model trains at (long side ``--imgsz``, the
trainer's own area downscale, `bone_r.contract.fit_long_side`) as lossy grayscale WebP (``--quality``), with its
label file unchanged, the tree's ``contract.json`` and its ``splits.csv`` (unchanged, so a run trained on the
unpacked tree records the same ``splits_sha256``), and ``pack.json`` (sizes, quality, counts, bytes, the PSNR of
the lossy step). ``--val-max`` keeps a seeded subset of val (validation during training only: choose and report
on the full tree). ``unpack`` writes each image back as PNG under the same name (lossless from there), so the
trainer and ``load_image`` read an ordinary Bone-R tree and no new image format reaches the decoder.

Lossy storage changes pixels (``pack.json`` says by how much): a model trained on an unpacked tree is evaluated
on the original tree before anything is concluded from it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from bone_r.contract import fit_long_side, to_uint8
from bone_r.dataset import DataError, IngestError, label_path_for, load_dataset_yaml, prepare_output
from bone_r.image import ImageDecodeError, list_images, load_image
from bone_r.runs import print_json, subset

PACK_FORMAT = "bone-r-pack-v1"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pack = sub.add_parser("pack", help="a harmonized tree -> a small pack of WebP images and labels")
    pack.add_argument("data", type=Path, help="dataset.yaml of a harmonized tree (e.g. data/merged/dataset.yaml)")
    pack.add_argument("out", type=Path, help="the pack folder (empty, or cleared with --overwrite)")
    pack.add_argument("--imgsz", type=int, default=640, help="long side stored, never upscaled (default: %(default)s)")
    pack.add_argument("--quality", type=int, default=70, help="WebP quality 1..100 (default: %(default)s)")
    pack.add_argument("--splits", nargs="+", default=["train", "val"], help="splits packed (default: %(default)s)")
    pack.add_argument("--val-max", type=int, default=None, help="at most this many val images (a seeded subset)")
    pack.add_argument("--seed", type=int, default=0)
    pack.add_argument("--workers", type=int, default=1)
    pack.add_argument("--overwrite", action="store_true")
    unpack = sub.add_parser("unpack", help="a pack -> an ordinary tree of PNG images")
    unpack.add_argument("pack", type=Path, help="a folder written by 'pack'")
    unpack.add_argument("out", type=Path, help="the tree folder (empty, or cleared with --overwrite)")
    unpack.add_argument("--workers", type=int, default=1)
    unpack.add_argument("--overwrite", action="store_true")
    return p


def _pack_one(job: tuple[str, str, int, int]) -> tuple[int, float]:
    """(bytes written, PSNR in dB of the stored pixels against the downscaled tree image; inf when identical)."""
    src, dest, imgsz, quality = job
    gray = fit_long_side(to_uint8(load_image(src).pixels), imgsz)
    ok, buf = cv2.imencode(".webp", gray, [cv2.IMWRITE_WEBP_QUALITY, quality])
    if not ok:
        raise ValueError(f"WebP encoding failed for {src}")
    Path(dest).write_bytes(buf.tobytes())
    back = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    mse = float(np.mean((back.astype(np.float64) - gray) ** 2))
    return len(buf), (float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse))


def _unpack_one(job: tuple[str, str]) -> None:
    src, dest = job
    gray = cv2.imread(src, cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise ValueError(f"{src} is not a readable WebP image")
    if not cv2.imwrite(dest, gray):
        raise OSError(f"could not write {dest}")


def _run_jobs(fn, jobs: list, workers: int) -> list:
    if workers <= 1:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(fn, jobs, chunksize=16))


def _copy_beside(src_yaml: Path, root: Path, out: Path, names: list[str]) -> None:
    for name in names:
        found = next((p for p in (src_yaml.parent / name, root / name) if p.is_file()), None)
        if found is not None:
            shutil.copy2(found, out / name)


def _write_yaml(out: Path, splits: list[str]) -> None:
    lines = ["# Bone-R tree written by scripts/compact_tree.py (see pack.json)"]
    lines += [f"{s}: images/{s}" for s in splits] + ["nc: 1", "names:", "  0: fracture", ""]
    (out / "dataset.yaml").write_text("\n".join(lines))


def pack(args: argparse.Namespace) -> int:
    if not 1 <= args.quality <= 100 or args.imgsz < 32:
        raise ValueError("--quality must lie in 1..100 and --imgsz be >= 32")
    root, cfg = load_dataset_yaml(args.data)
    prepare_output(args.out, args.overwrite, inputs=[root])
    jobs, counts = [], {}
    for split in args.splits:
        entry = cfg.get(split)
        if not isinstance(entry, str):
            raise DataError(f"{args.data} has no '{split}' folder entry (packing reads one folder per split)")
        images = list_images(root / entry)
        if not images:
            raise DataError(f"split '{split}' of {args.data} holds no images")
        if split == "val" and args.val_max:
            images = subset(images, 1.0, args.seed, args.val_max)
        (args.out / "images" / split).mkdir(parents=True)
        (args.out / "labels" / split).mkdir(parents=True)
        for image in images:
            label = label_path_for(image)
            if label.is_file():
                shutil.copy2(label, args.out / "labels" / split / label.name)
            jobs.append((str(image), str(args.out / "images" / split / f"{image.stem}.webp"), args.imgsz, args.quality))
        counts[split] = len(images)
    results = _run_jobs(_pack_one, jobs, args.workers)
    _copy_beside(args.data, root, args.out, ["contract.json", "splits.csv"])
    _write_yaml(args.out, args.splits)
    psnr = np.array([r[1] for r in results])
    finite = psnr[np.isfinite(psnr)]
    info = {"format": PACK_FORMAT, "source": str(args.data), "imgsz": args.imgsz, "codec": "webp", "quality": args.quality,
            "images": counts, "image_bytes": int(sum(r[0] for r in results)),
            "psnr_db": {"median": round(float(np.median(finite)), 2) if finite.size else None,
                        "min": round(float(finite.min()), 2) if finite.size else None,
                        "identical": int((~np.isfinite(psnr)).sum())},
            "val_subset": bool(args.val_max and "val" in args.splits), "seed": args.seed}
    (args.out / "pack.json").write_text(json.dumps(info, indent=2) + "\n")
    print_json(info)
    return 0


def unpack(args: argparse.Namespace) -> int:
    meta = args.pack / "pack.json"
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        raise DataError(f"{args.pack} is not a pack: no readable pack.json (write one with 'compact_tree.py pack')") from None
    if not isinstance(info, dict) or info.get("format") != PACK_FORMAT or not isinstance(info.get("images"), dict):
        raise DataError(f"{meta} is not a {PACK_FORMAT} pack description (format and per-split image counts)")
    prepare_output(args.out, args.overwrite, inputs=[args.pack])
    jobs = []
    for split in info["images"]:
        (args.out / "images" / split).mkdir(parents=True)
        shutil.copytree(args.pack / "labels" / split, args.out / "labels" / split)
        found = sorted((args.pack / "images" / split).glob("*.webp"))
        if len(found) != info["images"][split]:
            raise DataError(f"{args.pack}: split '{split}' holds {len(found)} images, pack.json says {info['images'][split]}")
        jobs += [(str(p), str(args.out / "images" / split / f"{p.stem}.png")) for p in found]
    _run_jobs(_unpack_one, jobs, args.workers)
    for name in ("contract.json", "splits.csv", "dataset.yaml", "pack.json"):
        if (args.pack / name).is_file():
            shutil.copy2(args.pack / name, args.out / name)
    print(f"unpacked {len(jobs)} images to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return pack(args) if args.command == "pack" else unpack(args)
    except (DataError, IngestError, ImageDecodeError, OSError, ValueError) as err:
        print(f"compact_tree: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
