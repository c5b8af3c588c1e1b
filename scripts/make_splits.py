"""Ingested (and harmonized) sources -> one dataset tree with group-aware, stratified splits.

    python scripts/make_splits.py data/work/harmonized/fracatlas data/work/harmonized/proximal-femur --out data/merged
    python scripts/make_splits.py --verify data/merged

Each INPUT folder holds ``manifest.csv`` (image, source, region, group, label,
...; written by the ingest scripts) with its images and ``labels/*.txt``. A
manifest's image is found by its path or, after harmonization changed the
suffix, by its stem (``images/x.jpg`` -> ``images/x.png``).

Splitting: a group (a patient, or the radiograph behind Roboflow's augmented
copies) never crosses splits. Groups that share a byte-identical image (same
sha256) are merged first, so an exact duplicate cannot leak; so are groups whose
images are near-identical (cosine similarity of 24x24 thumbnails >= 0.96 by
default: re-encoded or re-cropped copies of one radiograph, repeat exposures),
which catches copies that byte hashes miss. After the split is drawn, groups
holding a mirrored or 90-degree-rotated copy of each other's image (the best
cosine over the 8 flips and rotations of the thumbnail, same threshold) are
merged too and moved to the earliest split of their members (train, then val,
then test), so every other image keeps its split. A byte-identical image labelled both
positive and negative keeps only its positive copies (``--label-conflicts``). Strata are source x
region x label (a group is positive when any of its images is); each stratum's
groups are shuffled with the seed and cut by the ratios, and a stratum with at
least 3 groups gets at least one group in val and in test. The split is checked
again from the written rows: a group or an image hash in two splits is an error.

OUT (empty, or cleared with --overwrite) receives ``images/{train,val,test}/<source>__<stem>.<ext>``
(hard links when possible, else copies; ``--copy``/``--symlink``), ``labels/...``,
``splits.csv`` (path, split, source, region, group, label, sha256, regions, boxes,
weak, source_group, original), ``dataset.yaml`` (Ultralytics; no ``path`` key, so
it is relative to its own folder), ``contract.json`` (the inputs' harmonization
contract), ``counts.csv`` and ``build_info.json``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from bone_r.dataset import IngestError, LabelError, is_inside, prepare_output, read_label_rows
from bone_r.image import IMAGE_SUFFIXES
from bone_r.runs import tqdm_bar

SPLITS = ("train", "val", "test")
SPLIT_FIELDS = ["path", "split", "source", "region", "group", "label", "sha256", "regions", "boxes", "weak", "source_group", "original"]
REQUIRED = ("image", "source", "region", "group", "label")
EPS = 1e-6


class SplitError(Exception):
    """Bad input or an unsafe split: one line (or a short list) for a person."""


@dataclass
class Item:
    source: str
    region: str
    regions: str
    group: str  # source-prefixed, before duplicate merging
    label: int
    boxes: int
    weak: int
    original: str
    image: Path
    label_file: Path
    stem: str
    sha256: str = ""
    split: str = ""
    final_group: str = ""
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- reading


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def resolve_image(folder: Path, rel: str) -> Path | None:
    """The manifest's image: its own path, else the one image beside it with the same stem."""
    path = folder / rel
    if path.is_file():
        return path
    if not path.parent.is_dir():
        return None
    found = [p for p in path.parent.glob(f"{path.stem}.*") if p.suffix.lower() in IMAGE_SUFFIXES and p.stem == path.stem and not p.name.endswith(".tmp.png")]
    if len(found) > 1:
        raise SplitError(f"{folder}: several images have the stem of {rel}: {sorted(p.name for p in found)}")
    return found[0] if found else None


def label_file_for(folder: Path, rel: str) -> Path:
    parts = list(Path(rel).parts)
    if "images" not in parts[:-1]:
        raise SplitError(f"{folder}/manifest.csv: image {rel} is not inside an 'images' folder, so it has no labels/ twin")
    parts[parts.index("images")] = "labels"
    return folder.joinpath(*parts).with_suffix(".txt")


