"""Bone-R evaluation: metrics as functions, a command line on top.

Every metric Bone-R reports is computed here and only here (benchmark.py,
scripts/external_val.py, ensemble.py and train.py call these functions).

    # score saved predictions: what `inference.py --image DIR --conf 0.001 --json results.json` writes
    # (--conf 0.001 keeps the low-score boxes that mAP and the threshold search need)
    python evaluate.py --predictions results.json --data data/merged/dataset.yaml --split test --out report.json
    # predict the split with a model first (same scoring code), choose thresholds on val, fill the model card
    python evaluate.py --weights weights/bone-r-default.pt --data data/merged/dataset.yaml --write-card
    # compare our box mAP with Ultralytics' own val() on the same split
    python evaluate.py --weights runs/x/weights/best.pt --data data/merged/dataset.yaml --ultralytics-crosscheck

What is measured
----------------
- Box level (pycocotools): mAP@0.5 and mAP@0.5:0.95 (COCO's 101-point interpolated
  AP, area range "all", at most ``max_dets`` = 100 boxes per image, highest scores
  first). Ground truth comes from the YOLO labels; negative images are included,
  so every box on them is a false positive. Predictions are kept down to score 0.001.
- Image level: an image is positive when it has a true box (or is a weak, image-level
  positive, see below); its score is its highest box score (0 without boxes); it is
  predicted positive iff score >= tau (ties count as positive). Sensitivity,
  specificity, PPV, NPV with 95% percentile bootstrap intervals that resample GROUPS
  (patients / families of augmented copies from splits.csv) with replacement,
  ``n_boot`` = 2000 resamples, ``seed`` = 0. A 0/0 metric is ``null`` with a note.
- Operating points, chosen on the validation split at image level from the observed
  scores (a threshold is always a score seen on val, so ``score >= tau`` reproduces
  the val numbers exactly):
    * ``screening``: the LARGEST tau whose sensitivity >= target (default 0.95). The
      issue's "smallest tau reaching a target sensitivity" is read as "the least
      permissive threshold that still reaches the target": sensitivity only falls as
      tau rises, so this keeps specificity as high as the target allows.
    * ``balanced``: the tau maximizing Youden's J = sensitivity + specificity - 1;
      ties go to the higher tau.
    * ``specific``: the SMALLEST tau whose specificity >= target (default 0.95).
  When a target cannot be reached, the closest achievable tau is used and
  ``target_reached`` is false. Images without any detection never count as positive.
- Localization-aware counting (second view), IoU >= ``iou`` (default 0.3): a positive
  image counts as found only if one of its boxes with score >= tau overlaps a true box;
  a flagged positive whose boxes all miss is "mislocalized" (a miss in this view).
- FROC (lesion level): sensitivity = share of true boxes hit (IoU >= ``iou``) by a box
  with score >= tau; a box that hits no true box is a false positive; points at a fixed
  threshold grid plus the operating thresholds.

Ground truth
------------
``load_ground_truth(data_yaml, split)`` reads an Ultralytics tree (``images/<split>``,
``labels/<split>/*.txt`` with ``0 cx cy w h`` rows, empty = negative) and ``splits.csv``
beside the yaml (``path, split, source, region, group, label, sha256``; optional
``weak``). A relative ``path:`` in the yaml is relative to the yaml's folder; no
``path:`` means the yaml's folder. Without splits.csv, source and region are
``unknown`` and every image is its own group (said in the report's notes). A row with
``label=1`` and a truthy ``weak`` but no box is a weak positive: counted at image level,
left out of box metrics, localization and FROC.

Predictions
-----------
A list of ``Prediction.to_record()`` dicts (``image``, ``image_size``,
``detections`` [{``xyxy`` in ORIGINAL pixels, ``score``, ...}], ...), matched to the
ground truth by path (absolute, relative to the working folder, to the predictions
file, to the dataset root, or by the longest unique trailing path). An image without a
prediction, a failed prediction (``error`` record), a duplicate, a size mismatch or a
prediction that matches no image of the dataset is an error: the CLI stops (exit 2)
unless ``--allow-missing``, which scores the missing ones as "no detection" and lists
every problem in the report's ``errors``.

With ``--weights`` every image of the split (and of val, when thresholds are chosen)
is predicted through `inference.Predictor` first, then scored by the same code. A tree
with a ``contract.json`` (built by scripts/preprocess.py + make_splits.py) is already
harmonized: its images are fed to the model as stored (``IDENTITY_CONTRACT``), exactly
what training saw, instead of being harmonized a second time (``--harmonize``).

Report JSON (``evaluate_predictions`` / ``run_evaluation``)
---------------------------------------------------------
::

    {
      "split": "test", "data": "<dataset.yaml>", "created": "<ISO time>",
      "n_images": int, "n_positive": int, "n_groups": int, "splits_sha256": str | null,
      "box": {"map50": float|null, "map50_95": float|null, "n_gt_boxes": int,
              "n_images": int, "n_detections": int, "max_dets": 100,
              "map50_interval": {"ci": [lo, hi], "ci_method": "group bootstrap", "n_boot"}|null},
      "image_auc": {"roc_auc": float|null},
      "operating_points": {mode: {"threshold": float, "source": "val"|"given"|"model_card",
                                  "target": float|null, "val_sensitivity": float|null,
                                  "val_specificity": float|null, "target_reached": bool}},
      "image_level": {mode: {"threshold", "n_images", "n_positive", "n_negative", "n_groups",
                             "tp", "fp", "tn", "fn",
                             "sensitivity": {"value": float|null, "ci": [lo, hi]|null},
                             "specificity": {...}, "ppv": {...}, "npv": {...}}},
      "localization": {"iou": 0.3, mode: {"threshold", "n_positive", "found", "missed",
                                          "mislocalized", "sensitivity": {"value", "ci"}}},
      "froc": [{"threshold", "sensitivity", "fp_per_image", "n_lesions"}],
      "pr_curve": {"image": [{"threshold", "precision", "recall"}],
                   "box_iou50": [{"recall", "precision"}]},
      "by_source": {source: {"n_images", "n_positive", "n_gt_boxes", "box": {...},
                             "image_level": {mode: {...}}}},
      "by_region": {region: same},
      "by_source_radiographs": {source: same, each radiograph once}, "mean_over_sources": {...},
      "by_fracture_size": {"threshold" (balanced), "iou", "area": "largest true box / image area",
                           "by_source": {source: [{"n", "area_min", "area_max",
                                                   "flagged": {"k", "value", "ci"}, "found": {...}}, x3]}},
      "settings": {"n_boot", "seed", "iou", "max_dets", "min_score", "targets", "val_split"},
      "val": {"split", "n_images", "n_positive"},            # when thresholds were chosen on val
      "model": {"weights", "backend"} | {"predictions"},      # CLI
      "ultralytics_crosscheck": {"ultralytics": {"map50", "map50_95"}, "ours": {...},
                                 "difference_ours_minus_ultralytics": {...}},  # --ultralytics-crosscheck
      "errors": [str], "notes": [str]
    }

The model card (``--write-card``, `update_model_card`) gets ``thresholds`` = {mode:
{threshold, target, val_sensitivity, val_specificity, target_reached, chosen_on: "val"}}
and ``metrics`` = `card_metrics(report)`; every other key of the card is kept.

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import inference
from bone_r import DISCLAIMER
from bone_r.card import card_path_for, update_model_card
from bone_r.dataset import DataError, _abspath
from bone_r.detection import load_records
from bone_r.metrics import DEFAULT_LOC_IOU, DEFAULT_N_BOOT, DEFAULT_SEED, run_evaluation, ultralytics_crosscheck
from bone_r.modes import DEFAULT_TARGET_SENSITIVITY, DEFAULT_TARGET_SPECIFICITY
from bone_r.report import format_report, load_thresholds_file, num, save_plots, write_report
from bone_r.runs import set_threads

# --------------------------------------------------------------------------- ground truth


# --------------------------------------------------------------------------- predictions


# --------------------------------------------------------------------------- box metrics


# --------------------------------------------------------------------------- image level


# --------------------------------------------------------------------------- localization


# --------------------------------------------------------------------------- the report


# --------------------------------------------------------------------------- model card


# --------------------------------------------------------------------------- Ultralytics cross-check


# --------------------------------------------------------------------------- output


# --------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Score fracture predictions on a dataset split (box mAP, image-level metrics with "
                                            "group-bootstrap intervals, localization, FROC). Research tool, not a diagnosis.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", type=Path, help="a model to predict the split with (its card next to it: weights/<name>.json)")
    src.add_argument("--predictions", type=Path, help="saved predictions: what `inference.py --image DIR --json` writes")
    p.add_argument("--data", type=Path, required=True, help="the dataset yaml (Ultralytics tree, splits.csv beside it)")
    p.add_argument("--split", default="test", help="split to score (default: test)")
    p.add_argument("--val-split", default="val", help="split the operating thresholds are chosen on (default: val)")
    p.add_argument("--val-predictions", type=Path, help="saved predictions for the val split (else --predictions must include them)")
    p.add_argument("--thresholds", type=Path, help="fixed thresholds: a model card or a JSON {mode: threshold} (not chosen on val)")
    p.add_argument("--choose-on-val", action="store_true", help="with --weights: choose thresholds on val even if the card has them")
    p.add_argument("--backend", default=None, help="detector backend for --weights (default: the card's, else from the file type)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and ONNX Runtime (default: all cores; 1 next to a training run)")
    p.add_argument("--harmonize", choices=["auto", "yes", "no"], default="auto",
                   help="with --weights: auto = feed images as stored when the tree has contract.json (already harmonized)")
    p.add_argument("--target-sensitivity", type=float, default=DEFAULT_TARGET_SENSITIVITY, help="screening mode target on val")
    p.add_argument("--target-specificity", type=float, default=DEFAULT_TARGET_SPECIFICITY, help="specific mode target on val")
    p.add_argument("--iou", type=float, default=DEFAULT_LOC_IOU, help="IoU for localization-aware counting and FROC (default 0.3)")
    p.add_argument("--n-boot", type=int, default=DEFAULT_N_BOOT, help="bootstrap resamples of groups (0: no intervals)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--out", type=Path, default=None, help="report JSON (default: runs/evaluate/<name>_<split>.json)")
    p.add_argument("--plots", type=Path, default=None, help="folder for the PR and FROC PNGs (default: beside --out)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--write-card", action="store_true", help="with --weights: write val-chosen thresholds and test metrics into the card")
    p.add_argument("--box-rule", choices=["card", "none", "choose"], default="card",
                   help="the card's box rule (default; saved predictions: as they were made), none (--weights only), or "
                        "choose one on val (NMS IoU, containment, boxes per image; with --write-card it goes into the card; "
                        "with --predictions, e.g. an ensemble's, --save-predictions writes them with the rule applied)")
    p.add_argument("--tta", choices=["card", "none", "hflip"], default="card",
                   help="with --weights: the card's test-time augmentation (default), none, or hflip (the image and its "
                        "mirror, boxes fused; twice the model time; with --write-card it goes into the card)")
    p.add_argument("--imgsz", type=int, default=None,
                   help="with --weights: the long side the model sees (default: the card's; with --write-card it goes into "
                        "the card)")
    p.add_argument("--save-predictions", type=Path,
                   help="with --weights or --box-rule choose: also save the records (results.json format)")
    p.add_argument("--allow-missing", action="store_true", help="score images without a prediction as 'no detection' (listed as errors)")
    p.add_argument("--ultralytics-crosscheck", action="store_true", help="with YOLO .pt --weights: also run Ultralytics' val() and compare")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _check_args(args: argparse.Namespace) -> str | None:
    if args.write_card and not args.weights:
        return "--write-card needs --weights (the card lives next to the weights)"
    if args.write_card and args.thresholds:
        return "--write-card chooses thresholds on val; it cannot be combined with --thresholds"
    if args.save_predictions and not (args.weights or args.box_rule == "choose"):
        return "--save-predictions needs --weights, or --box-rule choose (saved predictions with the rule chosen on val)"
    if args.tta != "card" and not args.weights:
        return "--tta needs --weights (saved predictions are scored as they were made)"
    if args.imgsz is not None and not args.weights:
        return "--imgsz needs --weights (saved predictions are scored as they were made)"
    if args.imgsz is not None and not 32 <= args.imgsz <= 4096:
        return "--imgsz must lie in [32, 4096]"
    if args.ultralytics_crosscheck and not (args.weights and args.weights.suffix == ".pt"):
        return "--ultralytics-crosscheck needs YOLO .pt --weights"
    for name in ("target_sensitivity", "target_specificity", "iou"):
        if not 0 < getattr(args, name) <= 1:
            return f"--{name.replace('_', '-')} must lie in (0, 1]"
    if args.n_boot < 0:
        return "--n-boot must be >= 0"
    if args.threads is not None and args.threads < 1:
        return "--threads must be >= 1"
    return None


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    problem = _check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.threads is not None:
        set_threads(args.threads)  # before the model loads
    tta = None if args.tta == "card" else args.tta  # None: the card says
    name = (args.weights or args.predictions).stem
    out = args.out or Path("runs") / "evaluate" / f"{name}_{args.split}.json"
    try:
        thresholds, source = None, "given"
        if args.thresholds:
            thresholds = load_thresholds_file(args.thresholds)
        bases: list[Path] = []
        if args.weights:
            try:
                predictor = inference.Predictor(args.weights, args.backend, args.device, imgsz=args.imgsz, tta=tta)
            except (FileNotFoundError, ValueError) as err:
                raise DataError(str(err)) from None
            except Exception as err:  # noqa: BLE001 - a backend failing to load a file: one line, no traceback
                raise DataError(f"cannot load {args.weights}: {type(err).__name__}: {err}") from None
            card_thresholds = predictor.card.thresholds if predictor.card else None
            # the card's thresholds hold for the card's box rule, augmentation and input size only
            if thresholds is None and card_thresholds and not (args.write_card or args.choose_on_val or args.box_rule == "choose"
                                                               or tta is not None or args.imgsz is not None):
                thresholds, source = card_thresholds, "model_card"
            predictions: Any = predictor
        else:
            predictions = load_records(args.predictions)
            bases.append(_abspath(args.predictions).parent)
            if args.val_predictions:
                predictions += load_records(args.val_predictions)
                bases.append(_abspath(args.val_predictions).parent)
        report = run_evaluation(predictions, args.data, args.split, args.val_split, thresholds=thresholds, threshold_source=source,
                                target_sensitivity=args.target_sensitivity, target_specificity=args.target_specificity,
                                n_boot=args.n_boot, seed=args.seed, iou=args.iou, allow_missing=args.allow_missing,
                                progress=not args.quiet, record_bases=bases, keep_records=bool(args.save_predictions),
                                harmonize=args.harmonize, box_rule=args.box_rule)
        report["model"] = ({"weights": str(args.weights), "backend": predictor.name, "tta": predictor.settings.tta,
                            "imgsz": predictor.settings.imgsz}
                           if args.weights else {"predictions": str(args.predictions)})
        if args.ultralytics_crosscheck:
            imgsz = getattr(predictor.detector, "imgsz", None)  # the size our predictions were made at
            report["ultralytics_crosscheck"] = ultralytics_crosscheck(args.weights, args.data, args.split, imgsz=imgsz, ours=report,
                                                                      device=args.device)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.save_predictions:
        args.save_predictions.parent.mkdir(parents=True, exist_ok=True)
        args.save_predictions.write_text(json.dumps(report.pop("_records"), indent=2) + "\n")
    write_report(report, out)
    print(format_report(report))
    if "ultralytics_crosscheck" in report:
        cc = report["ultralytics_crosscheck"]
        d = cc.get("difference_ours_minus_ultralytics", {})
        print(f"Ultralytics val(): mAP@0.5 {num(cc['ultralytics']['map50'])}  mAP@0.5:0.95 {num(cc['ultralytics']['map50_95'])}   "
              f"ours - theirs: {num(d.get('map50'), 4)} / {num(d.get('map50_95'), 4)}")
    plots: list[Path] = []
    if not args.no_plots:
        plots = save_plots(report, args.plots or out.parent, out.stem)
    if args.write_card:
        card_path = card_path_for(args.weights)
        update_model_card(card_path, report, report, box_rule=report.get("box_rule"), tta=tta, imgsz=args.imgsz)
        print(f"model card updated: {card_path} (thresholds chosen on '{args.val_split}', metrics on '{args.split}')")
    print(f"report: {out}" + (f"; plots: {', '.join(map(str, plots))}" if plots else ""))
    print(DISCLAIMER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
