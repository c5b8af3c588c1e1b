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
import os
import sys
from pathlib import Path

from bone_r.contract import Contract
from bone_r.image import DEFAULT_MAX_PIXELS
from bone_r.preprocess import plan, preprocess_tree


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
    try:
        images, others = plan(input_dir, output_dir)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if not images:
        print(f"error: no images found under {args.input}", file=sys.stderr)
        return 2
    rows, n_todo = preprocess_tree(images, others, output_dir, contract, workers=args.workers, max_pixels=args.max_pixels,
                                   quiet=args.quiet)

    failed = [r for r in rows if r["error"]]
    repaired = sum(1 for r in rows if r["repaired"] == "yes")
    print(f"{len(images)} image(s): {n_todo - len(failed)} harmonized, {len(images) - n_todo} up to date, "
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