def load_input(folder: Path, allow_missing: bool, stats: Counter) -> tuple[list[Item], dict | None]:
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise SplitError(f"{folder} has no manifest.csv (run an ingest script on the source first)")
    with open(manifest, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing_cols = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing_cols:
            raise SplitError(f"{manifest} lacks the column(s) {missing_cols}")
        records = list(reader)
    contract = None
    if (folder / "contract.json").is_file():
        contract = json.loads((folder / "contract.json").read_text())
    items = []
    for n, rec in enumerate(records, 2):
        where = f"{manifest}:{n}"
        image = resolve_image(folder, rec["image"])
        if image is None:
            if allow_missing:
                stats[f"missing_image:{rec['source']}"] += 1
                continue
            raise SplitError(f"{where}: the image {rec['image']} is not in {folder} (pass --allow-missing to leave it out, counted)")
        label_file = label_file_for(folder, rec["image"])
        if not label_file.is_file():
            raise SplitError(f"{where}: no label file {label_file.relative_to(folder)}")
        try:
            rows = read_label_rows(label_file, boxes_only=True, single_class=True, inside=True)
        except LabelError as err:
            raise SplitError(str(err)) from None
        try:
            label = int(rec["label"])
        except ValueError:
            raise SplitError(f"{where}: label must be 0 or 1, got {rec['label']!r}") from None
        if label not in (0, 1) or label != int(bool(rows)):
            raise SplitError(f"{where}: label {rec['label']} disagrees with {len(rows)} box(es) in {label_file.name}")
        if rec.get("boxes", "") not in ("", None) and int(rec["boxes"]) != len(rows):
            raise SplitError(f"{where}: the manifest says {rec['boxes']} boxes, {label_file.name} has {len(rows)}")
        source, group = rec["source"].strip(), rec["group"].strip()
        if not source or not group or "__" in source:
            raise SplitError(f"{where}: empty source or group, or '__' in the source name")
        items.append(
            Item(
                source=source,
                region=rec["region"].strip() or "unknown",
                regions=(rec.get("regions") or rec["region"]).strip(),
                group=f"{source}:{group}",
                label=label,
                boxes=len(rows),
                weak=int(rec.get("weak") or 0),
                original=rec.get("original", ""),
                image=image,
                label_file=label_file,
                stem=image.stem,
            )
        )
    return items, contract


# --------------------------------------------------------------------------- grouping and splitting


def resolve_label_conflicts(items: list[Item], policy: str) -> tuple[list[Item], list[dict]]:
    """Byte-identical images labelled both positive and negative: keep, drop the negative copies, or stop.

    A box drawn on an image is a more specific claim than its presence in a
    'normal' folder, so by default the negative copies go (each one reported).
    """
    by_hash: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        by_hash[it.sha256].append(it)
    conflicts = [sorted(v, key=lambda i: (i.group, i.stem)) for v in by_hash.values() if len({i.label for i in v}) > 1]
    conflicts.sort(key=lambda v: (v[0].group, v[0].stem))
    if conflicts and policy == "error":
        first = conflicts[0]
        raise SplitError(f"{len(conflicts)} identical image(s) are labelled both positive and negative, e.g. " + ", ".join(f"{i.source}__{i.stem} ({i.label})" for i in first))
    report = [{"sha256": v[0].sha256, "positive": [f"{i.source}__{i.stem}" for i in v if i.label], "negative": [f"{i.source}__{i.stem}" for i in v if not i.label]} for v in conflicts]
    if policy == "drop-negatives":
        dropped = {id(i) for v in conflicts for i in v if not i.label}
        items = [i for i in items if id(i) not in dropped]
    return items, report


THUMB = 24  # side of the thumbnail compared for near-duplicates
# Checked on known pairs and non-pairs (JOURNAL 2026-11-29): both mirrored Science-Research pairs score >= 0.968 and
# no two of 562k proximal-femur images of different radiographs reach it except byte-identical ones.
DEFAULT_NEAR_DUP = 0.96


def fingerprint(data: bytes) -> np.ndarray:
    """A unit vector from a THUMB x THUMB thumbnail (mean removed): near-identical images give cosine ~1."""
    from bone_r.image import load_image

    gray = load_image(data).pixels.astype(np.float32)
    thumb = cv2.resize(gray, (THUMB, THUMB), interpolation=cv2.INTER_AREA).ravel()
    thumb -= thumb.mean()
    norm = float(np.linalg.norm(thumb))
    return thumb / norm if norm > 0 else thumb  # a flat image matches nothing


def dihedral_variants(prints: np.ndarray) -> np.ndarray:
    """(8, n, THUMB*THUMB): every fingerprint under the 4 rotations of its thumbnail and of its mirror image.

    Rotating or mirroring an image and then thumbnailing it equals doing the same to its thumbnail (the
    thumbnail is a square resize), and a permutation keeps a unit vector a unit vector."""
    squares = prints.reshape(len(prints), THUMB, THUMB)
    return np.stack([np.rot90(squares[:, :, ::-1] if mirror else squares, k, axes=(1, 2)).reshape(len(prints), -1)
                     for mirror in (False, True) for k in range(4)])


def near_duplicate_pairs(prints: np.ndarray, threshold: float, block: int = 1024,
                         any_orientation: bool = False) -> list[tuple[int, int, float]]:
    """(i, j, cosine) for i < j with cosine >= threshold, in blocks so memory stays small.

    `any_orientation`: the cosine is the best over the 8 flips and 90-degree rotations of j's thumbnail,
    so a mirrored or rotated copy matches its original."""
    prints = prints.astype(np.float32)
    variants = dihedral_variants(prints) if any_orientation else prints[None]
    pairs = []
    for start in range(0, len(prints), block):
        sims = np.max(np.stack([prints[start : start + block] @ v.T for v in variants]), axis=0)
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows, cols, strict=True):
            i = start + int(r)
            if i < int(c):
                pairs.append((i, int(c), float(sims[r, c])))
    return pairs


