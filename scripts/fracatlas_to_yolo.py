"""FracAtlas (COCO JSON + dataset.csv) -> Bone-R's single-class fracture tree.

    python scripts/fracatlas_to_yolo.py ../shared/data/fracatlas data/work/ingest/fracatlas

Every image under ROOT/images (.jpg, .jpeg, .png) gets a mirrored label file
OUT/labels/<stem>.txt (one ``0 cx cy w h`` row per COCO box; empty for a
non-fractured image) and a symbolic link OUT/images/<name>; OUT/manifest.csv
records per image its regions from dataset.csv (``regions`` = every set flag of
hand, leg, hip, shoulder, mixed joined by ';'; ``region`` = the one flag when
exactly one is set, ``mixed`` when several are or ``mixed`` is, else
``unknown``), its group (the image id: FracAtlas has no patient ids) and label.

Labels come from the annotations: an annotated image is a positive even where
dataset.csv says ``fractured=0`` (counted); an image flagged fractured (or in a
``Fractured`` folder) without any annotation is left out (counted), never made
a negative. Boxes are clipped by their edges to the image size the JSON gives;
boxes with nothing left are dropped (counted), and an image whose every box was
dropped is left out. The JSON's width/height are checked against the real image
(header only) and mismatches are reported; when the shipped YOLO labels
(Annotations/YOLO) are there, the converted boxes are compared with them.
Nothing is written under ROOT.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from bone_r.dataset import (
    IngestError,
    LabelError,
    clip_xyxy,
    link_original,
    prepare_output,
    read_label_rows,
    write_manifest,
    xyxy_to_yolo,
)
from bone_r.image import load_image
from bone_r.runs import tqdm_bar

ROOT = Path(__file__).resolve().parents[1]

REGION_FLAGS = ["hand", "leg", "hip", "shoulder", "mixed"]
SUFFIXES = {".jpg", ".jpeg", ".png"}
DEFAULT_COCO = Path("Annotations") / "COCO JSON" / "COCO_fracture_masks.json"


def region_of(flags: dict[str, str]) -> tuple[str, str]:
    """(region for stratification, all set flags joined by ';') from a dataset.csv row."""
    set_flags = [f for f in REGION_FLAGS if str(flags.get(f, "0")).strip() in ("1", "1.0", "True", "true")]
    regions = ";".join(set_flags)
    if not set_flags:
        return "unknown", regions
    if "mixed" in set_flags or len(set_flags) > 1:
        return "mixed", regions
    return set_flags[0], regions


def image_header(path: Path) -> tuple[int, int, int | None]:
    """(stored width, stored height, EXIF orientation or None) from the header alone."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size[0], im.size[1], im.getexif().get(0x0112)


# EXIF orientation -> where a normalized point (u, v) of the displayed image lies in the stored pixels
_DISPLAY_TO_STORED = {
    1: lambda u, v: (u, v),
    2: lambda u, v: (1 - u, v),
    3: lambda u, v: (1 - u, 1 - v),
    4: lambda u, v: (u, 1 - v),
    5: lambda u, v: (v, u),
    6: lambda u, v: (v, 1 - u),
    7: lambda u, v: (1 - v, 1 - u),
    8: lambda u, v: (1 - v, u),
}


def display_to_stored(box: tuple[float, float, float, float], orientation: int) -> tuple[float, float, float, float]:
    """A normalized xyxy box on the EXIF-rotated (displayed) image, on the stored pixels instead."""
    to_stored = _DISPLAY_TO_STORED[orientation]
    (a, b), (c, d) = to_stored(box[0], box[1]), to_stored(box[2], box[3])
    return min(a, c), min(b, d), max(a, c), max(b, d)


