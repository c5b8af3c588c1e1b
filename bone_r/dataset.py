"""Datasets: the Ultralytics tree (images/, labels/, dataset.yaml), the one YOLO label reader and writer, splits.csv,
and the ground truth of a split or of a plain folder. Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bone_r.contract import Contract
from bone_r.image import ImageDecodeError, list_images, load_image
from bone_r.runs import ROOT, TrainError, sha256_file

TRUTHY = {"1", "true", "yes", "y", "t"}


class DataError(ValueError):
    """Bad input data the user can fix (a dataset yaml, its labels or splits, saved predictions, a thresholds file):
    the message says what is wrong; `errors` lists every problem found (first line is the summary)."""

    def __init__(self, message: str, errors: Sequence[str] = ()):
        super().__init__(message)
        self.errors = list(errors)


@dataclass
class GTImage:
    """One image of the evaluated split with its true boxes (original pixels)."""

    path: Path  # absolute, NOT symlink-resolved (merged trees link to the originals)
    key: str  # path relative to the dataset root (posix): the image's name in reports
    width: int
    height: int
    boxes: np.ndarray  # (n, 4) float xyxy
    label: int  # 1: fracture present (a box, or a weak image-level positive)
    source: str = "unknown"
    region: str = "unknown"
    group: str = ""
    boxes_known: bool = True  # False: image-level truth only (weak or --all-positive)


@dataclass
class GroundTruth:
    images: list[GTImage]
    split: str
    data: str  # the dataset yaml (or folder) it came from
    root: Path | None = None
    notes: list[str] = field(default_factory=list)
    splits_sha256: str | None = None
    # The contract the tree's images were already harmonized with (its contract.json), if any:
    # such images reach the model as stored (see `predict_split`).
    tree_contract: Contract | None = None
    tree_contract_path: Path | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> np.ndarray:
        return np.array([im.label for im in self.images], dtype=bool)

    @property
    def groups(self) -> list[str]:
        return [im.group or im.key for im in self.images]

    @property
    def n_positive(self) -> int:
        return int(sum(im.label for im in self.images))

    def subset(self, indices: Iterable[int]) -> GroundTruth:
        return replace(self, images=[self.images[i] for i in indices], notes=[])


def _abspath(path: str | Path) -> Path:
    """Absolute and normalized, without following symlinks."""
    return Path(os.path.abspath(os.fspath(path)))


def load_dataset_yaml(data_yaml: str | Path) -> tuple[Path, dict[str, Any]]:
    """(dataset root, yaml mapping). A relative `path:` is relative to the yaml's folder."""
    import yaml

    data_yaml = Path(data_yaml)
    if not data_yaml.is_file():
        raise DataError(f"dataset yaml not found: {data_yaml}")
    try:
        cfg = yaml.safe_load(data_yaml.read_text())
    except yaml.YAMLError as err:
        raise DataError(f"{data_yaml} is not valid YAML: {err}") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{data_yaml} does not hold a mapping")
    base = _abspath(data_yaml).parent
    root = Path(cfg["path"]) if cfg.get("path") else base
    if not root.is_absolute():
        root = base / root
    return _abspath(root), cfg


# What a pre-harmonized tree's images need: nothing (no resize, no CLAHE; 8-bit gray -> RGB).
IDENTITY_CONTRACT = Contract(clahe_clip=0.0, max_side=1 << 30)


def tree_contract(data_yaml: str | Path) -> tuple[Path | None, Contract | None]:
    """The contract a dataset tree was harmonized with (`contract.json` beside the yaml, else in its root), if any."""
    root, _ = load_dataset_yaml(data_yaml)
    for path in (_abspath(data_yaml).parent / "contract.json", root / "contract.json"):
        if path.is_file():
            try:
                return path, Contract.load(path)
            except (ValueError, TypeError, json.JSONDecodeError) as err:
                raise DataError(f"cannot read the tree's contract {path}: {err}") from None
    return None, None