class GroupUnion:
    """Union-find over group names; each union of two different groups is recorded as (kept, merged, reason)."""

    def __init__(self, groups):
        self.parent = {g: g for g in groups}
        self.merges: list[tuple[str, str, str]] = []

    def find(self, g: str) -> str:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, g1: str, g2: str, reason: str) -> None:
        a, b = self.find(g1), self.find(g2)
        if a != b:
            keep, drop = sorted((a, b))
            self.parent[drop] = keep
            self.merges.append((keep, drop, reason))


def pair_reason(kind: str, sim: float, a: Item, b: Item) -> str:
    return f"{kind} {sim:.4f} ({a.source}__{a.stem} ~ {b.source}__{b.stem})"


def merge_duplicate_groups(items: list[Item], near_pairs: list[tuple[int, int, float]] = ()) -> list[tuple[str, str, str]]:
    """Give every item its final group: groups sharing a byte-identical image, or a near-identical one
    (`near_pairs` of item indices), become one. Returns the merges made as (kept, merged, reason)."""
    groups = GroupUnion(it.group for it in items)
    first_by_hash: dict[str, str] = {}
    for it in sorted(items, key=lambda i: (i.group, i.stem)):
        groups.union(first_by_hash.setdefault(it.sha256, it.group), it.group, "identical")
    for i, j, sim in sorted(near_pairs, key=lambda p: (items[p[0]].group, items[p[1]].group)):
        groups.union(items[i].group, items[j].group, pair_reason("near-identical", sim, items[i], items[j]))
    for it in items:
        it.final_group = groups.find(it.group)
    return groups.merges


def fold_in_reoriented_copies(items: list[Item], assignment: dict[str, str],
                              pairs: list[tuple[int, int, float]]) -> list[tuple[str, str, str]]:
    """Merge the groups of mirrored or rotated copies (`pairs` of item indices) after the split was drawn.

    The merged group goes to the earliest split any member was in (train, then val, then test): every other
    group keeps its split, and no image a model was trained on moves into val or test. `assignment` and
    each item's final group are updated in place; returns the merges made."""
    groups = GroupUnion(assignment)
    for i, j, sim in sorted(pairs, key=lambda p: (items[p[0]].final_group, items[p[1]].final_group)):
        groups.union(items[i].final_group, items[j].final_group, pair_reason("mirrored/rotated copy", sim, items[i], items[j]))
    order = {s: i for i, s in enumerate(SPLITS)}
    families: dict[str, list[str]] = defaultdict(list)
    for g in assignment:
        families[groups.find(g)].append(g)
    for root, members in families.items():
        split = min((assignment[g] for g in members), key=order.__getitem__)
        for g in members:
            del assignment[g]
        assignment[root] = split
    for it in items:
        it.final_group = groups.find(it.final_group)
    return groups.merges


