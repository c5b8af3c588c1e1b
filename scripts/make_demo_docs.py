"""The docs site's synthetic demo data: phantom images, made-up predictions, a demo report and benchmark.

    python scripts/make_demo_docs.py                 # write docs/data/ demo files (skips real output already there)
    python scripts/make_demo_docs.py --force         # overwrite real output too
    python scripts/make_demo_docs.py --bundle-only   # only refresh docs/data/bundle.js from the JSON there

Nothing here is a radiograph or a model output. The images are tests/phantoms.py
phantoms (a bone-like shaft with a drawn fracture gap, its box known); the "demo"
models' boxes come from a seeded random generator; the demo evaluation report and
benchmark rows are what `evaluate_predictions` makes of made-up cases (no
images), so the site's tables and curves have the real report's shape. Every file
says `"synthetic": true` and every model is labelled "demo (synthetic)". The output is
byte-for-byte the same on every run (fixed seed and timestamp).

`benchmark.py`, `compare_overlay.py` and `evaluate.py --out docs/data/report.json`
replace these files with real output; this script then leaves them alone (a file
without `"synthetic": true` counts as real) unless --force. Where the site has real
cases (`docs/data/cases.json`, from `python -m scripts.make_site_cases`) the viewer
shows those and leaves the synthetic phantoms out; this script never touches them.

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bone_r import site
from bone_r.detection import (
    Detection,
    ImagePrediction,
    guess_type_and_severity,
)
from bone_r.draw import PALETTE
from bone_r.fusion import weighted_boxes_fusion
from bone_r.metrics import evaluate_predictions, image_scores, jsonable
from bone_r.modes import choose_operating_points
from bone_r.site import SITE_DATA, hex_color, site_payload
from bone_r.synthetic import MODEL_A, MODEL_B, demo_detect, demo_ground_truth, jitter

DEMO_STAMP = "2026-11-26T00:00:00+00:00"  # fixed, so a rerun writes the same bytes
SEED = 20261126
DEMO_NOTE = "DEMO: synthetic phantom data and made-up predictions. No radiograph, no trained model."
MODEL_WBF = "demo-wbf (synthetic)"
# Made-up operating thresholds of the demo models (real ones come from a model card).
THRESHOLDS = {MODEL_A: 0.30, MODEL_B: 0.35, MODEL_WBF: 0.25}


# --------------------------------------------------------------------------- made-up detectors


def demo_models(boxes: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> dict[str, list[Detection]]:
    """The two demo detectors' boxes on one image, and their weighted box fusion (ensemble.py)."""
    a = demo_detect(MODEL_A, boxes, size, rng)
    b = demo_detect(MODEL_B, boxes, size, rng)
    return {MODEL_A: a, MODEL_B: b, MODEL_WBF: weighted_boxes_fusion([a, b], model_name=MODEL_WBF)}


# --------------------------------------------------------------------------- the viewer's images


# The viewer's boxes are chosen by hand to show the typical cases: agreement on the
# fracture, a confident false positive of one model, low-score noise, and, on the intact
# phantom, two models agreeing on the same false positive (WBF does not remove that).
# "truth" is the phantom's known box, moved a little by `jitter`.
VIEWER_BOXES = {
    "phantom-fractured": {
        MODEL_A: [("truth", 0.87, 0.06), ((40, 300, 95, 330), 0.12), ((200, 60, 250, 100), 0.41)],
        MODEL_B: [("truth", 0.66, 0.15), ((150, 330, 210, 360), 0.18)],
    },
    "phantom-intact": {
        MODEL_A: [((120, 210, 180, 240), 0.34), ((20, 40, 60, 70), 0.09)],
        MODEL_B: [((125, 205, 190, 245), 0.46), ((250, 330, 300, 370), 0.07)],
    },
}