def _split_images(root: Path, cfg: dict[str, Any], split: str) -> list[Path]:
    entry = cfg.get(split, f"images/{split}")
    if entry is None:
        raise DataError(f"the dataset yaml has no '{split}' split")
    entries = entry if isinstance(entry, list) else [entry]
    images: list[Path] = []
    for item in entries:
        p = Path(item)
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            images += [_abspath(x) for x in list_images(p)]
        elif p.is_file() and p.suffix == ".txt":  # Ultralytics' list-of-images form
            for line in p.read_text().splitlines():
                if line.strip():
                    q = Path(line.strip())
                    images.append(_abspath(q if q.is_absolute() else root / q))
        else:
            raise DataError(f"split '{split}': {p} is neither a folder nor a .txt list of images")
    if not images:
        raise DataError(f"split '{split}' holds no images ({', '.join(map(str, entries))} under {root})")
    return sorted(dict.fromkeys(images))


def label_path_for(image: Path) -> Path:
    """Ultralytics' rule: the last `/images/` becomes `/labels/`, the suffix `.txt`."""
    s = os.fspath(image)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if sa in s:
        head, _, tail = s.rpartition(sa)
        s = head + sb + tail
    return Path(s).with_suffix(".txt")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header (PIL reads no pixels); DICOM through `load_image`."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - not a raster PIL knows (DICOM): fall back to the shared loader
        try:
            return load_image(path).meta.size
        except ImageDecodeError as err:
            raise DataError(f"{path}: {err}") from None


class LabelError(DataError):
    """A malformed YOLO label file: the message names the file and the line."""


# Tolerance of `read_label_rows(inside=True)`: a box may leave [0, 1] by this much (rounding in 6-decimal labels).
INSIDE_EPS = 1e-6


@dataclass(frozen=True)
class LabelRow:
    """One row of a YOLO label file: class, coordinates (4: ``cx cy w h``; an even number >= 6: a polygon's
    ``x y`` pairs), normalized to the image; and its line number."""

    cls: int
    coords: tuple[float, ...]
    lineno: int

    @property
    def is_box(self) -> bool:
        return len(self.coords) == 4

    def xyxy(self) -> tuple[float, float, float, float]:
        """Normalized xyxy: the box, or the polygon's bounding box (not clipped)."""
        if self.is_box:
            cx, cy, w, h = self.coords
            return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        xs, ys = self.coords[0::2], self.coords[1::2]
        return min(xs), min(ys), max(xs), max(ys)

    def clipped(self) -> tuple[float, float, float, float] | None:
        """Normalized xyxy clipped by its edges to the image (`clip_xyxy`); None when degenerate (a box of negative
        size, or nothing left inside)."""
        if self.is_box and (self.coords[2] < 0 or self.coords[3] < 0):
            return None
        return clip_xyxy(*self.xyxy())