def allocate(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, val, test) group counts for a stratum of n groups.

    Rounded shares of n; a stratum of 3 or more groups gets at least one group in
    val and in test (where their ratio is not 0) and keeps at least one for train.
    """
    _, r_val, r_test = ratios
    n_val, n_test = math.floor(n * r_val + 0.5), math.floor(n * r_test + 0.5)
    if n >= 3:
        n_val = max(n_val, 1) if r_val > 0 else n_val
        n_test = max(n_test, 1) if r_test > 0 else n_test
    while n_val + n_test > max(n - 1, 0):  # train keeps at least one group (n >= 3 leaves room for 1/1/1)
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n - n_val - n_test, n_val, n_test


def group_keys(items: list[Item]) -> dict[str, tuple[str, str, int]]:
    """Each final group's stratum: (its most common source, most common region, positive if any image is)."""
    members: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        members[it.final_group].append(it)

    def most_common(values: list[str]) -> str:
        counts = Counter(values)
        return min(counts, key=lambda v: (-counts[v], v))

    return {g: (most_common([m.source for m in ms]), most_common([m.region for m in ms]), max(m.label for m in ms)) for g, ms in members.items()}


def assign_splits(items: list[Item], ratios: tuple[float, float, float], seed: int) -> dict[str, str]:
    """final group -> split, stratified by source x region x label, seeded."""
    keys = group_keys(items)
    strata: dict[tuple, list[str]] = defaultdict(list)
    for g, key in keys.items():
        strata[key].append(g)
    assignment = {}
    for key in sorted(strata):
        groups = sorted(strata[key])
        random.Random(f"{seed}|{key[0]}|{key[1]}|{key[2]}").shuffle(groups)
        _, n_val, n_test = allocate(len(groups), ratios)
        for i, g in enumerate(groups):
            assignment[g] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return assignment


