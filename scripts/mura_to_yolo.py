"""MURA study folders -> a classification tree, or a weak-box detection tree.

    python scripts/mura_to_yolo.py MURA-v1.1 data/work/mura                 # classification (default)
    python scripts/mura_to_yolo.py MURA-v1.1 data/work/mura --mode weakbox  # whole-image weak boxes

MURA's layout is ``[train|valid/]XR_<REGION>/patient<id>/study<n>_<positive|negative>/image<n>.png``;
the study's label holds for each of its images. Image names repeat across
studies, so every image gets a flat unique name
``XR_<REGION>__patient<id>__study<n>_<label>__image<n>`` (prefixed with the
top folder, e.g. ``train__``, when there is one). Links point at the originals;
nothing is written under ROOT.

- ``--mode classify``: ``OUT/positive/<name>`` and ``OUT/negative/<name>`` (the
  folder-per-class layout of torchvision's ImageFolder) and ``OUT/manifest.csv``.
- ``--mode weakbox``: ``OUT/images/<name>`` and ``OUT/labels/<name>.txt``: one
  box over the whole image (``0 0.5 0.5 1 1``) for a positive study, empty for a
  negative one; such rows have ``weak = 1`` and a note in the manifest, because
  a whole-image box says "somewhere here", not where.

The manifest has image, source, region, regions, group (= patient), label,
boxes, weak, original, note, plus patient, study and subset (train/valid or '').
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

from bone_r.dataset import MANIFEST_FIELDS, IngestError, link_original, prepare_output, write_manifest
from bone_r.image import IMAGE_SUFFIXES
from bone_r.runs import tqdm_bar

ROOT = Path(__file__).resolve().parents[1]

STUDY_RE = re.compile(r"^(study\d+)_(positive|negative)$", re.IGNORECASE)
REGION_RE = re.compile(r"^XR_([A-Z]+)$", re.IGNORECASE)
PATIENT_RE = re.compile(r"^patient\w+$", re.IGNORECASE)
WEAK_ROW = "0 0.500000 0.500000 1.000000 1.000000"
FIELDS = MANIFEST_FIELDS + ["patient", "study", "subset"]


def parse_mura_path(path: Path, root: Path) -> dict | None:
    """Region, patient, study, label and subset of an image path, or None when it is not in MURA's layout."""
    parts = path.relative_to(root).parts
    if len(parts) < 4:
        return None
    region_dir, patient, study_dir = parts[-4], parts[-3], parts[-2]
    region_m, study_m = REGION_RE.match(region_dir), STUDY_RE.match(study_dir)
    if not (region_m and study_m and PATIENT_RE.match(patient)):
        return None
    prefix = parts[:-4]
    return {
        "region": region_m.group(1).lower(),
        "region_dir": region_dir,
        "patient": patient,
        "study": study_m.group(1).lower(),
        "label": 1 if study_m.group(2).lower() == "positive" else 0,
        "subset": "/".join(prefix[-1:]),  # the folder above XR_* (train / valid), if any
        "name": "__".join(prefix[-1:] + (region_dir, patient, study_dir, path.stem)),
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("root", type=Path, help="MURA's folder (holding train/ and valid/, or the XR_* folders); read only")
    p.add_argument("out", type=Path, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--mode", choices=["classify", "weakbox"], default="classify", help="classification tree (default) or whole-image weak boxes")
    p.add_argument("--source", default="mura", help="source name recorded per image (default: mura)")
    p.add_argument("--overwrite", action="store_true", help="clear a non-empty output folder first")
    return p


def convert(args: argparse.Namespace) -> Counter:
    root: Path = args.root
    if not root.is_dir():
        raise IngestError(f"the MURA folder {root} does not exist")
    candidates = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    parsed = [(p, parse_mura_path(p, root)) for p in candidates]
    outside = [p for p, info in parsed if info is None]
    images = [(p, info) for p, info in parsed if info is not None]
    if not images:
        raise IngestError(f"no images in MURA's layout XR_<REGION>/patient<id>/study<n>_<positive|negative>/ under {root}")
    names = Counter(info["name"] for _, info in images)
    clash = [n for n, c in names.items() if c > 1]
    if clash:
        raise IngestError(f"image names repeat after flattening (e.g. {clash[0]}): is the same study under two top folders?")
    prepare_output(args.out, args.overwrite, [root])
    stats: Counter = Counter()
    rows = []
    for path, info in tqdm_bar(images, desc=f"mura ({args.mode})", unit="img"):
        label = info["label"]
        if args.mode == "classify":
            dest = args.out / ("positive" if label else "negative") / (info["name"] + path.suffix.lower())
            boxes, weak, note = 0, 0, "study-level label"
        else:
            dest = args.out / "images" / (info["name"] + path.suffix.lower())
            label_file = args.out / "labels" / (info["name"] + ".txt")
            label_file.parent.mkdir(parents=True, exist_ok=True)
            label_file.write_text(WEAK_ROW + "\n" if label else "")
            boxes, weak = (1, 1) if label else (0, 0)
            note = "weak whole-image box from the study label" if label else "negative study"
        link_original(path, dest)
        rows.append(
            {
                "image": dest.relative_to(args.out).as_posix(),
                "source": args.source,
                "region": info["region"],
                "regions": info["region"],
                "group": info["patient"],
                "label": label,
                "boxes": boxes,
                "weak": weak,
                "original": path.relative_to(root).as_posix(),
                "note": note,
                "patient": info["patient"],
                "study": info["study"],
                "subset": info["subset"],
            }
        )
        stats["positives" if label else "negatives"] += 1
        stats[f"region:{info['region']}"] += 1
    write_manifest(args.out / "manifest.csv", rows, FIELDS)
    stats["written"] = len(rows)
    stats["patients"] = len({r["patient"] for r in rows})
    stats["studies"] = len({(r["patient"], r["study"], r["region"]) for r in rows})
    stats["outside_layout"] = len(outside)
    return stats


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        s = convert(args)
    except IngestError as err:
        print(f"mura_to_yolo: error: {err}", file=sys.stderr)
        return 2
    print(f"mura_to_yolo ({args.mode}): {args.root} -> {args.out}")
    print(f"  images {s['written']}: {s['positives']} positive, {s['negatives']} negative; {s['studies']} studies, {s['patients']} patients (groups)")
    print("  regions: " + ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in sorted(s.items()) if k.startswith("region:")))
    if args.mode == "weakbox":
        print(f"  weak whole-image boxes (weak=1 in the manifest): {s['positives']}")
    if s["outside_layout"]:
        print(f"  images outside MURA's layout, not used: {s['outside_layout']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
