"""The docs site's overlay viewer data: real test radiographs with the bundled model's boxes and the truth.

    .venv/bin/python -m scripts.make_site_cases     # from the repository root; after every change of the bundled model

writes into docs/data/: `cases.json` (docs/data/cases.schema.json), one downscaled
grayscale JPEG per case (`case-<source>-<name>.jpg`; stale `case-*.jpg` are removed),
`cases-credits.txt`, and bundle.js (the copy of the site's JSON for pages opened from disk).
Defaults: the bundled model (`--weights`), the test split of data/merged/dataset.yaml
(`--data`, `--split`) and the original radiographs in ../shared/data (`--originals`,
one folder per source, the `original` column of splits.csv inside it).

Selection rule (seeded; the same data, seed and model give the same cases):
1. Pool: the split's images from a source with a CC BY 4.0 credit line (`CREDITS`), with
   box labels (no weak positives) and their original file at hand; of each group (a
   radiograph's augmented copies, or near-duplicates) one image, the first in seeded order.
   Seeded order: sha256 of "<seed>:<dataset path>".
2. Strata: (source, region, label). Round robin: the first image (seeded order) of every
   stratum, largest stratum first (ties by name), then the second of each, ... until
   `--n` images. The model plays no part in this draw.
3. The drawn images are predicted. If none of them is a miss (a fracture the model does
   not flag in balanced mode) the other positives of the pool are predicted in seeded
   order until one is, and it replaces the last-drawn image of its stratum (or of its
   label, when its stratum has none); the same for a false alarm (a negative flagged in
   balanced mode). At most `--max-extra` extra predictions. So the set shows the model's
   errors where it makes any, and is otherwise an outcome-blind stratified draw.
4. Shown (case-01, case-02, ...) fractures first, then the rest, each in the order drawn.

Boxes are kept down to the screening threshold. Each box records its best-overlapping
true box (IoU >= `DEFAULT_LOC_IOU`, the report's localization rule); each true
box the best score that found it; each image its decision in every mode (flagged or not,
TP/FP/TN/FN, boxes hit and false). Boxes are in the original radiograph's pixels; the
JPEG is a display copy (long side <= `--max-side`, all together <= `--budget-mb`: the
quality and then the size are lowered until they fit).

Only these copies of CC BY 4.0 test radiographs are committed, under docs/, each with its
credit line. Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

import inference
from bone_r import DISCLAIMER, site
from bone_r.card import card_path_for
from bone_r.contract import fit_long_side, to_uint8
from bone_r.dataset import DataError, GroundTruth, GTImage, load_ground_truth
from bone_r.detection import Detection
from bone_r.draw import PALETTE
from bone_r.image import ImageDecodeError, LoadedImage, load_image
from bone_r.metrics import DEFAULT_LOC_IOU, box_iou
from bone_r.modes import MODES
from bone_r.runs import ROOT, display_path, sha256_file

CASES_FORMAT = "bone-r-cases/1"
LICENCE_URL = "https://creativecommons.org/licenses/by/4.0/"
# The sources whose images may be shown (and committed): CC BY 4.0, credited as their README asks.
CREDITS: dict[str, dict[str, str]] = {
    "fracatlas": {
        "title": "FracAtlas",
        "credit": "Abedeen et al., \"FracAtlas: A Dataset for Fracture Classification, Localization and Segmentation of "
                  "Musculoskeletal Radiographs\", Scientific Data 2023; figshare doi 10.6084/m9.figshare.22363012",
        "url": "https://doi.org/10.6084/m9.figshare.22363012",
        "licence": "CC BY 4.0",
    },
    "proximal-femur": {
        "title": "Proximal Femur Fracture (Roboflow Universe)",
        "credit": "Roboflow Universe \"Proximal Femur Fracture\" v1, workspace thesisyolo-v8, project proximal-femur-fracture "
                  "(provided by a Roboflow user)",
        "url": "https://universe.roboflow.com/thesisyolo-v8/proximal-femur-fracture",
        "licence": "CC BY 4.0",
    },
    "science-research-2022": {
        "title": "Science Research 2022: Bone Fracture Detection (Roboflow Universe)",
        "credit": "Roboflow Universe \"Science Research 2022: Bone Fracture Detection\" v7, workspace science-research "
                  "(provided by a Roboflow user)",
        "url": "https://universe.roboflow.com/science-research/science-research-2022:-bone-fracture-detection",
        "licence": "CC BY 4.0",
    },
}
JPEG_QUALITIES = (85, 75, 65)
OUTCOME_WORDS = {"TP": "fracture flagged", "FN": "missed fracture", "FP": "false alarm", "TN": "no finding, none marked"}


class CasesError(ValueError):
    """Bad input: the message is one line for a person."""


@dataclass
class Case:
    """One candidate radiograph: its ground truth, original file and, once predicted, the model's boxes."""

    gt: GTImage
    original: Path
    original_rel: str
    order: str  # the seeded sort key
    detections: list[Detection] | None = None
    size: tuple[int, int] | None = None  # (width, height) of the original
    picked_as: str = "draw"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stratum(self) -> tuple[str, str, int]:
        return self.gt.source, self.gt.region, self.gt.label

    @property
    def truth(self) -> np.ndarray:
        """True boxes in the original's pixels (the dataset copy may be resized)."""
        w, h = self.size or (self.gt.width, self.gt.height)
        return self.gt.boxes * np.array([w / self.gt.width, h / self.gt.height] * 2)


