"""Ingest a YOLO / Roboflow export into Bone-R's single-class fracture tree.

    python scripts/ingest_yolo.py EXPORT OUT --source NAME --class-names fracture --region wrist

Reads every image under EXPORT that lives in an ``images`` folder (Roboflow:
``<split>/images/*.jpg``; Ultralytics: ``images/<split>/*``) with its label file
(the same path with ``images`` -> ``labels`` and the suffix ``.txt``), keeps the
chosen classes as class 0 ``fracture`` and writes into OUT (never into EXPORT):

- ``images/<name>``: a symbolic link to the original image,
- ``labels/<stem>.txt``: one ``0 cx cy w h`` row per kept box (empty = negative),
- ``manifest.csv``: image, source, region, regions, group, label, boxes, weak,
  original (path inside EXPORT), note.

Polygon rows (more than 4 coordinates) become their bounding box; boxes are
clipped by their edges to the image and dropped (and counted) when nothing is
left. An image whose label file has rows but none of the chosen classes is a
negative; an empty or missing label file follows ``--empty`` (``negative`` or
``skip``: Roboflow's empty files are often unlabelled, not verified normal).

Groups (what must never cross splits): ``auto`` takes the radiograph a Roboflow
augmented copy came from (the name before ``.rf.``; ``101`` and ``101_jpg`` stay
different), then the patient id when that name follows GRAZPEDWRI-DX's
``<patient>_<timehash>_<study>_...`` pattern; ``roboflow``, ``patient`` and ``stem``
force one rule; ``regex:PATTERN`` takes the first capture group.

The helpers at the top (manifest, links, box clipping, output folder) are shared
with fracatlas_to_yolo.py and mura_to_yolo.py.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

from bone_r.dataset import (
    IngestError,
    LabelError,
    label_path_for,
    link_original,
    prepare_output,
    read_label_rows,
    write_manifest,
    xyxy_to_yolo,
)
from bone_r.image import IMAGE_SUFFIXES
from bone_r.runs import tqdm_bar

# --------------------------------------------------------------------------- shared helpers

ROBOFLOW_SEP = ".rf."
GRAZ_PATTERN = re.compile(r"^(\d+)_\d+_\d+_")  # <patient>_<timehash>_<study>_<side>-<projection>_<sex><age>


def roboflow_stem(stem: str) -> str:
    """The radiograph a Roboflow augmented copy came from: the name before '.rf.' (else the stem)."""
    return stem.split(ROBOFLOW_SEP, 1)[0] if ROBOFLOW_SEP in stem else stem


def group_for(stem: str, rule: str = "auto") -> str:
    """The group id of an image named `stem` under `rule` (see the module docstring)."""
    if rule == "stem":
        return stem
    if rule == "roboflow":
        return roboflow_stem(stem)
    base = roboflow_stem(stem)
    if rule == "patient":
        match = GRAZ_PATTERN.match(base)
        if not match:
            raise IngestError(f"--group patient: '{stem}' does not start with '<patient>_<timehash>_<study>_'")
        return match.group(1)
    if rule == "auto":
        match = GRAZ_PATTERN.match(base)
        return match.group(1) if match else base
    if rule.startswith("regex:"):
        match = re.search(rule[len("regex:") :], stem)
        if not match or not match.groups():
            raise IngestError(f"--group {rule}: no capture group matched '{stem}'")
        return match.group(1)
    raise IngestError(f"unknown group rule '{rule}': use auto, roboflow, patient, stem or regex:PATTERN")


def check_group_rule(rule: str) -> str:
    if rule in ("auto", "roboflow", "patient", "stem"):
        return rule
    if rule.startswith("regex:"):
        try:
            compiled = re.compile(rule[len("regex:") :])
        except re.error as err:
            raise argparse.ArgumentTypeError(f"bad regular expression in '{rule}': {err}") from None
        if compiled.groups < 1:
            raise argparse.ArgumentTypeError(f"'{rule}' needs a capture group: the group id is its first group")
        return rule
    raise argparse.ArgumentTypeError(f"unknown group rule '{rule}': use auto, roboflow, patient, stem or regex:PATTERN")


def unique_names(paths: list[Path], root: Path) -> dict[Path, str]:
    """A flat, unique stem for each image: its own stem, or (on a clash) its path inside `root` joined by '__'."""
    by_stem: dict[str, list[Path]] = {}
    for p in paths:
        by_stem.setdefault(p.stem, []).append(p)
    names: dict[Path, str] = {}
    for stem, group in by_stem.items():
        for p in group:
            names[p] = stem if len(group) == 1 else "__".join(p.relative_to(root).with_suffix("").parts)
    if len(set(names.values())) != len(names):
        raise IngestError(f"cannot give the images under {root} unique names")
    return names


# --------------------------------------------------------------------------- YOLO export


def read_class_names(export: Path) -> list[str] | None:
    """Class names from the export's data.yaml or meta.yaml (list or {index: name}); None when absent."""
    import yaml

    candidates = sorted(export.glob("*.yaml")) + sorted(export.glob("*/*.yaml"))
    for path in candidates:
        if path.name not in ("data.yaml", "meta.yaml", "dataset.yaml"):
            continue
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise IngestError(f"{path} is not valid YAML ({err.__class__.__name__})") from None
        if not isinstance(data, dict) or "names" not in data:
            continue
        names = data["names"]
        if isinstance(names, dict):
            size = max(int(k) for k in names) + 1 if names else 0
            out = [f"class{i}" for i in range(size)]
            for k, v in names.items():
                out[int(k)] = str(v)
            return out
        if isinstance(names, list):
            return [str(n) for n in names]
        raise IngestError(f"{path}: 'names' is neither a list nor a mapping")
    return None