def read_label_rows(path: Path, *, boxes_only: bool = False, single_class: bool = False, inside: bool = False) -> list[LabelRow]:
    """The one YOLO label reader: the rows of `path`, each checked, or a `LabelError` naming the file and line.

    Always: blank lines are skipped (a file of none is a valid negative image; a UTF-8 BOM is ignored), every value
    is a finite number, the class a non-negative integer, and a row has 4 coordinates (a box) or an even number >= 6
    (a polygon). `boxes_only` refuses polygons (training trees hold boxes), `single_class` any class but 0, and
    `inside` a box that is empty or leaves the image by more than `INSIDE_EPS`.
    """
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{lineno}"
        try:
            values = [float(v) for v in parts]
        except ValueError:
            raise LabelError(f"{where}: not a YOLO row (numbers expected): {line.strip()[:80]!r}") from None
        cls_f, coords = values[0], values[1:]
        if not all(math.isfinite(v) for v in values):
            raise LabelError(f"{where}: non-finite values in {line.strip()[:80]!r}")
        if cls_f != int(cls_f) or cls_f < 0:
            raise LabelError(f"{where}: the class must be a non-negative integer, got {parts[0]!r}")
        if single_class and cls_f != 0:
            raise LabelError(f"{where}: expected '0 cx cy w h' (single class), got {line.strip()[:80]!r}")
        if len(coords) != 4 and (boxes_only or len(coords) < 6 or len(coords) % 2):
            expected = "4 ('class cx cy w h'; polygons must be boxed by ingest)" if boxes_only else "4 (box) or an even number >= 6 (polygon)"
            raise LabelError(f"{where}: {len(coords)} coordinates: expected {expected}")
        row = LabelRow(int(cls_f), tuple(coords), lineno)
        if inside:
            x1, y1, x2, y2 = row.xyxy()
            if not (x2 > x1 and y2 > y1 and x1 >= -INSIDE_EPS and y1 >= -INSIDE_EPS and x2 <= 1 + INSIDE_EPS and y2 <= 1 + INSIDE_EPS):
                raise LabelError(f"{where}: the box {line.strip()!r} is empty or leaves the image")
        rows.append(row)
    return rows


def read_yolo_boxes(label_file: Path, width: int, height: int) -> tuple[np.ndarray, set[int]]:
    """xyxy boxes in pixels from a YOLO label file (box rows, or polygon rows -> their bounding box), each edge
    clipped to the image; and the classes seen."""
    rows = read_label_rows(label_file)
    boxes = [[min(max(v, 0), 1) * s for v, s in zip(row.xyxy(), (width, height, width, height))] for row in rows]
    return np.array(boxes, dtype=np.float64).reshape(-1, 4), {row.cls for row in rows}


