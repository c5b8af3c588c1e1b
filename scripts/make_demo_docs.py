"""The docs site's synthetic demo data: phantom images, made-up predictions, a demo report and benchmark.

    python scripts/make_demo_docs.py                 # write docs/data/ demo files (skips real output already there)
    python scripts/make_demo_docs.py --force         # overwrite real output too
    python scripts/make_demo_docs.py --bundle-only   # only refresh docs/data/bundle.js from the JSON there

Nothing here is a radiograph or a model output. The images are tests/phantoms.py
phantoms (a bone-like shaft with a drawn fracture gap, its box known); the "demo"
models' boxes come from a seeded random generator; the demo evaluation report and
benchmark rows are what `evaluate.evaluate_predictions` makes of made-up cases (no
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import compare_overlay  # noqa: E402
import ensemble  # noqa: E402
import evaluate  # noqa: E402
import inference  # noqa: E402
from inference import Detection  # noqa: E402

DEMO_STAMP = "2026-11-26T00:00:00+00:00"  # fixed, so a rerun writes the same bytes
SEED = 20261126
DEMO_NOTE = "DEMO: synthetic phantom data and made-up predictions. No radiograph, no trained model."
MODEL_A, MODEL_B = "demo-yolo (synthetic)", "demo-fcos (synthetic)"
MODEL_WBF = "demo-wbf (synthetic)"
# Made-up operating thresholds of the demo models (real ones come from a model card).
THRESHOLDS = {MODEL_A: 0.30, MODEL_B: 0.35, MODEL_WBF: 0.25}


# --------------------------------------------------------------------------- made-up detectors


def jitter(box: tuple[float, ...], rng: np.random.Generator, amount: float, size: tuple[int, int]) -> tuple[float, ...]:
    """A detector's imperfect copy of a true box: each side moved by up to `amount` of the box's size."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    dx1, dx2 = rng.uniform(-amount, amount, 2) * w
    dy1, dy2 = rng.uniform(-amount, amount, 2) * h
    x1, x2 = sorted((float(np.clip(x1 + dx1, 0, size[0])), float(np.clip(x2 + dx2, 0, size[0]))))
    y1, y2 = sorted((float(np.clip(y1 + dy1, 0, size[1])), float(np.clip(y2 + dy2, 0, size[1]))))
    return x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)


def random_box(rng: np.random.Generator, size: tuple[int, int]) -> tuple[float, ...]:
    w, h = rng.uniform(0.06, 0.25) * size[0], rng.uniform(0.03, 0.12) * size[1]
    x, y = rng.uniform(0, size[0] - w), rng.uniform(0, size[1] - h)
    return x, y, x + w, y + h


DETECTORS = {
    # name: (chance to find a true box, its score range, box jitter, false positives per image, their score range)
    MODEL_A: (0.85, (0.35, 0.95), 0.12, 0.8, (0.02, 0.55)),
    MODEL_B: (0.75, (0.30, 0.90), 0.20, 0.5, (0.02, 0.50)),
}


