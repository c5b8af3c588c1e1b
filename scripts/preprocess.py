"""Apply the harmonization contract to a folder tree, offline.

    python scripts/preprocess.py INPUT OUTPUT [--contract contract.json] [--workers 2]

Every image under INPUT (recognized by content: PNG, JPEG, TIFF, BMP, DICOM)
becomes ``OUTPUT/<same folder>/<stem>.png``: the 8-bit single-channel image that
`harmonize` gives a model (its RGB has three equal channels, so one is
stored). Every other file (YOLO ``.txt`` labels, ``.csv``/``.yaml``/``.json``
sidecars) is copied verbatim, so labels stay beside their images. OUTPUT gets
``contract.json`` and ``preprocess_manifest.csv`` (source, output, sha256 of
the source, repaired, error).

Re-running skips outputs that are up to date (same source sha256 and contract);
a changed contract re-does everything. A file that cannot be decoded is listed
with its reason and the run exits non-zero unless ``--keep-going``. INPUT is
never written to.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2

from bone_r.contract import Contract, harmonize
from bone_r.image import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image, sniff_format

ROOT = Path(__file__).resolve().parents[1]

MANIFEST = "preprocess_manifest.csv"
CONTRACT = "contract.json"
FIELDS = ["source", "output", "sha256", "repaired", "width", "height", "out_width", "out_height", "error"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="folder tree of images (and labels) to harmonize; never modified")
    p.add_argument("output", type=Path, help="where the mirrored, harmonized tree goes")
    p.add_argument("--contract", type=Path, default=None, help="contract JSON/YAML (default: the documented defaults)")
    p.add_argument("--clahe-clip", type=float, default=None, help="override the contract's CLAHE clip limit")
    p.add_argument("--clahe-grid", type=int, default=None, help="override the contract's CLAHE grid")
    p.add_argument("--max-side", type=int, default=None, help="override the contract's max long side")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--keep-going", action="store_true", help="exit 0 even when some images cannot be decoded")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def harmonize_file(src: str, dst: str, contract: dict, max_pixels: int) -> dict:
    """Worker: decode + harmonize one file and write the PNG. Returns its manifest row."""
    data = Path(src).read_bytes()
    row = {"source": src, "output": dst, "sha256": sha256_bytes(data), "repaired": "", "width": "", "height": "",
           "out_width": "", "out_height": "", "error": ""}
    try:
        loaded = load_image(data, max_pixels=max_pixels)
    except ImageDecodeError as err:
        row["error"] = str(err)
        return row
    rgb = harmonize(loaded.pixels, Contract.from_dict(contract))
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
                raise SystemExit(f"error: {seen[dst]} and {rel} would both become {dst.relative_to(output_dir)}; rename one")
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


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    input_dir, output_dir = args.input.resolve(), args.output.resolve()
    if not input_dir.is_dir():
        print(f"error: input folder {args.input} does not exist", file=sys.stderr)
        return 2
    if output_dir == input_dir or input_dir in output_dir.parents or output_dir in input_dir.parents:
        print("error: the output folder must lie outside the input folder (and not contain it)", file=sys.stderr)
        return 2
    try:
        contract = Contract.load(args.contract) if args.contract else Contract()
        overrides = {k: v for k, v in {"clahe_clip": args.clahe_clip, "clahe_grid": args.clahe_grid,
                                       "max_side": args.max_side}.items() if v is not None}
        contract = Contract.from_dict(contract.to_dict() | overrides)
    except (OSError, ValueError) as err:
        print(f"error: bad contract: {err}", file=sys.stderr)
        return 2
    images, others = plan(input_dir, output_dir)
    if not images:
        print(f"error: no images found under {args.input}", file=sys.stderr)
        return 2
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

    bar = tqdm(total=len(todo), desc="harmonize", unit="img", disable=args.quiet)
    workers = max(1, min(args.workers, len(todo) or 1))
    if workers == 1:
        for src, dst in todo:
            rows.append(harmonize_file(str(src), str(dst), contract.to_dict(), args.max_pixels))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(harmonize_file, str(s), str(d), contract.to_dict(), args.max_pixels) for s, d in todo]
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

    failed = [r for r in rows if r["error"]]
    repaired = sum(1 for r in rows if r["repaired"] == "yes")
    print(f"{len(images)} image(s): {len(todo) - len(failed)} harmonized, {len(images) - len(todo)} up to date, "
          f"{repaired} repaired truncated JPEG(s), {len(failed)} failed; {len(others)} other file(s) copied -> {output_dir}")
    for row in failed:
        print(f"  failed: {row['source']}: {row['error']}", file=sys.stderr)
    if failed and not args.keep_going:
        print("error: some images could not be decoded (listed above and in the manifest); use --keep-going to accept",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