def write_label_file(path: Path, boxes: Iterable[tuple[float, float, float, float]], width: float = 1.0, height: float = 1.0) -> Path:
    """The one YOLO label writer: one ``0 cx cy w h`` row per xyxy box (in pixels of a `width` x `height` image,
    or normalized); no box writes an empty file (a negative image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(xyxy_to_yolo(box, width, height) + "\n" for box in boxes))
    return path


def _read_splits_csv(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise DataError(f"{csv_path} has no 'path' column (columns: {reader.fieldnames})")
        return [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]


def _match_split_rows(images: list[Path], rows: list[dict[str, str]], bases: list[Path], split: str) -> tuple[list[dict | None], list[str]]:
    """splits.csv row for each image: by path (as written, or symlink-resolved), else unique file name, else sha256."""
    by_path: dict[str, dict] = {}
    by_name: dict[str, list[dict]] = {}
    by_sha: dict[str, dict] = {}
    for row in rows:
        p = Path(row["path"])
        for cand in ([p] if p.is_absolute() else [b / p for b in bases]):
            by_path.setdefault(os.fspath(_abspath(cand)), row)
            with contextlib.suppress(OSError):
                by_path.setdefault(os.fspath(cand.resolve()), row)
        if row.get("split", split) in (split, ""):
            by_name.setdefault(p.name, []).append(row)
        if row.get("sha256"):
            by_sha.setdefault(row["sha256"].lower(), row)
    out: list[dict | None] = []
    how = {"name": 0, "sha256": 0}
    for img in images:
        row = by_path.get(os.fspath(img))
        if row is None:
            with contextlib.suppress(OSError):
                row = by_path.get(os.fspath(img.resolve()))
        if row is None and len(by_name.get(img.name, [])) == 1:
            row = by_name[img.name][0]
            how["name"] += 1
        if row is None and by_sha:
            row = by_sha.get(sha256_file(img))
            how["sha256"] += row is not None
        out.append(row)
    notes = [f"{n} image(s) matched to splits.csv by {k} (not by path)" for k, n in how.items() if n]
    return out, notes


def load_ground_truth(data_yaml: str | Path, split: str = "test") -> GroundTruth:
    """The true boxes, labels, sources, regions and groups of one split of a Bone-R/Ultralytics tree."""
    data_yaml = Path(data_yaml)
    root, cfg = load_dataset_yaml(data_yaml)
    paths = _split_images(root, cfg, split)
    notes: list[str] = []
    csv_path = next((p for p in (_abspath(data_yaml).parent / "splits.csv", root / "splits.csv") if p.is_file()), None)
    rows: list[dict | None] = [None] * len(paths)
    sha = None
    if csv_path is None:
        notes.append("no splits.csv beside the dataset yaml: source and region are 'unknown' and each image is its own group")
    else:
        sha = sha256_file(csv_path)
        rows, match_notes = _match_split_rows(paths, _read_splits_csv(csv_path), [_abspath(data_yaml).parent, root], split)
        notes += match_notes
        missing = sum(r is None for r in rows)
        if missing:
            notes.append(f"{missing} image(s) of split '{split}' are not in splits.csv: source/region 'unknown', own group")
        wrong = sum(1 for r in rows if r is not None and r.get("split") and r["split"] != split)
        if wrong:
            raise DataError(f"{wrong} image(s) under split '{split}' are listed in splits.csv under another split")
    images: list[GTImage] = []
    n_missing_labels = n_weak = n_conflict = 0
    other_classes: set[int] = set()
    for path, row in zip(paths, rows):
        width, height = image_size(path)
        label_file = label_path_for(path)
        if label_file.is_file():
            boxes, classes = read_yolo_boxes(label_file, width, height)
            other_classes |= classes - {0}
        else:
            boxes = np.zeros((0, 4))
            n_missing_labels += 1
        key = os.path.relpath(path, root) if path.is_relative_to(root) else os.fspath(path)
        key = Path(key).as_posix()
        row = row or {}
        label, boxes_known = int(len(boxes) > 0), True
        csv_label = row.get("label", "")
        if not boxes.size and csv_label in ("1", "1.0"):
            if row.get("weak", "").lower() in TRUTHY:
                label, boxes_known = 1, False
                n_weak += 1
            else:
                n_conflict += 1
        elif boxes.size and csv_label in ("0", "0.0"):
            n_conflict += 1
        images.append(GTImage(path, key, int(width), int(height), boxes, label,
                              row.get("source") or "unknown", row.get("region") or "unknown",
                              row.get("group") or key, boxes_known))
    if n_missing_labels:
        notes.append(f"{n_missing_labels} image(s) have no label file and count as negatives")
    if other_classes:
        notes.append(f"label classes {sorted(other_classes)} besides 0 were counted as fracture (single-class evaluation)")
    if n_weak:
        notes.append(f"{n_weak} weak positive(s) (image-level label, no box): image level only, not in box metrics")
    if n_conflict:
        notes.append(f"{n_conflict} image(s) whose splits.csv label disagrees with the label file; the label file was used")
    contract_path, contract = tree_contract(data_yaml)
    return GroundTruth(images, split, os.fspath(data_yaml), root, notes, sha, contract, contract_path)


def ground_truth_from_folder(images_dir: str | Path, labels_dir: str | Path | None = None, *, all_positive: bool = False,
                             all_negative: bool = False, source: str = "external", region: str = "unknown") -> GroundTruth:
    """Ground truth for a plain folder (external validation).

    Labels: YOLO files named like the image (`labels_dir`, default: the Ultralytics
    images->labels sibling if it exists, else the images folder itself). With
    `all_positive` every image is a positive known only at image level (no boxes);
    `all_negative` makes every image a negative (no label files read).
    """
    images_dir = _abspath(images_dir)
    if not images_dir.is_dir():
        raise DataError(f"not a folder: {images_dir}")
    if all_positive and all_negative:
        raise DataError("choose at most one of all-positive and all-negative")
    paths = [_abspath(p) for p in list_images(images_dir)]
    if not paths:
        raise DataError(f"no images found in {images_dir}")
    notes = [f"external folder {images_dir}: each image is its own group"]
    images = []
    missing = 0
    for path in paths:
        width, height = image_size(path)
        key = Path(os.path.relpath(path, images_dir)).as_posix()
        boxes, label, known = np.zeros((0, 4)), 0, True
        if all_positive:
            label, known = 1, False
        elif not all_negative:
            if labels_dir is not None:
                label_file = _abspath(labels_dir) / Path(key).with_suffix(".txt")
            else:
                label_file = label_path_for(path)
                if not label_file.is_file():
                    label_file = path.with_suffix(".txt")
            if label_file.is_file():
                boxes, _ = read_yolo_boxes(label_file, width, height)
            else:
                missing += 1
            label = int(len(boxes) > 0)
        images.append(GTImage(path, key, width, height, boxes, label, source, region, key, known))
    if all_positive:
        notes.append("--all-positive: every image is a positive known at image level only; no box metrics")
    if all_negative:
        notes.append("--all-negative: every image is a negative")
    if missing:
        if missing == len(paths):
            raise DataError(f"no label files found for the images in {images_dir}; pass --labels, --all-positive or --all-negative")
        notes.append(f"{missing} image(s) have no label file and count as negatives")
    return GroundTruth(images, "external", os.fspath(images_dir), images_dir, notes, None)


def truth_for(image: Path, truth: Path | None, size: tuple[int, int]) -> list[tuple[float, ...]] | None:
    """Ground-truth boxes of `image` in its pixels from YOLO labels (None without `truth`).

    `truth` is one label file, or a folder holding ``<image stem>.txt``; an image without
    a file there has no fracture marked (as `load_ground_truth` counts a missing label file).
    Every row is a box (a polygon row: its bounding box), as in `load_ground_truth`.
    """
    if truth is None:
        return None
    label = truth / f"{image.stem}.txt" if truth.is_dir() else truth
    if not label.is_file():
        if truth.is_dir():
            return []
        raise DataError(f"--truth {truth} is neither a label file nor a folder")
    boxes, _ = read_yolo_boxes(label, *size)
    return [tuple(b) for b in boxes.tolist()]


@dataclass
class DatasetInfo:
    """A Bone-R dataset tree resolved to absolute paths."""

    yaml_path: Path
    root: Path
    splits: dict[str, list[Path]]  # split -> image folders (absolute)
    names: list[str]
    contract: Contract
    contract_source: str
    splits_csv: Path | None
    splits_sha256: str | None
    notes: list[str] = field(default_factory=list)

    def images(self, split: str) -> list[Path]:
        """The split's images (sorted; recognized by suffix), [] when the split is absent."""
        from bone_r.image import list_images

        found: list[Path] = []
        for folder in self.splits.get(split, []):
            found.extend(list_images(folder))
        return sorted(dict.fromkeys(found))