def demo_detect(name: str, boxes: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> list[Detection]:
    find, (s_lo, s_hi), amount, fp_rate, (f_lo, f_hi) = DETECTORS[name]
    out = []
    for box in boxes:
        if rng.uniform() < find:
            out.append(Detection(jitter(tuple(box), rng, amount, size), round(float(rng.uniform(s_lo, s_hi)), 4), "fracture", name))
    for _ in range(rng.poisson(fp_rate)):
        out.append(Detection(random_box(rng, size), round(float(rng.uniform(f_lo, f_hi)), 4), "fracture", name))
    return out


def demo_models(boxes: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> dict[str, list[Detection]]:
    """The two demo detectors' boxes on one image, and their weighted box fusion (ensemble.py)."""
    a = demo_detect(MODEL_A, boxes, size, rng)
    b = demo_detect(MODEL_B, boxes, size, rng)
    return {MODEL_A: a, MODEL_B: b, MODEL_WBF: ensemble.weighted_boxes_fusion([a, b], model_name=MODEL_WBF)}


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
    from phantoms import make_phantom

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
        per_model[MODEL_WBF] = ensemble.weighted_boxes_fusion(list(per_model.values()), model_name=MODEL_WBF)
        detections = [d for dets in per_model.values() for d in dets]
        for d in detections:
            d.hints = inference.guess_type_and_severity(d, (w, h))
        detections.sort(key=lambda d: d.score, reverse=True)
        caption = ("Synthetic phantom with a drawn fracture gap (dashed: its known box)" if fractured
                   else "Synthetic phantom without a fracture: every box on it is a false positive")
        images.append({"id": ident, "src": f"{ident}.png", "width": w, "height": h, "caption": caption,
                       "ground_truth": [{"xyxy": [float(v) for v in ph.box], "label": "fracture"}] if ph.box else [],
                       "detections": [d.to_dict() for d in detections]})
    models = [{"name": name, "color": compare_overlay.hex_color(inference.PALETTE[i]), "threshold": THRESHOLDS[name],
               "threshold_source": "demo", "mode": "balanced",
               "description": desc}
              for i, (name, desc) in enumerate([
                  (MODEL_A, "made-up boxes standing in for a YOLO detector"),
                  (MODEL_B, "made-up boxes standing in for an FCOS detector"),
                  (MODEL_WBF, "weighted box fusion of the two demo models (ensemble.py)")])]
    payload = compare_overlay.site_payload(models, images, generator="scripts/make_demo_docs.py", synthetic=True, notes=[DEMO_NOTE])
    payload["generated"] = DEMO_STAMP
    return payload


# --------------------------------------------------------------------------- the demo report and benchmark


def demo_ground_truth(n: int, split: str, rng: np.random.Generator) -> evaluate.GroundTruth:
    """Made-up cases (no image files): sizes, 0-2 true boxes, a source, a region, and pairs sharing a group."""
    sources = ["demo-atlas", "demo-hip", "demo-hand"]
    regions = {"demo-atlas": ["hand", "leg", "shoulder"], "demo-hip": ["hip"], "demo-hand": ["hand", "wrist"]}
    images = []
    for i in range(n):
        source = sources[i % len(sources)]
        region = regions[source][(i // len(sources)) % len(regions[source])]
        size = (int(rng.integers(300, 700)), int(rng.integers(350, 900)))
        n_boxes = int(rng.choice([0, 0, 0, 1, 1, 2]))
        boxes = np.array([random_box(rng, size) for _ in range(n_boxes)], dtype=np.float64).reshape(-1, 4)
        key = f"{split}/case{i:04d}.png"
        images.append(evaluate.GTImage(Path("/synthetic-demo") / key, key, size[0], size[1], boxes, int(n_boxes > 0),
                                       source, region, f"{split}-group{i // 2:04d}"))
    return evaluate.GroundTruth(images, split, "synthetic demo (generated cases, no images)", None,
                                ["synthetic demo: made-up cases and predictions"], None)


def demo_reports(n_boot: int) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(benchmark payload, {model: evaluate report}) for the demo models on made-up val/test cases."""
    rng = np.random.default_rng(SEED + 1)
    val, test = demo_ground_truth(150, "val", rng), demo_ground_truth(210, "test", rng)
    preds: dict[str, dict[str, list]] = {m: {"val": [], "test": []} for m in (MODEL_A, MODEL_B, MODEL_WBF)}
    for gt in (val, test):
        for im in gt.images:
            for name, dets in demo_models(im.boxes, (im.width, im.height), rng).items():
                preds[name][gt.split].append(evaluate.ImagePrediction(
                    np.array([d.xyxy for d in dets], dtype=np.float64).reshape(-1, 4), np.array([d.score for d in dets])))
    reports, rows = {}, []
    for name, p in preds.items():
        ops = evaluate.choose_operating_points(val.labels, evaluate.image_scores(p["val"]))
        report = evaluate.evaluate_predictions(test, p["test"], ops, n_boot=n_boot, seed=0)
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
    benchmark = evaluate.jsonable({
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
    p.add_argument("--out", type=Path, default=compare_overlay.SITE_DATA, help="the site's data folder (default docs/data)")
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
        bundle = compare_overlay.write_site_bundle(out)
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
            written.append(compare_overlay.write_json(target, viewer_data(out)))
        else:
            benchmark, reports = demo_reports(args.n_boot)
            for target, payload in ((out / "benchmark.json", benchmark), (out / "report.json", reports[MODEL_A])):
                if is_real(target) and not args.force:
                    skipped.append(target)
                    continue
                written.append(compare_overlay.write_json(target, payload))
    bundle = compare_overlay.write_site_bundle(out, stamp=None if skipped else DEMO_STAMP)
    for path in written:
        print(f"wrote {path}")
    for path in skipped:
        print(f"kept {path}: it holds real output (pass --force to replace it with the demo)")
    print(f"wrote {bundle}")
    print(DEMO_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