def decoded_frame(path: Path) -> str:
    """'stored' or 'display': which frame `load_image` gives for an EXIF-rotated file."""
    import numpy as np
    from PIL import Image, ImageOps


    pixels = load_image(path).pixels.astype(np.float32)
    with Image.open(path) as im:
        stored = np.asarray(im.convert("L"), np.float32)
        display = np.asarray(ImageOps.exif_transpose(im).convert("L"), np.float32)
    diffs = {name: float(np.abs(arr - pixels).mean()) if arr.shape == pixels.shape else float("inf") for name, arr in (("stored", stored), ("display", display))}
    best = min(diffs, key=diffs.get)
    if diffs[best] > 8:
        raise IngestError(f"{path}: load_image's pixels match neither the stored nor the EXIF-rotated image")
    return best


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("root", type=Path, help="the FracAtlas folder (images/, Annotations/, dataset.csv); read only")
    p.add_argument("out", type=Path, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--coco", type=Path, help=f"the COCO JSON (default: ROOT/{DEFAULT_COCO.as_posix()})")
    p.add_argument("--csv", type=Path, help="dataset.csv with the region flags (default: ROOT/dataset.csv)")
    p.add_argument("--yolo-check", type=Path, help="shipped YOLO labels to compare with (default: ROOT/Annotations/YOLO when present)")
    p.add_argument("--source", default="fracatlas", help="source name recorded per image (default: fracatlas)")
    p.add_argument("--overwrite", action="store_true", help="clear a non-empty output folder first")
    return p


def load_coco(path: Path) -> tuple[dict[str, dict], dict[int, list[dict]]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise IngestError(f"cannot read the COCO JSON {path}: {err}") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise IngestError(f"{path} is not a COCO detection file (no 'images'/'annotations')")
    images = {}
    for im in data["images"]:
        try:
            images[str(im["file_name"])] = {"id": im["id"], "width": float(im["width"]), "height": float(im["height"])}
        except (KeyError, TypeError, ValueError):
            raise IngestError(f"{path}: an image entry lacks file_name/id/width/height: {str(im)[:120]}") from None
    anns: dict[int, list[dict]] = defaultdict(list)
    for ann in data["annotations"]:
        if "bbox" not in ann or "image_id" not in ann:
            raise IngestError(f"{path}: an annotation lacks bbox/image_id: {str(ann)[:120]}")
        anns[ann["image_id"]].append(ann)
    return images, anns


def compare_with_yolo(boxes: list[tuple[float, float, float, float]], shipped: Path, tol: float = 0.01) -> bool:
    """True when normalized xyxy `boxes` match the shipped label file's boxes within `tol` (order ignored); a
    shipped file the one label reader refuses does not match."""
    try:
        theirs = sorted(row.xyxy() for row in read_label_rows(shipped))
    except LabelError:
        return False
    ours = sorted(boxes)
    if len(theirs) != len(ours):
        return False
    return all(max(abs(a - b) for a, b in zip(x, y, strict=True)) <= tol for x, y in zip(ours, theirs, strict=True))


def convert(args: argparse.Namespace) -> dict:
    root: Path = args.root
    if not root.is_dir():
        raise IngestError(f"the FracAtlas folder {root} does not exist")
    coco_path = args.coco or root / DEFAULT_COCO
    csv_path = args.csv or root / "dataset.csv"
    yolo_dir = args.yolo_check or (root / "Annotations" / "YOLO")
    coco_images, anns = load_coco(coco_path)
    flags: dict[str, dict] = {}
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            for row in csv.DictReader(fh):
                flags[Path(row["image_id"]).stem] = row
    elif args.csv:
        raise IngestError(f"dataset.csv not found at {csv_path}")
    images_dir = root / "images"
    files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()) if images_dir.is_dir() else []
    if not files:
        raise IngestError(f"no .jpg/.jpeg/.png images under {images_dir}")
    by_stem: dict[str, Path] = {}
    for f in files:
        if f.stem in by_stem:
            raise IngestError(f"two images share the id '{f.stem}': {by_stem[f.stem]} and {f}")
        by_stem[f.stem] = f
    coco_by_stem = {Path(name).stem: info for name, info in coco_images.items()}
    prepare_output(args.out, args.overwrite, [root])

    stats: Counter = Counter()
    lists: dict[str, list[str]] = defaultdict(list)
    rows = []
    for stem, path in tqdm_bar(sorted(by_stem.items()), desc="fracatlas", unit="img"):
        info = coco_by_stem.get(stem)
        flag_row = flags.get(stem)
        if flags and flag_row is None:
            stats["not_in_csv"] += 1
            lists["not_in_csv"].append(stem)
        csv_fractured = flag_row is not None and str(flag_row.get("fractured", "0")).strip() == "1"
        in_fractured_folder = any(part.lower() == "fractured" for part in path.relative_to(images_dir).parts[:-1])
        image_anns = anns.get(info["id"], []) if info else []
        lines: list[str] = []
        if image_anns:
            W, H = info["width"], info["height"]
            stored_w, stored_h, orientation = image_header(path)
            # annotators saw the EXIF-rotated image: the JSON size is the displayed size
            disp_w, disp_h = (stored_h, stored_w) if orientation in (5, 6, 7, 8) else (stored_w, stored_h)
            if (disp_w, disp_h) != (round(W), round(H)):
                stats["size_mismatch"] += 1
                lists["size_mismatch"].append(f"{stem} json {W:g}x{H:g} file {disp_w}x{disp_h}")
                if abs(W / H - disp_w / disp_h) > 0.01 * (disp_w / disp_h):
                    raise IngestError(f"{stem}: the JSON size {W:g}x{H:g} has another aspect than the image {disp_w}x{disp_h}; boxes cannot be placed")
            boxes = []
            for ann in image_anns:
                try:
                    x, y, w, h = (float(v) for v in ann["bbox"])
                except (TypeError, ValueError):
                    stats["degenerate_boxes"] += 1
                    continue
                box = clip_xyxy(x, y, x + w, y + h, W, H)
                if box is None:
                    stats["degenerate_boxes"] += 1
                    lists["degenerate_boxes"].append(f"{stem} bbox {ann['bbox']}")
                    continue
                if box != (x, y, x + w, y + h):
                    stats["clipped_boxes"] += 1
                boxes.append((box[0] / W, box[1] / H, box[2] / W, box[3] / H))
            if not boxes:
                stats["left_out_all_degenerate"] += 1
                lists["left_out_all_degenerate"].append(stem)
                continue
            if flag_row is not None and not csv_fractured:
                stats["annotated_but_csv_not_fractured"] += 1
                lists["annotated_but_csv_not_fractured"].append(stem)
            shipped = yolo_dir / f"{stem}.txt"
            if shipped.is_file():
                stats["yolo_compared"] += 1
                if not compare_with_yolo(boxes, shipped):
                    stats["yolo_disagree"] += 1
                    lists["yolo_disagree"].append(stem)
            if orientation not in (None, 1) and decoded_frame(path) == "stored":
                # load_image decodes the stored pixels (EXIF ignored): move the boxes there
                boxes = [display_to_stored(b, orientation) for b in boxes]
                stats["exif_rotated_boxes_moved"] += 1
                lists["exif_rotated_boxes_moved"].append(f"{stem} (orientation {orientation})")
            lines = [xyxy_to_yolo(b) for b in boxes]
        elif csv_fractured or in_fractured_folder:
            # a fracture without a box: not usable as a positive, and not a negative
            stats["left_out_fractured_without_box"] += 1
            lists["left_out_fractured_without_box"].append(stem)
            continue
        dest = args.out / "images" / path.name
        link_original(path, dest)
        (args.out / "labels").mkdir(parents=True, exist_ok=True)
        (args.out / "labels" / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))
        region, regions = region_of(flag_row or {})
        rows.append(
            {
                "image": dest.relative_to(args.out).as_posix(),
                "source": args.source,
                "region": region,
                "regions": regions,
                "group": stem,
                "label": int(bool(lines)),
                "boxes": len(lines),
                "weak": 0,
                "original": path.relative_to(root).as_posix(),
                "note": "annotated; dataset.csv fractured=0" if lines and flag_row is not None and not csv_fractured else "",
            }
        )
        stats["positives" if lines else "negatives"] += 1
        stats["boxes"] += len(lines)
        stats[f"region:{region}"] += 1
    unused = [name for name, info in coco_images.items() if Path(name).stem not in by_stem and anns.get(info["id"])]
    stats["annotated_image_missing"] = len(unused)
    lists["annotated_image_missing"] = unused
    write_manifest(args.out / "manifest.csv", rows)
    stats["written"] = len(rows)
    return {"stats": stats, "lists": lists, "csv": csv_path if flags else None}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        result = convert(args)
    except IngestError as err:
        print(f"fracatlas_to_yolo: error: {err}", file=sys.stderr)
        return 2
    s, lists = result["stats"], result["lists"]
    print(f"fracatlas_to_yolo: {args.root} -> {args.out}")
    print(f"  images written {s['written']}: {s['positives']} positive, {s['negatives']} negative; {s['boxes']} boxes")
    print("  regions: " + ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in sorted(s.items()) if k.startswith("region:")))
    if result["csv"] is None:
        print("  WARNING: no dataset.csv: every region is 'unknown'")
    print(f"  boxes clipped at the image edge: {s['clipped_boxes']}; degenerate boxes dropped: {s['degenerate_boxes']}")
    for key, what in [
        ("annotated_but_csv_not_fractured", "annotated but fractured=0 in dataset.csv (kept as positives)"),
        ("left_out_fractured_without_box", "left out: flagged fractured (csv or folder) but no annotation"),
        ("left_out_all_degenerate", "left out: every box degenerate"),
        ("not_in_csv", "images missing from dataset.csv (region unknown)"),
        ("annotated_image_missing", "annotated in the JSON but no image file"),
        ("size_mismatch", "JSON width/height differ from the (EXIF-rotated) image (same aspect; boxes scaled by the JSON size)"),
        ("exif_rotated_boxes_moved", "EXIF-rotated images whose boxes were moved to the stored pixels load_image decodes"),
        ("yolo_disagree", f"converted boxes that differ from the shipped YOLO labels (of {s['yolo_compared']} compared)"),
    ]:
        if s[key] or key in ("annotated_but_csv_not_fractured", "size_mismatch", "yolo_disagree", "exif_rotated_boxes_moved"):
            shown = ", ".join(lists[key][:5]) + (" ..." if len(lists[key]) > 5 else "")
            print(f"  {what}: {s[key]}" + (f" ({shown})" if shown else ""))
    print("  groups: one per image (FracAtlas has no patient ids; multiscan studies cannot be linked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