def viewer_data(out: Path) -> dict[str, Any]:
    """Two phantoms (fractured, intact) as PNG, with the demo models' boxes (`VIEWER_BOXES`) and their WBF."""
    from bone_r.synthetic import make_phantom

    rng = np.random.default_rng(SEED)
    images = []
    for ident, fractured, seed in (("phantom-fractured", True, 7), ("phantom-intact", False, 11)):
        ph = make_phantom(400, 320, fractured=fractured, seed=seed, bits=8)
        ok, png = cv2.imencode(".png", ph.pixels, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        assert ok
        (out / f"{ident}.png").write_bytes(png.tobytes())
        h, w = ph.pixels.shape
        per_model = {}
        for name, boxes in VIEWER_BOXES[ident].items():
            per_model[name] = [Detection(jitter(ph.box, rng, spec[2], (w, h)) if spec[0] == "truth" else spec[0], spec[1],
                                         "fracture", name) for spec in boxes]
        per_model[MODEL_WBF] = weighted_boxes_fusion(list(per_model.values()), model_name=MODEL_WBF)
        detections = [d for dets in per_model.values() for d in dets]
        for d in detections:
            d.hints = guess_type_and_severity(d, (w, h))
        detections.sort(key=lambda d: d.score, reverse=True)
        caption = ("Synthetic phantom with a drawn fracture gap (dashed: its known box)" if fractured
                   else "Synthetic phantom without a fracture: every box on it is a false positive")
        images.append({"id": ident, "src": f"{ident}.png", "width": w, "height": h, "caption": caption,
                       "ground_truth": [{"xyxy": [float(v) for v in ph.box], "label": "fracture"}] if ph.box else [],
                       "detections": [d.to_dict() for d in detections]})
    models = [{"name": name, "color": hex_color(PALETTE[i]), "threshold": THRESHOLDS[name],
               "threshold_source": "demo", "mode": "balanced",
               "description": desc}
              for i, (name, desc) in enumerate([
                  (MODEL_A, "made-up boxes standing in for a YOLO detector"),
                  (MODEL_B, "made-up boxes standing in for an FCOS detector"),
                  (MODEL_WBF, "weighted box fusion of the two demo models (ensemble.py)")])]
    payload = site_payload(models, images, generator="scripts/make_demo_docs.py", synthetic=True, notes=[DEMO_NOTE])
    payload["generated"] = DEMO_STAMP
    return payload


# --------------------------------------------------------------------------- the demo report and benchmark


def demo_reports(n_boot: int) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(benchmark payload, {model: evaluate report}) for the demo models on made-up val/test cases."""
    rng = np.random.default_rng(SEED + 1)
    val, test = demo_ground_truth(150, "val", rng), demo_ground_truth(210, "test", rng)
    preds: dict[str, dict[str, list]] = {m: {"val": [], "test": []} for m in (MODEL_A, MODEL_B, MODEL_WBF)}
    for gt in (val, test):
        for im in gt.images:
            for name, dets in demo_models(im.boxes, (im.width, im.height), rng).items():
                preds[name][gt.split].append(ImagePrediction(
                    np.array([d.xyxy for d in dets], dtype=np.float64).reshape(-1, 4), np.array([d.score for d in dets])))
    reports, rows = {}, []
    for name, p in preds.items():
        ops = choose_operating_points(val.labels, image_scores(p["val"]))
        report = evaluate_predictions(test, p["test"], ops, n_boot=n_boot, seed=0)
        report["created"] = DEMO_STAMP
        report["synthetic"] = True
        report["model"] = {"name": name, "note": DEMO_NOTE}
        report["notes"] = [DEMO_NOTE, *report["notes"]]
        reports[name] = report
        bal = report["image_level"]["balanced"]
        rows.append({"name": name, "weights": "(none: synthetic demo)", "backend": "demo", "map50": report["box"]["map50"],
                     "map50_95": report["box"]["map50_95"], "roc_auc": report["image_auc"]["roc_auc"],
                     "balanced": {"threshold": ops["balanced"]["threshold"], "sensitivity": bal["sensitivity"],
                                  "specificity": bal["specificity"]},
                     "thresholds_source": "val",
                     "ms_per_image": {"median": None, "p90": None, "n": 0, "what": "not measured: synthetic demo"},
                     "params": None, "size_mb": None, "n_errors": 0})
    benchmark = jsonable({
        "schema": "benchmark.schema.json", "generated": DEMO_STAMP, "commit": None,
        "data": "synthetic demo (generated cases, no images)", "split": "test", "val_split": "val",
        "n_images": len(test), "n_positive": test.n_positive, "splits_sha256": None,
        "machine": {"platform": "n/a (synthetic demo)", "cpu_count": None, "device": "n/a"},
        "bootstrap": {"n_boot": n_boot, "seed": 0, "resampled": "groups"},
        "models": rows, "notes": [DEMO_NOTE, "replace with real output: python benchmark.py --data D --models NAME=WEIGHTS ..."],
        "disclaimer": "Research and teaching tool, not a diagnosis.", "synthetic": True,
    })
    return benchmark, reports


# --------------------------------------------------------------------------- CLI


def is_real(path: Path) -> bool:
    """A file there that is not our synthetic demo (real output we must not clobber)."""
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("synthetic") is not True
    except (json.JSONDecodeError, AttributeError):
        return True


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write the docs site's synthetic demo data (phantoms, made-up predictions, demo report).")
    p.add_argument("--out", type=Path, default=SITE_DATA, help="the site's data folder (default docs/data)")
    p.add_argument("--force", action="store_true", help="overwrite real (non-synthetic) JSON there too")
    p.add_argument("--bundle-only", action="store_true", help="only rebuild bundle.js from the JSON files present")
    p.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples for the demo report (default 500)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.n_boot < 0:
        print("error: --n-boot must be >= 0", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.bundle_only:
        bundle = site.write_bundle(out)
        print(f"wrote {bundle}")
        return 0
    from tqdm import tqdm

    written, skipped = [], []
    steps = ["predictions", "report + benchmark"]
    for step in tqdm(steps, desc="demo data", unit="step"):
        if step == "predictions":
            target = out / "predictions.json"
            if is_real(target) and not args.force:
                skipped.append(target)
                continue
            written.append(site.write_json(target, viewer_data(out)))
        else:
            benchmark, reports = demo_reports(args.n_boot)
            for target, payload in ((out / "benchmark.json", benchmark), (out / "report.json", reports[MODEL_A])):
                if is_real(target) and not args.force:
                    skipped.append(target)
                    continue
                written.append(site.write_json(target, payload))
    bundle = site.write_bundle(out, stamp=None if skipped else DEMO_STAMP)
    for path in written:
        print(f"wrote {path}")
    for path in skipped:
        print(f"kept {path}: it holds real output (pass --force to replace it with the demo)")
    print(f"wrote {bundle}")
    print(DEMO_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