def find_images(export: Path) -> list[Path]:
    """Images under `export` that sit inside an 'images' folder (any depth), sorted."""
    found = []
    for path in sorted(export.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and "images" in path.relative_to(export).parts[:-1]:
            found.append(path)
    return found


def parse_mapping(text: str, what: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"{what}: '{item}' is not NAME=REGION")
        key, value = (s.strip() for s in item.split("=", 1))
        out[key] = value
    return out


def select_classes(args: argparse.Namespace, names: list[str] | None) -> set[int] | None:
    """The chosen class indices (None = every class)."""
    if args.all_classes:
        return None
    if args.classes is not None:
        try:
            chosen = {int(s) for s in args.classes.split(",") if s.strip()}
        except ValueError:
            raise IngestError(f"--classes takes comma-separated indices, got {args.classes!r}") from None
        if names is not None:
            bad = sorted(i for i in chosen if i >= len(names))
            if bad:
                raise IngestError(f"--classes {bad} out of range: the export has {len(names)} classes {names}")
        return chosen
    wanted = [s.strip() for s in args.class_names.split(",") if s.strip()]
    if names is None:
        raise IngestError("--class-names needs the export's data.yaml or meta.yaml with 'names'; none was found (use --classes)")
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise IngestError(f"unknown class name(s) {unknown}; the export's classes are: {', '.join(names)}")
    return {names.index(w) for w in wanted}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("export", type=Path, help="the export's folder (read only)")
    p.add_argument("out", type=Path, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--source", help="source name recorded per image (default: the export folder's name)")
    pick = p.add_mutually_exclusive_group(required=True)
    pick.add_argument("--classes", help="comma-separated class indices that mark a fracture, e.g. 3 or 0,2")
    pick.add_argument("--class-names", help="comma-separated class names from the export's data.yaml/meta.yaml")
    pick.add_argument("--all-classes", action="store_true", help="every class marks a fracture")
    p.add_argument("--region", default="unknown", help="body region of every image (default: unknown)")
    p.add_argument("--region-by-class", default="", help="NAME=REGION,...: region of images by their kept classes (several -> mixed)")
    p.add_argument("--group", default="auto", type=check_group_rule, help="group rule: auto (default), roboflow, patient, stem or regex:PATTERN")
    p.add_argument("--empty", choices=["negative", "skip"], default="negative", help="an empty or missing label file: a negative image (default) or leave the image out (counted)")
    p.add_argument("--overwrite", action="store_true", help="clear a non-empty output folder first")
    return p


def ingest(args: argparse.Namespace) -> dict:
    export: Path = args.export
    if not export.is_dir():
        raise IngestError(f"the export folder {export} does not exist")
    source = args.source or export.resolve().name
    names = read_class_names(export)
    chosen = select_classes(args, names)
    region_by_class = parse_mapping(args.region_by_class, "--region-by-class")
    if region_by_class and names is None:
        raise IngestError("--region-by-class needs class names from the export's data.yaml/meta.yaml")
    unknown = [k for k in region_by_class if names and k not in names]
    if unknown:
        raise IngestError(f"--region-by-class: unknown class name(s) {unknown}; the export's classes are: {', '.join(names or [])}")
    images = find_images(export)
    if not images:
        raise IngestError(f"no images found under {export} (expected them inside an 'images' folder)")
    prepare_output(args.out, args.overwrite, [export])
    flat = unique_names(images, export)
    rows: list[dict] = []
    stats = Counter()
    dropped_by_class: Counter = Counter()
    for image in tqdm_bar(images, desc=f"ingest {source}", unit="img"):
        stats["images_found"] += 1
        label_file = label_path_for(image)
        try:
            parsed = read_label_rows(label_file) if label_file.is_file() else None
        except LabelError as err:
            raise IngestError(str(err)) from None
        if parsed is None:
            stats["no_label_file"] += 1
        boxes, kept_classes, degenerate = [], set(), 0
        for row in parsed or []:
            cls = row.cls
            if chosen is not None and cls not in chosen:
                dropped_by_class[names[cls] if names and cls < len(names) else str(cls)] += 1
                continue
            if names is not None and cls >= len(names):
                raise IngestError(f"{label_file}: class {cls} is out of range for the export's {len(names)} classes")
            box = row.clipped()
            if box is None:
                degenerate += 1
                continue
            boxes.append(box)
            kept_classes.add(cls)
            stats["polygon_rows"] += not row.is_box
        stats["degenerate_boxes"] += degenerate
        if not parsed:  # empty or missing label file
            if args.empty == "skip":
                stats["skipped_empty_label"] += 1
                continue
            note = "empty label file" if parsed is not None else "no label file"
            stats["empty_as_negative"] += 1
        elif not boxes and degenerate:
            # it was marked as a fracture but no usable box is left: neither a positive nor a negative
            stats["skipped_all_boxes_degenerate"] += 1
            continue
        elif not boxes:
            note = "only other classes"
        else:
            note = ""
        name = flat[image]
        dest = args.out / "images" / (name + image.suffix.lower())
        link_original(image, dest)
        label_out = args.out / "labels" / (name + ".txt")
        label_out.parent.mkdir(parents=True, exist_ok=True)
        label_out.write_text("".join(xyxy_to_yolo(b) + "\n" for b in boxes))
        if region_by_class and kept_classes:
            found = sorted({region_by_class.get(names[c], args.region) for c in kept_classes})
            region = found[0] if len(found) == 1 else "mixed"
            regions = ";".join(found)
        else:
            region, regions = args.region, args.region
        rows.append(
            {
                "image": dest.relative_to(args.out).as_posix(),
                "source": source,
                "region": region,
                "regions": regions,
                "group": group_for(image.stem, args.group),
                "label": int(bool(boxes)),
                "boxes": len(boxes),
                "weak": 0,
                "original": image.relative_to(export).as_posix(),
                "note": note,
            }
        )
        stats["positives" if boxes else "negatives"] += 1
        stats["boxes"] += len(boxes)
    write_manifest(args.out / "manifest.csv", rows)
    stats["written"] = len(rows)
    stats["groups"] = len({r["group"] for r in rows})
    return {"source": source, "stats": stats, "dropped_by_class": dropped_by_class, "classes": names, "chosen": chosen}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        result = ingest(args)
    except IngestError as err:
        print(f"ingest_yolo: error: {err}", file=sys.stderr)
        return 2
    s, names, chosen = result["stats"], result["classes"], result["chosen"]
    kept = "all classes" if chosen is None else ", ".join(f"{i}:{names[i]}" if names and i < len(names) else str(i) for i in sorted(chosen))
    print(f"ingest_yolo: {result['source']} -> {args.out}")
    print(f"  fracture classes: {kept}")
    print(
        f"  images found {s['images_found']}, written {s['written']} ({s['positives']} positive, {s['negatives']} negative), "
        f"{s['boxes']} boxes, {s['groups']} groups"
    )
    print(f"  polygon rows turned into boxes: {s['polygon_rows']}; degenerate boxes dropped: {s['degenerate_boxes']}")
    if result["dropped_by_class"]:
        print("  rows of other classes dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(result["dropped_by_class"].items())))
    print(
        f"  empty or missing label files ({s['no_label_file']} missing): kept as negatives {s['empty_as_negative']}, "
        f"left out (--empty skip) {s['skipped_empty_label']}"
    )
    if s["skipped_all_boxes_degenerate"]:
        print(f"  left out because every fracture box was degenerate: {s['skipped_all_boxes_degenerate']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