def load_dataset(yaml_path: str | Path, contract_path: str | Path | None = None) -> DatasetInfo:
    """Read a dataset.yaml by Bone-R's convention (`load_dataset_yaml`: a relative
    ``path:`` is relative to the yaml's folder, no ``path`` means the yaml's folder; Ultralytics
    would resolve it against its own datasets folder). ``contract.json`` is looked for in the
    yaml's folder, then in the dataset root; ``contract_path`` overrides both.
    """
    yaml_path = Path(yaml_path)
    try:
        root, data = load_dataset_yaml(yaml_path)
    except DataError as err:
        raise TrainError(str(err).splitlines()[0]) from None
    if not root.is_dir():
        raise TrainError(f"the dataset root {root} (from {yaml_path}) is not a folder")
    base = Path(os.path.abspath(yaml_path)).parent
    splits: dict[str, list[Path]] = {}
    for split in ("train", "val", "test"):
        entry = data.get(split)
        if not entry:
            continue
        folders = []
        for item in entry if isinstance(entry, list) else [entry]:
            folder = Path(str(item))
            folder = folder if folder.is_absolute() else root / folder
            if not folder.is_dir():
                raise TrainError(f"{split} folder {folder} (from {yaml_path}) does not exist; Bone-R trees list image folders")
            folders.append(folder)
        splits[split] = folders
    for split in ("train", "val"):
        if split not in splits:
            raise TrainError(f"{yaml_path} has no '{split}' entry")
    names = data.get("names") or {0: "fracture"}
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    if contract_path is not None:
        cpath = Path(contract_path)
        if not cpath.is_file():
            raise TrainError(f"contract file not found: {cpath}")
    else:
        cpath = next((c for c in (base / "contract.json", root / "contract.json") if c.is_file()), None)
        if cpath is None:
            raise TrainError(
                f"no contract.json beside {yaml_path} or in {root}: the tree must come from scripts/preprocess.py "
                "(which writes it); pass --contract PATH to state the contract its images were made with"
            )
    try:
        contract = Contract.load(cpath)
    except (ValueError, TypeError, OSError) as err:
        raise TrainError(f"cannot read the contract {cpath}: {err}") from None
    splits_csv = next((c for c in (base / "splits.csv", root / "splits.csv") if c.is_file()), None)
    notes = []
    if splits_csv is None:
        notes.append(f"no splits.csv beside {yaml_path}: splits_sha256 is null")
    return DatasetInfo(yaml_path, root, splits, [str(n) for n in names], contract, str(cpath.resolve()), splits_csv,
                       sha256_file(splits_csv) if splits_csv else None, notes)


