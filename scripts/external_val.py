"""External validation: a folder of images from a source the model never saw, at FROZEN thresholds.

    # labelled folder (YOLO .txt per image: labels/ sibling of images/, or beside the images)
    python scripts/external_val.py --images ext/images --weights weights/bone-r-default.pt --source hospital-x --out ext_report.json
    # a folder of known fractures without boxes: image-level sensitivity only
    python scripts/external_val.py --images ext/fractures --all-positive --weights weights/bone-r-default.pt
    # saved predictions (inference.py --image DIR --json results.json), thresholds from a card
    python scripts/external_val.py --images ext/images --predictions results.json --thresholds weights/bone-r-default.json

The operating thresholds are never chosen on the external images: they come from
``--thresholds`` (a model card or a {mode: threshold} JSON) or the weights' model card
(chosen on val by ``evaluate.py --write-card``). Scoring goes through evaluate.py's
functions, so the report has evaluate.py's schema (box metrics are null with
``--all-positive``/``--all-negative``; every image is its own bootstrap group).

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bone_r import DISCLAIMER
from bone_r.dataset import DataError, ground_truth_from_folder
from bone_r.detection import load_records
from bone_r.metrics import evaluate_records, predict_split
from bone_r.modes import normalize_operating_points
from bone_r.report import format_report, load_thresholds_file, save_plots, write_report


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Score a model on an external image folder at its frozen (val-chosen) thresholds. "
                                            "Research tool, not a diagnosis.")
    p.add_argument("--images", type=Path, required=True, help="folder of images from the unseen source (searched recursively)")
    truth = p.add_mutually_exclusive_group()
    truth.add_argument("--labels", type=Path, help="folder of YOLO .txt labels (same relative names as the images)")
    truth.add_argument("--all-positive", action="store_true", help="every image shows a fracture (image level only)")
    truth.add_argument("--all-negative", action="store_true", help="no image shows a fracture")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", type=Path, help="model to predict with (its card holds the frozen thresholds)")
    src.add_argument("--predictions", type=Path, help="saved predictions (inference.py --json) for these images")
    p.add_argument("--thresholds", type=Path, help="frozen thresholds: a model card or {mode: threshold} JSON (default: the weights' card)")
    p.add_argument("--backend", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--source", default="external", help="name of the source (the report's by_source key)")
    p.add_argument("--region", default="unknown", help="body region of the whole folder, if known")
    p.add_argument("--iou", type=float, default=0.3, help="IoU for localization-aware counting and FROC")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-missing", action="store_true", help="score images without a prediction as 'no detection' (listed as errors)")
    p.add_argument("--out", type=Path, default=Path("runs/external/report.json"), help="report JSON")
    p.add_argument("--plots", type=Path, default=None, help="folder for the PR and FROC PNGs (default: beside --out)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    import inference

    args = get_args_parser().parse_args(argv)
    if not 0 < args.iou <= 1 or args.n_boot < 0:
        print("error: --iou must lie in (0, 1] and --n-boot be >= 0", file=sys.stderr)
        return 2
    out = args.out.resolve()
    images_dir = args.images.resolve()
    if out.is_relative_to(images_dir) or (args.plots and args.plots.resolve().is_relative_to(images_dir)):
        print(f"error: the report must not be written into the input folder {args.images}", file=sys.stderr)
        return 2
    try:
        gt = ground_truth_from_folder(args.images, args.labels, all_positive=args.all_positive,
                                               all_negative=args.all_negative, source=args.source, region=args.region)
        predictor = None
        if args.weights:
            try:
                predictor = inference.Predictor(args.weights, args.backend, args.device)
            except (FileNotFoundError, ValueError) as err:
                raise DataError(str(err)) from None
            except Exception as err:  # noqa: BLE001 - a backend failing to load a file: one line, no traceback
                raise DataError(f"cannot load {args.weights}: {type(err).__name__}: {err}") from None
        if args.thresholds:
            ops = load_thresholds_file(args.thresholds)
        elif predictor is not None and predictor.card and predictor.card.thresholds:
            ops = normalize_operating_points(predictor.card.thresholds, "model_card")
        else:
            raise DataError("no frozen thresholds: the model card has none; run evaluate.py --write-card on the "
                            "validation split first, or pass --thresholds CARD.json (never chosen on external data)")
        bases: list[Path] = []
        if predictor is not None:
            records = predict_split(predictor, gt, progress=not args.quiet)
        else:
            records = load_records(args.predictions)
            bases.append(args.predictions.resolve().parent)
        report = evaluate_records(records, gt, ops, allow_missing=args.allow_missing, record_bases=bases,
                                           n_boot=args.n_boot, seed=args.seed, iou=args.iou)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report["external"] = {"images": str(args.images), "source": args.source, "region": args.region,
                          "truth": "all-positive" if args.all_positive else "all-negative" if args.all_negative else "labels",
                          "thresholds": "given" if args.thresholds else "model_card"}
    report["model"] = {"weights": str(args.weights), "backend": predictor.name} if predictor else {"predictions": str(args.predictions)}
    write_report(report, out)
    print(format_report(report))
    plots = [] if args.no_plots else save_plots(report, args.plots or out.parent, out.stem)
    print(f"report: {out}" + (f"; plots: {', '.join(map(str, plots))}" if plots else ""))
    print(DISCLAIMER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
