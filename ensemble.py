"""Ensembles: weighted box fusion across detectors, and detector x abnormality-classifier fusion.

    # WBF of two (or more) detectors' saved predictions for the val and test images, scored by evaluate.py
    python evaluate.py --weights runs/yolo/weights/best.pt --data data/merged/dataset.yaml --save-predictions runs/ens/yolo.json
    python evaluate.py --weights runs/fcos/model.pt --data data/merged/dataset.yaml --save-predictions runs/ens/fcos.json
    python ensemble.py wbf --predictions yolo=runs/ens/yolo.json fcos=runs/ens/fcos.json --data data/merged/dataset.yaml
    # (or let it predict: --models yolo=runs/yolo/weights/best.pt fcos=runs/fcos/model.pt:fcos)

    # detector x classifier: fused = det_score * (alpha + (1 - alpha) * p_abnormal)
    python ensemble.py fuse --detector-predictions runs/ens/yolo.json --classifier runs/mura_cls/best.pt \\
        --alpha 0 0.25 0.5 0.75 1 --data data/merged/dataset.yaml
    # (or --classifier-scores cls.json: {"<image path>": p_abnormal, ...})

Weighted box fusion (Solovyev, Wang, Gabruseva, "Weighted boxes fusion: Ensembling boxes
from different object detection models", Image and Vision Computing 2021), per image and
label: every model's boxes (score >= ``skip_box_thr``) sorted by score x model weight;
each box joins the cluster whose fused box it overlaps most with IoU >= ``iou_thr``
(else it starts a cluster), and the cluster's fused box is recomputed as the
confidence-weighted mean of its members' coordinates (weights score x model weight).
A cluster's score is the weighted mean of its members' scores, times the share of the
total model weight that contributed to it:

    score = (sum_i w_i s_i / sum_i w_i) * (sum of w_m over the models m in the cluster) / (sum of all w_m)

so a box found by one of two equally weighted models keeps half its score. When each
model puts at most one box in a cluster this is exactly the reference implementation's
``conf_type="avg"`` (``ensemble_boxes``); when one model puts several boxes in the same
cluster, they count once towards the share of models (the paper's "number of models
that predicted the box"), where ``ensemble_boxes`` counts boxes.

Both experiments are scored by `run_evaluation` (thresholds chosen on the val
split, metrics on the test split), each single model beside the ensemble, and written
as one JSON (default runs/ensemble/<experiment>.json). With several alphas, the one with
the best val mAP@0.5 is marked (ties: the larger alpha, i.e. closer to the detector).

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bone_r import DISCLAIMER
from bone_r.card import load_model_card
from bone_r.dataset import DataError, load_ground_truth
from bone_r.detection import load_records
from bone_r.fusion import (
    DEFAULT_ALPHAS,
    DEFAULT_IOU_THR,
    DEFAULT_SKIP_BOX_THR,
    EnsembleError,
    ScoreLookup,
    classifier_scores,
    format_rows,
    load_classifier_scores,
    run_fusion,
    run_wbf,
    simulate,
)
from bone_r.metrics import jsonable, predict_split

ROOT = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- the two fusions


# --------------------------------------------------------------------------- records


# --------------------------------------------------------------------------- evaluation (evaluate.py's functions)


# --------------------------------------------------------------------------- simulation (synthetic, no images)


# --------------------------------------------------------------------------- CLI


def _named(spec: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    if not sep:
        name, value = Path(spec).stem, spec
    if not name or not value:
        raise EnsembleError(f"bad spec {spec!r}: expected NAME=PATH")
    return name, value


def _predict_records(spec: str, data: Path | None, split: str, val_split: str, device: str) -> tuple[str, list[dict[str, Any]]]:
    """Predict the val and test splits with a model (`name=weights[:backend]`) -> records."""
    from inference import ModelSpecError, build_predictor, parse_model_spec

    if data is None:
        raise EnsembleError("--models needs --data (the splits to predict)")
    try:
        ms = parse_model_spec(spec)
        predictor = build_predictor(ms, device)
        records = []
        for s in (val_split, split):
            records += predict_split(predictor, load_ground_truth(data, s))
    except (ModelSpecError, DataError) as err:
        raise EnsembleError(str(err)) from None
    return ms.name, records


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Ensembles scored by evaluate.py: weighted box fusion across detectors (wbf) and "
                                            "detector x abnormality-classifier fusion (fuse). Research tool, not a diagnosis.")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", type=Path, help="dataset yaml; without it only the fused predictions are written")
    common.add_argument("--split", default="test")
    common.add_argument("--val-split", default="val", help="thresholds (and alpha) are chosen here")
    common.add_argument("--n-boot", type=int, default=2000)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--allow-missing", action="store_true", help="score images without a prediction as empty (listed)")
    common.add_argument("--out", type=Path, help="comparison JSON (default runs/ensemble/<command>.json)")
    common.add_argument("--fused-out", type=Path, help="write the fused predictions (records) here")
    common.add_argument("--device", default="cpu")

    w = sub.add_parser("wbf", parents=[common], help="weighted box fusion across detectors")
    w.add_argument("--predictions", nargs="+", default=[], metavar="NAME=RESULTS.json[,MORE.json]",
                   help="saved val+test predictions per model (in one file, or several joined by commas)")
    w.add_argument("--models", nargs="+", default=[], metavar="NAME=WEIGHTS[:BACKEND]", help="models to predict val+test with")
    w.add_argument("--model-weights", nargs="+", type=float, help="one weight per model, in the order given (default all 1)")
    w.add_argument("--iou-thr", type=float, default=DEFAULT_IOU_THR, help=f"cluster IoU (default {DEFAULT_IOU_THR})")
    w.add_argument("--skip-box-thr", type=float, default=DEFAULT_SKIP_BOX_THR, help="ignore boxes below this score")

    f = sub.add_parser("fuse", parents=[common], help="detector x abnormality-classifier fusion")
    src = f.add_mutually_exclusive_group(required=True)
    src.add_argument("--detector-predictions", metavar="[NAME=]RESULTS.json", help="the detector's saved val+test predictions")
    src.add_argument("--detector", metavar="NAME=WEIGHTS[:BACKEND]", help="a detector to predict val+test with")
    cls = f.add_mutually_exclusive_group(required=True)
    cls.add_argument("--classifier-scores", type=Path, help="JSON {image: p_abnormal}")
    cls.add_argument("--classifier", type=Path, help="a classifier checkpoint (train_mura_cls.py's best.pth; models.classifier.load_classifier)")
    f.add_argument("--alpha", nargs="+", type=float, default=list(DEFAULT_ALPHAS), help="alpha value(s) in [0, 1]")
    f.add_argument("--save-classifier-scores", type=Path, help="with --classifier: save the p_abnormal it gave each image")

    s = sub.add_parser("simulate", help="both fusions on made-up cases (no images, no models): what to expect, not evidence")
    s.add_argument("--classifier-auc", nargs="+", type=float, default=[0.6, 0.75, 0.9], help="simulated classifiers' AUCs")
    s.add_argument("--alpha", nargs="+", type=float, default=list(DEFAULT_ALPHAS))
    s.add_argument("--n-val", type=int, default=300)
    s.add_argument("--n-test", type=int, default=600)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-boot", type=int, default=500)
    s.add_argument("--out", type=Path, help="JSON (default runs/ensemble/simulate.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return _run(args)
    except (EnsembleError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.n_boot < 0:
        raise EnsembleError("--n-boot must be >= 0")
    if args.command == "simulate":
        if min(args.n_val, args.n_test) < 20 or not all(0 <= a <= 1 for a in args.alpha):
            raise EnsembleError("--n-val and --n-test must be >= 20 and every --alpha in [0, 1]")
        payload = simulate(args.classifier_auc, args.alpha, n_val=args.n_val, n_test=args.n_test, seed=args.seed, n_boot=args.n_boot)
        out = args.out or ROOT / "runs" / "ensemble" / "simulate.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")
        print(format_rows(payload))
        print(f"report: {out}  (synthetic: made-up cases and detectors, no images)")
        return 0
    if args.data is None and args.fused_out is None:
        raise EnsembleError("nothing to do: pass --data to score the ensemble, and/or --fused-out to save its predictions")
    if args.data is not None and not args.data.is_file():
        raise EnsembleError(f"dataset yaml not found: {args.data}")
    bases: list[Path] = []
    if args.command == "wbf":
        if not 0 <= args.iou_thr <= 1 or not 0 <= args.skip_box_thr <= 1:
            raise EnsembleError("--iou-thr and --skip-box-thr must lie in [0, 1]")
        named = []
        for spec in args.predictions:
            name, paths = _named(spec)
            records = []
            for path in paths.split(","):  # one model's predictions in several files (e.g. val and test saved apart)
                records += load_records(path)
                bases.append(Path(path).resolve().parent)
            named.append((name, records))
        for spec in args.models:
            named.append(_predict_records(spec, args.data, args.split, args.val_split, args.device))
        if len(named) < 2:
            raise EnsembleError("wbf needs at least two models (--predictions and/or --models)")
        if len({n for n, _ in named}) != len(named):
            raise EnsembleError("model names must be unique")
        if args.model_weights and len(args.model_weights) != len(named):
            raise EnsembleError(f"{len(args.model_weights)} --model-weights for {len(named)} models")
        if args.model_weights and any(w <= 0 for w in args.model_weights):
            raise EnsembleError("--model-weights must be positive")
        payload, fused = run_wbf(named, args.data, split=args.split, val_split=args.val_split, weights=args.model_weights,
                                 iou_thr=args.iou_thr, skip_box_thr=args.skip_box_thr, n_boot=args.n_boot, seed=args.seed,
                                 allow_missing=args.allow_missing, bases=bases)
        fused_out = fused
    else:
        if args.detector_predictions:
            name, path = _named(args.detector_predictions)
            det_records = load_records(path)
            bases.append(Path(path).resolve().parent)
        else:
            name, det_records = _predict_records(args.detector, args.data, args.split, args.val_split, args.device)
        if args.classifier_scores:
            scores = load_classifier_scores(args.classifier_scores)
            cls_name = str(args.classifier_scores)
        else:
            if not args.classifier.is_file():
                raise EnsembleError(f"classifier checkpoint not found: {args.classifier}")
            try:
                from models.classifier import load_classifier
            except ImportError as err:
                raise EnsembleError(f"cannot load the classifier code (models.classifier.load_classifier): {err}") from None
            # The classifier sees what it saw in training: the contract on its card (same stem, .json), if any.
            try:
                card = load_model_card(args.classifier)
                contract = card.contract if card else None
            except ValueError as err:
                raise EnsembleError(f"classifier card: {err}") from None
            try:
                classifier = load_classifier(args.classifier)
            except ValueError as err:  # not a classifier checkpoint readable with weights_only=True
                raise EnsembleError(f"classifier: {err}") from None
            scores = classifier_scores(det_records, classifier, contract)
            cls_name = str(args.classifier)
            if args.save_classifier_scores:
                args.save_classifier_scores.parent.mkdir(parents=True, exist_ok=True)
                args.save_classifier_scores.write_text(json.dumps(scores, indent=2) + "\n")
        payload, fused_by_alpha = run_fusion(name, det_records, ScoreLookup(scores), args.data, alphas=args.alpha, split=args.split,
                                             val_split=args.val_split, n_boot=args.n_boot, seed=args.seed,
                                             allow_missing=args.allow_missing, classifier=cls_name, bases=bases)
        chosen = payload["settings"].get("alpha_chosen", float(args.alpha[0]))
        fused_out = fused_by_alpha[chosen]
    if args.fused_out:
        args.fused_out.parent.mkdir(parents=True, exist_ok=True)
        args.fused_out.write_text(json.dumps(fused_out, indent=2) + "\n")
        print(f"fused predictions ({len(fused_out)} images): {args.fused_out}")
    if args.data is not None:

        out = args.out or ROOT / "runs" / "ensemble" / f"{args.command}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(jsonable(payload), indent=2) + "\n")
        print(format_rows(payload))
        print(f"report: {out}")
    for problem in payload.get("problems", [])[:5]:
        print(f"note: {problem}")
    print(DISCLAIMER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