def check_no_leak(rows: list[dict]) -> None:
    """Raise SplitError when a group or an identical image (sha256) is in more than one split."""
    problems = []
    for column in ("group", "sha256"):
        seen: dict[str, set] = defaultdict(set)
        for row in rows:
            seen[row[column]].add(row["split"])
        crossing = sorted(k for k, v in seen.items() if len(v) > 1)
        for k in crossing[:20]:
            problems.append(f"{column} {k} is in {sorted(seen[k])}")
        if len(crossing) > 20:
            problems.append(f"... and {len(crossing) - 20} more {column}s")
    if problems:
        raise SplitError("a group crosses splits (refusing to write this split):\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------- writing


def place(src: Path, dst: Path, mode: str) -> str:
    """Put `src` at `dst` by hard link (fallback copy), copy or symlink; returns what was done."""
    if mode == "symlink":
        os.symlink(src.resolve(), dst)
        return "symlink"
    if mode == "hardlink" and not src.is_symlink():  # never hard-link into a source set's own files
        try:
            os.link(src, dst)
            return "hardlink"
        except OSError:
            pass  # another filesystem, or links not allowed: copy instead
    shutil.copyfile(src, dst)
    return "copy"


def counts_table(rows: list[dict]) -> list[dict]:
    """Images, positive images, boxes and groups per split x source x region x label."""
    acc: dict[tuple, dict] = {}
    for row in rows:
        key = (row["split"], row["source"], row["region"], int(row["label"]))
        entry = acc.setdefault(key, {"images": 0, "boxes": 0, "groups": set()})
        entry["images"] += 1
        entry["boxes"] += int(row["boxes"])
        entry["groups"].add(row["group"])
    order = {s: i for i, s in enumerate(SPLITS)}
    return [
        {"split": k[0], "source": k[1], "region": k[2], "label": k[3], "images": v["images"], "boxes": v["boxes"], "groups": len(v["groups"])}
        for k, v in sorted(acc.items(), key=lambda kv: (order[kv[0][0]], kv[0][1:]))
    ]


def format_table(table: list[dict]) -> str:
    header = f"{'split':<6} {'source':<24} {'region':<12} {'label':>5} {'images':>7} {'boxes':>6} {'groups':>7}"
    lines = [header, "-" * len(header)]
    for r in table:
        lines.append(f"{r['split']:<6} {r['source']:<24} {r['region']:<12} {r['label']:>5} {r['images']:>7} {r['boxes']:>6} {r['groups']:>7}")
    totals = defaultdict(lambda: [0, 0, 0])
    for r in table:
        t = totals[r["split"]]
        t[0] += r["images"]
        t[1] += r["images"] if r["label"] else 0
        t[2] += r["boxes"]
    lines.append("-" * len(header))
    for split in SPLITS:
        if split in totals:
            images, positives, boxes = totals[split]
            lines.append(f"{split:<6} total: {images} images, {positives} positive, {images - positives} negative, {boxes} boxes")
    return "\n".join(lines)


DATASET_YAML = """# Bone-R merged fracture dataset (Ultralytics format), written by scripts/make_splits.py.
# No 'path' key: Ultralytics resolves train/val/test relative to this file's folder.
# Split manifest: splits.csv beside this file (group-aware: no patient/radiograph crosses splits).
train: images/train
val: images/val
test: images/test
nc: 1
names:
  0: fracture
"""


def parse_ratios(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratios are three numbers, got {text!r}") from None
    if len(values) != 3 or any(v < 0 or not math.isfinite(v) for v in values) or abs(sum(values) - 1) > 1e-6 or values[0] <= 0:
        raise argparse.ArgumentTypeError(f"ratios must be three non-negative numbers train,val,test summing to 1 with train > 0, got {text!r}")
    return values  # type: ignore[return-value]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("inputs", nargs="*", type=Path, help="ingested source folders (manifest.csv, images/, labels/)")
    p.add_argument("--out", type=Path, help="output dataset folder (must be empty unless --overwrite)")
    p.add_argument("--ratios", type=parse_ratios, default=(0.70, 0.15, 0.15), help="train,val,test fractions of groups per stratum (default 0.70,0.15,0.15)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--copy", action="store_true", help="copy images (default: hard links when on the same filesystem, else copies)")
    how.add_argument("--symlink", action="store_true", help="symbolic links to the input images")
    p.add_argument("--overwrite", action="store_true", help="clear a non-empty output folder first")
    p.add_argument("--allow-missing", action="store_true", help="leave out (and count) manifest images missing from an input, e.g. ones that failed to decode")
    p.add_argument(
        "--label-conflicts",
        choices=["drop-negatives", "keep", "error"],
        default="drop-negatives",
        help="byte-identical images labelled positive and negative: drop the negative copies (default), keep all, or stop",
    )
    p.add_argument(
        "--near-dup-threshold",
        type=float,
        default=DEFAULT_NEAR_DUP,
        help=f"also merge groups whose images' {THUMB}x{THUMB} thumbnails have cosine similarity >= this "
        "(re-encoded or re-cropped copies, repeat views), and after the split is drawn, groups holding a mirrored or "
        "90-degree-rotated copy (the best of 8 orientations; moved to the earliest split); default 0.96; 0 turns both off",
    )
    p.add_argument("--verify", type=Path, metavar="TREE", help="only check an existing tree's splits.csv (files, hashes, labels, no group or hash in two splits)")
    return p


def make_splits(args: argparse.Namespace) -> dict:
    started = time.time()
    if not args.inputs:
        raise SplitError("no input folders given")
    out: Path = args.out
    for folder in args.inputs:
        if not folder.is_dir():
            raise SplitError(f"the input folder {folder} does not exist")
        if is_inside(out, folder) or is_inside(folder, out):
            raise SplitError(f"the output folder {out} overlaps the input {folder}")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise SplitError(f"the output folder {out} is not empty: pass --overwrite to clear it, or choose another folder")
    stats: Counter = Counter()
    items: list[Item] = []
    contracts = {}
    for folder in args.inputs:
        found, contract = load_input(folder, args.allow_missing, stats)
        if not found:
            raise SplitError(f"{folder}/manifest.csv lists no usable image")
        contracts[str(folder)] = contract
        items.extend(found)
    with_contract = {k: v for k, v in contracts.items() if v is not None}
    if with_contract and len(with_contract) != len(contracts):
        raise SplitError("some inputs are harmonized (contract.json) and some are not: " + ", ".join(k for k, v in contracts.items() if v is None))
    if len({json.dumps(v, sort_keys=True) for v in with_contract.values()}) > 1:
        raise SplitError("the inputs were harmonized under different contracts: " + "; ".join(f"{k}: {v}" for k, v in with_contract.items()))
    contract = next(iter(with_contract.values()), None)

    original_items = list(items)
    names = Counter(f"{it.source}__{it.stem}" for it in items)
    clashes = [n for n, c in names.items() if c > 1]
    if clashes:
        raise SplitError(f"{len(clashes)} output names repeat (same source and stem), e.g. {clashes[0]}: give the inputs distinct source names")
    prints = []
    for it in tqdm_bar(items, desc="hash + fingerprint", unit="img"):
        data = it.image.read_bytes()
        it.sha256 = hashlib.sha256(data).hexdigest()
        try:
            prints.append(fingerprint(data) if args.near_dup_threshold > 0 else None)
        except ValueError as err:  # ImageDecodeError
            raise SplitError(f"{it.image}: cannot be decoded: {err}") from None
    items, conflicts = resolve_label_conflicts(items, args.label_conflicts)
    near_pairs = []
    if args.near_dup_threshold > 0:
        kept = {id(it) for it in items}
        matrix = np.stack([p for p, it in zip(prints, original_items, strict=True) if id(it) in kept])
        near_pairs = [p for p in near_duplicate_pairs(matrix, args.near_dup_threshold) if items[p[0]].group != items[p[1]].group]
    merges = merge_duplicate_groups(items, near_pairs)
    assignment = assign_splits(items, args.ratios, args.seed)
    copy_pairs, moved = [], []
    if args.near_dup_threshold > 0:  # after the draw, so that the earlier splits stay as they were
        copy_pairs = [p for p in near_duplicate_pairs(matrix, args.near_dup_threshold, any_orientation=True)
                      if items[p[0]].final_group != items[p[1]].final_group]
        drawn = {id(it): assignment[it.final_group] for it in items}
        merges += fold_in_reoriented_copies(items, assignment, copy_pairs)
        moved = [{"image": f"{it.source}__{it.stem}", "from": drawn[id(it)], "to": assignment[it.final_group]}
                 for it in items if drawn[id(it)] != assignment[it.final_group]]
    rows = []
    for it in items:
        it.split = assignment[it.final_group]
        name = f"{it.source}__{it.stem}{it.image.suffix.lower()}"
        rows.append(
            {
                "path": f"images/{it.split}/{name}",
                "split": it.split,
                "source": it.source,
                "region": it.region,
                "group": it.final_group,
                "label": it.label,
                "sha256": it.sha256,
                "regions": it.regions,
                "boxes": it.boxes,
                "weak": it.weak,
                "source_group": it.group,
                "original": it.original,
                "_item": it,
            }
        )
    order = {s: i for i, s in enumerate(SPLITS)}
    rows.sort(key=lambda r: (order[r["split"]], r["path"]))
    check_no_leak(rows)

    prepare_output(out, args.overwrite, args.inputs)
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True)
        (out / "labels" / split).mkdir(parents=True)
    mode = "copy" if args.copy else "symlink" if args.symlink else "hardlink"
    done = Counter()
    for row in tqdm_bar(rows, desc="write", unit="img"):
        it = row.pop("_item")
        done[place(it.image, out / row["path"], mode)] += 1
        shutil.copyfile(it.label_file, out / "labels" / row["split"] / (Path(row["path"]).stem + ".txt"))
    with open(out / "splits.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SPLIT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    table = counts_table(rows)
    with open(out / "counts.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    (out / "dataset.yaml").write_text(DATASET_YAML)
    if contract is not None:
        (out / "contract.json").write_text(json.dumps(contract, indent=2, sort_keys=True) + "\n")
    groups_per_split = {s: len({r["group"] for r in rows if r["split"] == s}) for s in SPLITS}
    info = {
        "tool": "scripts/make_splits.py",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": [str(f) for f in args.inputs],
        "seed": args.seed,
        "ratios": dict(zip(SPLITS, args.ratios, strict=True)),
        "link": dict(done),
        "images": len(rows),
        "groups": len({r["group"] for r in rows}),
        "groups_per_split": groups_per_split,
        "near_dup_threshold": args.near_dup_threshold,
        "duplicate_merges": [list(m) for m in merges],
        "near_duplicate_pairs": len(near_pairs),
        "reoriented_copy_pairs": len(copy_pairs),
        "moved_by_reoriented_copies": moved,
        "largest_group": max(Counter(r["group"] for r in rows).values()),
        "label_conflicts": {"policy": args.label_conflicts, "images": conflicts},
        "missing_images_left_out": {k.split(":", 1)[1]: v for k, v in stats.items() if k.startswith("missing_image:")},
        "contract": contract,
        "splits_csv_sha256": sha256_file(out / "splits.csv"),
        "counts": table,
        "seconds": round(time.time() - started, 1),
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def verify_tree(tree: Path, rehash: bool = True, near_dup_threshold: float | None = None) -> list[str]:
    """Problems found in a written tree (empty list = fine): reads splits.csv and the files only.

    Besides the recorded groups and hashes, it fingerprints every image anew and reports any two images in
    different splits that are copies of each other in any of the 8 orientations (threshold: the build's,
    from build_info.json, unless given; 0 skips this)."""
    problems: list[str] = []
    splits_csv = tree / "splits.csv"
    if not splits_csv.is_file():
        return [f"{splits_csv} does not exist"]
    with open(splits_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return [f"{splits_csv} has no rows"]
    try:
        check_no_leak(rows)
    except SplitError as err:
        problems.append(str(err))
    on_disk = {p.relative_to(tree).as_posix() for s in SPLITS for p in (tree / "images" / s).glob("*")}
    listed = {r["path"] for r in rows}
    if on_disk != listed:
        problems.append(f"images on disk and in splits.csv differ: {len(on_disk - listed)} unlisted, {len(listed - on_disk)} missing")
    for row in tqdm_bar(rows, desc="verify", unit="img"):
        path = tree / row["path"]
        if row["split"] not in SPLITS or Path(row["path"]).parts[:2] != ("images", row["split"]):
            problems.append(f"{row['path']}: split {row['split']!r} does not match its folder")
            continue
        if not path.is_file():
            continue  # counted above
        if rehash and sha256_file(path) != row["sha256"]:
            problems.append(f"{row['path']}: sha256 differs from splits.csv")
        label_file = tree / "labels" / row["split"] / (path.stem + ".txt")
        try:
            boxes = read_label_rows(label_file, boxes_only=True, single_class=True, inside=True) if label_file.is_file() else None
        except LabelError as err:
            problems.append(str(err))
            continue
        if boxes is None:
            problems.append(f"{row['path']}: no label file")
        elif len(boxes) != int(row["boxes"]) or int(row["label"]) != int(bool(boxes)):
            problems.append(f"{row['path']}: label {row['label']}/{row['boxes']} boxes in splits.csv, {len(boxes)} in the label file")
    if not (tree / "dataset.yaml").is_file():
        problems.append("dataset.yaml is missing")
    if near_dup_threshold is None:
        try:
            near_dup_threshold = float(json.loads((tree / "build_info.json").read_text())["near_dup_threshold"])
        except (OSError, ValueError, KeyError):
            near_dup_threshold = DEFAULT_NEAR_DUP
    present = [r for r in rows if (tree / r["path"]).is_file()]
    if near_dup_threshold > 0 and present:
        prints = []
        for row in tqdm_bar(present, desc="fingerprint", unit="img"):
            try:
                prints.append(fingerprint((tree / row["path"]).read_bytes()))
            except ValueError as err:
                problems.append(f"{row['path']}: cannot be decoded: {err}")
                prints.append(np.zeros(THUMB * THUMB, np.float32))
        crossing = [(i, j, sim) for i, j, sim in near_duplicate_pairs(np.stack(prints), near_dup_threshold, any_orientation=True)
                    if present[i]["split"] != present[j]["split"]]
        for i, j, sim in crossing[:20]:
            problems.append(f"{present[i]['path']} and {present[j]['path']} are copies (any orientation, cosine {sim:.4f}) in two splits")
        if len(crossing) > 20:
            problems.append(f"... and {len(crossing) - 20} more copies in two splits")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.verify:
        problems = verify_tree(args.verify)
        if problems:
            print(f"make_splits: verify {args.verify}: {len(problems)} problem(s)", file=sys.stderr)
            for p in problems[:50]:
                print(f"  {p}", file=sys.stderr)
            return 1
        with open(args.verify / "splits.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        print(f"make_splits: verify {args.verify}: OK: {len(rows)} images, {len({r['group'] for r in rows})} groups, "
              "every file matches its sha256 and labels, no group, image hash or copy in any orientation (fingerprinted anew) "
              "in two splits")
        return 0
    if args.out is None:
        print("make_splits: error: --out is required (or --verify TREE)", file=sys.stderr)
        return 2
    try:
        info = make_splits(args)
    except (SplitError, IngestError) as err:
        print(f"make_splits: error: {err}", file=sys.stderr)
        return 2
    print(f"make_splits: {info['images']} images, {info['groups']} groups -> {args.out} (seed {args.seed}, ratios {args.ratios})")
    print(format_table(info["counts"]))
    print("groups per split: " + ", ".join(f"{k} {v}" for k, v in info["groups_per_split"].items()))
    merges = info["duplicate_merges"]
    identical = [m for m in merges if m[2] == "identical"]
    near = [m for m in merges if m[2].startswith("near-identical")]
    reoriented = [m for m in merges if m[2].startswith("mirrored/rotated")]
    print(f"groups merged because they share a byte-identical image: {len(identical)}" + (f" (e.g. {identical[0][1]} -> {identical[0][0]})" if identical else ""))
    if args.near_dup_threshold > 0:
        print(
            f"groups merged because they share a near-identical image (thumbnail cosine >= {args.near_dup_threshold}): {len(near)}"
            + (f" (e.g. {near[0][1]} -> {near[0][0]}: {near[0][2]})" if near else "")
        )
        per_source = Counter(m[1].split(":", 1)[0] for m in reoriented)
        print(f"groups merged because one holds a mirrored or 90-degree-rotated copy of the other's image: {len(reoriented)}"
              + (f" ({', '.join(f'{k} {v}' for k, v in sorted(per_source.items()))}; e.g. {reoriented[0][2]})" if reoriented else ""))
        moves = Counter(f"{m['from']}->{m['to']}" for m in info["moved_by_reoriented_copies"])
        print(f"images moved to their copy's split (earliest of train, val, test): {sum(moves.values())}"
              + (f" ({', '.join(f'{k} {v}' for k, v in sorted(moves.items()))})" if moves else ""))
    print(f"largest group: {info['largest_group']} images")
    conflicts = info["label_conflicts"]["images"]
    if conflicts:
        action = {"drop-negatives": "negative copies left out", "keep": "all kept"}[args.label_conflicts]
        shown = "; ".join(f"+{','.join(c['positive'])} -{','.join(c['negative'])}" for c in conflicts[:5])
        print(f"identical images labelled both positive and negative: {len(conflicts)} ({action}): {shown}")
    if info["missing_images_left_out"]:
        print(f"left out, image missing from the input: {info['missing_images_left_out']}")
    if info["contract"] is None:
        print("WARNING: the inputs carry no contract.json (not harmonized): dataset.yaml has no contract beside it")
    print(f"files: {info['link']}; no group crosses splits (checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