def seeded(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


# --------------------------------------------------------------------------- the pool and the draw


def read_originals(data_yaml: Path) -> dict[str, str]:
    """{dataset path (posix, relative to the tree): the original file, relative to its source folder} from splits.csv."""
    csv_path = data_yaml.parent / "splits.csv"
    if not csv_path.is_file():
        raise CasesError(f"no splits.csv beside {data_yaml}: the cases need its source, group and original columns")
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "original" not in rows[0]:
        raise CasesError(f"{csv_path} has no 'original' column: rebuild the dataset (make dataset)")
    return {r["path"]: r.get("original", "") for r in rows}


def build_pool(gt: GroundTruth, originals: dict[str, str], originals_root: Path, seed: int) -> tuple[list[Case], list[str]]:
    """The candidates (rule 1), in seeded order, and notes on what was left out."""
    by_group: dict[str, Case] = {}
    left_out: dict[str, int] = {}
    for im in gt.images:
        why = None
        rel = originals.get(im.key, "")
        if im.source not in CREDITS:
            why = f"source {im.source} is not one of the credited CC BY 4.0 sets the site shows (CREDITS)"
        elif not im.boxes_known:
            why = "weak positives (no boxes)"
        elif not rel or not (originals_root / im.source / rel).is_file():
            why = "original file not found"
        if why:
            left_out[why] = left_out.get(why, 0) + 1
            continue
        case = Case(im, originals_root / im.source / rel, f"{im.source}/{rel}", seeded(seed, im.key))
        group = im.group or im.key
        if group not in by_group or case.order < by_group[group].order:
            by_group[group] = case
    notes = [f"{n} image(s) left out: {why}" for why, n in sorted(left_out.items())]
    return sorted(by_group.values(), key=lambda c: c.order), notes


def strata_order(pool: Sequence[Case]) -> list[list[Case]]:
    """The pool's strata, largest first (ties by name), each in seeded order."""
    strata: dict[tuple, list[Case]] = {}
    for case in pool:  # the pool is in seeded order already
        strata.setdefault(case.stratum, []).append(case)
    return [strata[k] for k in sorted(strata, key=lambda k: (-len(strata[k]), str(k)))]


def draw(pool: Sequence[Case], n: int) -> list[Case]:
    """Rule 2: round robin over the strata until `n` images."""
    strata = strata_order(pool)
    picks: list[Case] = []
    for k in range(max((len(s) for s in strata), default=0)):
        for members in strata:
            if len(picks) == n:
                return picks
            if k < len(members):
                picks.append(members[k])
    return picks


# --------------------------------------------------------------------------- judging boxes


def judge(case: Case, thresholds: dict[str, float], iou_min: float) -> dict[str, Any]:
    """Hits and misses: each box's best true box (IoU >= iou_min), each true box's best finding score,
    and per mode the decision (flagged, TP/FP/TN/FN, boxes hit and false, true boxes found)."""
    dets = case.detections or []
    scores = [round(d.score, 5) for d in dets]  # as cases.json stores them, so the viewer decides the same
    thresholds = {mode: round(t, 6) for mode, t in thresholds.items()}
    truth = case.truth
    det_boxes = np.array([d.xyxy for d in dets], dtype=np.float64).reshape(-1, 4)
    ious = box_iou(det_boxes, truth) if len(dets) and len(truth) else np.zeros((len(dets), len(truth)))
    matches = []
    for i in range(len(dets)):
        j = int(np.argmax(ious[i])) if truth.size else -1
        matches.append((j, float(ious[i, j])) if j >= 0 and ious[i, j] >= iou_min else (None, float(ious[i].max()) if truth.size else 0.0))
    found_score = []
    for j in range(len(truth)):
        found = [scores[i] for i in range(len(dets)) if ious[i, j] >= iou_min]
        found_score.append(max(found) if found else None)
    decisions = {}
    label = bool(case.gt.label)
    for mode, t in thresholds.items():
        shown = [i for i, score in enumerate(scores) if score >= t]
        flagged = bool(shown)
        outcome = ("TP" if flagged else "FN") if label else ("FP" if flagged else "TN")
        decisions[mode] = {
            "threshold": t, "flagged": flagged, "outcome": outcome,
            "boxes": len(shown), "hits": sum(matches[i][0] is not None for i in shown),
            "false_boxes": sum(matches[i][0] is None for i in shown),
            "truth_found": [s is not None and s >= t for s in found_score],
        }
    return {"matches": matches, "found_score": found_score, "decisions": decisions}


def outcome(case: Case, threshold: float) -> str:
    """TP, FN, FP or TN at `threshold` (scores and threshold rounded as cases.json stores them)."""
    flagged = any(round(d.score, 5) >= round(threshold, 6) for d in case.detections or [])
    return ("TP" if flagged else "FN") if case.gt.label else ("FP" if flagged else "TN")


def choose(pool: Sequence[Case], n: int, predict: Callable[[Case], None], balanced: float, max_extra: int) -> tuple[list[Case], int]:
    """Rules 2 and 3: the drawn cases, predicted, with a miss and a false alarm put in where the model makes any.
    Returns (cases, extra predictions made)."""
    picks = draw(pool, n)
    for case in picks:
        predict(case)
    extra = 0
    for wanted, label in (("FN", 1), ("FP", 0)):
        if any(outcome(c, balanced) == wanted for c in picks):
            continue
        chosen = {id(c) for c in picks}
        for case in pool:
            if extra >= max_extra:
                break
            if case.gt.label != label or id(case) in chosen:
                continue
            if case.detections is None:
                predict(case)
                extra += 1
            if outcome(case, balanced) != wanted:
                continue
            same = [i for i, c in enumerate(picks) if c.stratum == case.stratum and c.picked_as == "draw"]
            same = same or [i for i, c in enumerate(picks) if c.gt.label == label and c.picked_as == "draw"]
            if same:
                case.picked_as = "miss" if wanted == "FN" else "false alarm"
                picks[same[-1]] = case
            break
    return picks, extra


# --------------------------------------------------------------------------- images


def display_copy(loaded: LoadedImage, max_side: int, quality: int) -> tuple[bytes, tuple[int, int]]:
    """An 8-bit grayscale JPEG of the radiograph, long side <= max_side (never enlarged)."""
    gray = fit_long_side(to_uint8(loaded.pixels), max_side)
    ok, buf = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_OPTIMIZE, 1])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes(), (gray.shape[1], gray.shape[0])