MANIFEST_FIELDS = ["image", "source", "region", "regions", "group", "label", "boxes", "weak", "original", "note"]


MIN_SIDE = 1e-6  # a box thinner than this (normalized) after clipping is degenerate


class IngestError(Exception):
    """Bad input for an ingest step: the message is one line for a person."""


def yolo_row(cx: float, cy: float, w: float, h: float) -> str:
    return f"0 {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


def clip_xyxy(x1: float, y1: float, x2: float, y2: float, width: float = 1.0, height: float = 1.0) -> tuple[float, float, float, float] | None:
    """Clip a box by its edges to [0, width] x [0, height]; None when degenerate (or not finite).

    Clipping the edges (not cx, cy, w, h one by one) keeps the part of a box that
    lies inside the image, so a box crossing the border shrinks to that part.
    """
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    x1, x2 = max(0.0, x1), min(float(width), x2)
    y1, y2 = max(0.0, y1), min(float(height), y2)
    if (x2 - x1) <= MIN_SIDE * width or (y2 - y1) <= MIN_SIDE * height:
        return None
    return x1, y1, x2, y2


def xyxy_to_yolo(box: tuple[float, float, float, float], width: float = 1.0, height: float = 1.0) -> str:
    x1, y1, x2, y2 = box
    return yolo_row((x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height)


def is_inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def prepare_output(out: Path, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
    """Make `out` an empty folder: refuse a non-empty one unless `overwrite`, which clears it.

    Never clears a folder that holds (or is) an input, the repository, or a filesystem root.
    """
    out = Path(out)
    for src in inputs:
        if is_inside(out, src) or is_inside(src, out):
            raise IngestError(f"the output folder {out} overlaps the input {src}: choose an output outside it")
    if out.exists() and not out.is_dir():
        raise IngestError(f"the output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise IngestError(f"the output folder {out} is not empty: pass --overwrite to clear it, or choose another folder")
        resolved = out.resolve()
        if resolved == Path(resolved.anchor) or resolved == Path.home().resolve() or is_inside(ROOT, resolved):
            raise IngestError(f"refusing to clear {out}: it is a root, home or repository folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def link_original(original: Path, dest: Path) -> None:
    """`dest` becomes a symbolic link to the original (absolute), so nothing is copied or written in the source."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(original.resolve(), dest)


def write_manifest(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    fields = fields or MANIFEST_FIELDS
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})
