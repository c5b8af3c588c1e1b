"""Harmonizing a folder tree offline (`scripts/preprocess.py`): every image becomes the 8-bit PNG the contract gives
a model, other files are copied, and a manifest records each source's hash, so reruns skip what is up to date.
Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2

from bone_r.contract import Contract, harmonize
from bone_r.image import ImageDecodeError, load_image, sniff_format

MANIFEST = "preprocess_manifest.csv"


CONTRACT = "contract.json"


FIELDS = ["source", "output", "sha256", "repaired", "width", "height", "out_width", "out_height", "error"]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def harmonize_file(src: str, dst: str, contract: dict, max_pixels: int) -> dict:
    """Worker: decode + harmonize one file and write the PNG. Returns its manifest row."""
    data = Path(src).read_bytes()
    row = {"source": src, "output": dst, "sha256": sha256_bytes(data), "repaired": "", "width": "", "height": "",
           "out_width": "", "out_height": "", "error": ""}
    rules = Contract.from_dict(contract)
    try:
        loaded = load_image(data, max_pixels=max_pixels, contract=rules)
    except ImageDecodeError as err:
        row["error"] = str(err)
        return row
    rgb = harmonize(loaded.pixels, rules)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(dst).with_suffix(".tmp.png")
    if not cv2.imwrite(str(tmp), rgb[:, :, 0]):
        row["error"] = "could not write the output PNG"
        return row
    os.replace(tmp, dst)  # atomic: an interrupted run never leaves a half-written image
    row.update(repaired="yes" if loaded.meta.repaired else "no", width=loaded.meta.width, height=loaded.meta.height,
               out_width=rgb.shape[1], out_height=rgb.shape[0])
    return row


def is_image(path: Path) -> bool:
    with open(path, "rb") as fh:
        return sniff_format(fh.read(132)) is not None


def plan(input_dir: Path, output_dir: Path) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """(images, other files) as (source, destination) pairs; two images mapping to one PNG is an error."""
    images, others, seen = [], [], {}
    for src in sorted(input_dir.rglob("*")):
        if not src.is_file() or src.name.startswith("."):
            continue
        rel = src.relative_to(input_dir)
        if is_image(src):
            dst = output_dir / rel.with_suffix(".png")
            if dst in seen:
                raise ValueError(f"{seen[dst]} and {rel} would both become {dst.relative_to(output_dir)}; rename one")
            seen[dst] = rel
            images.append((src, dst))
        else:
            others.append((src, output_dir / rel))
    return images, others


def load_previous(output_dir: Path, contract: Contract) -> dict[str, dict]:
    """Manifest rows of an earlier run with the same contract, keyed by source path."""
    try:
        if Contract.load(output_dir / CONTRACT) != contract:
            return {}
        with open(output_dir / MANIFEST, newline="") as fh:
            return {row["source"]: row for row in csv.DictReader(fh)}
    except (OSError, ValueError, KeyError):
        return {}


def preprocess_tree(images: list[tuple[Path, Path]], others: list[tuple[Path, Path]], output_dir: Path, contract: Contract, *,
                    workers: int = 1, max_pixels: int, quiet: bool = False) -> tuple[list[dict], int]:
    """Harmonize `images` (source, destination pairs from `plan`) into `output_dir` with `workers` processes, skipping
    outputs an earlier run made from the same source and contract; copy `others`; write `contract.json` and the
    manifest. Returns (manifest rows, how many images were harmonized now)."""
    previous = load_previous(output_dir, contract)
    output_dir.mkdir(parents=True, exist_ok=True)

    rows, todo = [], []
    for src, dst in images:
        old = previous.get(str(src))
        if old and not old["error"] and dst.is_file() and old["output"] == str(dst):
            if old["sha256"] == sha256_bytes(src.read_bytes()):
                rows.append(old)
                continue
        todo.append((src, dst))
    for src, dst in others:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)

    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="harmonize", unit="img", disable=quiet)
    workers = max(1, min(workers, len(todo) or 1))
    if workers == 1:
        for src, dst in todo:
            rows.append(harmonize_file(str(src), str(dst), contract.to_dict(), max_pixels))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(harmonize_file, str(s), str(d), contract.to_dict(), max_pixels) for s, d in todo]
            for fut in futures:
                rows.append(fut.result())
                bar.update()
    bar.close()

    rows.sort(key=lambda r: r["source"])
    contract.save(output_dir / CONTRACT)
    with open(output_dir / MANIFEST, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in FIELDS} for row in rows)

    return rows, len(todo)