def file_name(case: Case) -> str:
    stem = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in Path(case.original_rel).stem)
    return f"case-{case.gt.source}-{stem}.jpg"


def fit_budget(loaded: list[LoadedImage], max_side: int, budget: int) -> tuple[list[tuple[bytes, tuple[int, int]]], int, int]:
    """The JPEGs at the best quality (then size) whose total fits `budget` bytes: (copies, quality, max side)."""
    side = max_side
    while True:
        for quality in JPEG_QUALITIES:
            copies = [display_copy(im, side, quality) for im in loaded]
            if sum(len(b) for b, _ in copies) <= budget:
                return copies, quality, side
        if side <= 64:
            raise CasesError(f"the images do not fit in {budget} bytes even at {side} px: lower --n")
        side = max(64, int(side * 0.8))


# --------------------------------------------------------------------------- the payload


def case_entry(case: Case, index: int, src: str, display: tuple[int, int], nbytes: int, judged: dict[str, Any],
               model: str) -> dict[str, Any]:
    w, h = case.size
    im = case.gt
    dets = []
    for det, (j, iou) in zip(case.detections or [], judged["matches"]):
        d = det.to_dict() | {"model": model, "match": j, "iou": round(iou, 3)}
        dets.append(d)
    truth = [{"xyxy": [round(float(v), 2) for v in box], "label": "fracture", "found_score": s}
             for box, s in zip(case.truth.tolist(), judged["found_score"])]
    credit = CREDITS[im.source]
    return {
        "id": f"case-{index:02d}",
        "src": src,
        "width": w, "height": h,
        "display_width": display[0], "display_height": display[1], "bytes": nbytes,
        "source": im.source, "region": im.region, "label": int(im.label),
        "stratum": f"{im.source}/{im.region}/{'fracture' if im.label else 'no fracture'}",
        "picked_as": case.picked_as,
        "dataset_path": im.key, "original": case.original_rel, "group": im.group,
        "caption": f"{credit['title']}: {Path(case.original_rel).name}, {im.region}, "
                   f"{'fracture marked' if im.label else 'no fracture marked'}",
        "ground_truth": truth,
        "detections": dets,
        "decisions": judged["decisions"],
    }


def selection_rule(args: argparse.Namespace) -> str:
    return (f"Seeded (seed {args.seed}) and stratified by source, region and label: from the {args.split} split, one image per "
            "group, sources with a CC BY 4.0 credit only; round robin over the (source, region, label) strata, largest first, "
            f"each in seeded order, until {args.n} images; the model plays no part in this draw. If the drawn set holds no miss "
            "(a fracture not flagged in balanced mode) or no false alarm (a negative flagged in balanced mode), the pool's "
            "next positives (negatives) in seeded order are predicted until one is found, which replaces the last-drawn "
            f"image of its stratum (at most {args.max_extra} extra predictions). Shown fractures first, then the "
            "rest, each in the order drawn. Not hand-picked.")


# --------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build the docs site's overlay viewer data from the test split and the bundled model "
                                            "(research tool, not a diagnosis).")
    p.add_argument("--weights", type=Path, default=None, help="model weights (default: the bundled model)")
    p.add_argument("--backend", default=None, help="detector backend (default: from the card or file type)")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "merged" / "dataset.yaml", help="dataset yaml (splits.csv beside it)")
    p.add_argument("--split", default="test")
    p.add_argument("--originals", type=Path, default=ROOT.parent / "shared" / "data",
                   help="folder of the source sets (one folder per source; default ../shared/data)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "data", help="the site's data folder (default docs/data)")
    p.add_argument("--n", type=int, default=16, help="cases (8-16 for the site; default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-extra", type=int, default=64, help="extra predictions allowed to find a miss and a false alarm")
    p.add_argument("--max-side", type=int, default=1024, help="long side of the JPEG copies (at most 1024)")
    p.add_argument("--budget-mb", type=float, default=6.0, help="all JPEG copies together at most this (MB, 10^6 bytes)")
    p.add_argument("--device", default="cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return _run(args)
    except (CasesError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if not 1 <= args.n <= 64:
        raise CasesError("--n must lie in 1..64")
    if not 32 <= args.max_side <= 1024:
        raise CasesError("--max-side must lie in 32..1024")
    if args.budget_mb <= 0 or args.max_extra < 0:
        raise CasesError("--budget-mb must be > 0 and --max-extra >= 0")
    if not args.data.is_file():
        raise CasesError(f"dataset yaml not found: {args.data} (build it: make dataset)")
    if not args.originals.is_dir():
        raise CasesError(f"--originals {args.originals} is not a folder")
    from tqdm import tqdm

    predictor = inference.Predictor(args.weights, args.backend, args.device)
    thresholds = {mode: predictor.threshold(mode)[0] for mode in MODES}
    gt = load_ground_truth(args.data, args.split)
    pool, notes = build_pool(gt, read_originals(args.data), args.originals, args.seed)
    if not pool:
        raise CasesError(f"no image of split {args.split} qualifies: {'; '.join(notes) or 'the split is empty'}")
    progress = tqdm(total=args.n, desc="predict cases", unit="img")
    loaded: dict[int, LoadedImage] = {}

    def predict(case: Case) -> None:
        try:
            image = load_image(case.original)
        except ImageDecodeError as err:
            raise CasesError(f"{case.original}: {err}") from None
        pred = predictor.predict_loaded(image, str(case.original), "balanced", min_score=thresholds["screening"])
        case.detections, case.size = pred.detections, image.meta.size
        loaded[id(case)] = image
        progress.update()

    cases, extra = choose(pool, args.n, predict, thresholds["balanced"], args.max_extra)
    progress.close()
    cases.sort(key=lambda c: -c.gt.label)  # shown fractures first, then the rest, each in the order drawn (a stable sort)
    copies, quality, side = fit_budget([loaded[id(c)] for c in cases], args.max_side, int(args.budget_mb * 1e6))

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_name = str((predictor.card.name if predictor.card else None) or predictor.name)
    entries, names = [], []
    for i, (case, (jpeg, display)) in enumerate(zip(cases, copies), 1):
        name = file_name(case)
        (out / name).write_bytes(jpeg)
        names.append(name)
        judged = judge(case, thresholds, DEFAULT_LOC_IOU)
        entries.append(case_entry(case, i, name, display, len(jpeg), judged, model_name))
    for stale in out.glob("case-*.jpg"):
        if stale.name not in names:
            stale.unlink()
    weights = predictor.weights
    summary = {mode: {k: sum(e["decisions"][mode]["outcome"] == k for e in entries) for k in ("TP", "FN", "FP", "TN")}
               for mode in MODES}
    sources_used = sorted({c.gt.source for c in cases})
    payload = {
        "format": CASES_FORMAT,
        "generated": site.now_stamp(),
        "generator": "python -m scripts.make_site_cases",
        "synthetic": False,
        "disclaimer": DISCLAIMER,
        "model": {
            "name": model_name,
            "weights": display_path(weights) if weights else "injected",
            "sha256": sha256_file(weights) if weights and weights.is_file() else None,
            "card_sha256": sha256_file(card) if weights and (card := card_path_for(weights)).is_file() else None,
            "tta": predictor.settings.tta,
            "color": "#{:02x}{:02x}{:02x}".format(*PALETTE[0]),
        },
        "modes": {mode: {"threshold": round(t, 6), "source": predictor.threshold(mode)[1]} for mode, t in thresholds.items()},
        "default_mode": "balanced",
        "min_score": round(thresholds["screening"], 6),
        "iou": DEFAULT_LOC_IOU,
        "data": {"yaml": display_path(args.data), "split": args.split, "splits_sha256": gt.splits_sha256,
                 "pool": len(pool), "strata": len(strata_order(pool))},
        "selection": {"rule": selection_rule(args), "seed": args.seed, "n": len(cases), "extra_predictions": extra,
                      "notes": notes},
        "images_total_bytes": sum(len(b) for b, _ in copies),
        "jpeg": {"quality": quality, "max_side": side},
        "summary": summary,
        "sources": {s: CREDITS[s] | {"licence_url": LICENCE_URL,
                                     "changes": f"converted to 8-bit grayscale JPEG, long side at most {side} px; boxes drawn by Bone-R"}
                    for s in sources_used},
        "images": entries,
    }
    _check_schema(payload, out)
    cases_json = site.write_json(out / "cases.json", payload)
    credits = ["Radiographs shown by the docs site's overlay viewer (docs/data/case-*.jpg), written by "
               "python -m scripts.make_site_cases. Each is a downscaled grayscale copy of a test image of a CC BY 4.0 set:", ""]
    for e in entries:
        c = CREDITS[e["source"]]
        credits.append(f"{e['src']}: {e['original']} from {c['credit']}. {c['url']}. Licence {c['licence']} ({LICENCE_URL}). "
                       f"Changed: {payload['sources'][e['source']]['changes']}.")
    (out / "cases-credits.txt").write_text("\n".join(credits) + "\n")
    bundle = site.write_bundle(out)
    bal = summary["balanced"]
    print(f"{len(cases)} cases ({extra} extra prediction(s)) from a pool of {len(pool)}: balanced mode TP {bal['TP']}, "
          f"FN {bal['FN']}, FP {bal['FP']}, TN {bal['TN']}; JPEG q{quality}, long side <= {side} px, "
          f"{payload['images_total_bytes'] / 1e6:.2f} MB")
    print(f"wrote {cases_json}, {len(names)} case-*.jpg, cases-credits.txt and {bundle.name} in {out}")
    print(DISCLAIMER)
    return 0


def _check_schema(payload: dict[str, Any], out: Path) -> None:
    """cases.json against docs/data/cases.schema.json (beside the output, else the repository's)."""
    import json

    import jsonschema

    schema_path = out / "cases.schema.json"
    if not schema_path.is_file():
        schema_path = ROOT / "docs" / "data" / "cases.schema.json"
    schema = json.loads(schema_path.read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft202012Validator(schema).iter_errors(json.loads(json.dumps(payload)))]
    if errors:
        raise CasesError(f"cases.json would not match {schema_path.name}: {errors[0]}")


if __name__ == "__main__":
    sys.exit(main())
