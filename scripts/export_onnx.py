"""Export a trained Ultralytics YOLO detector to ONNX, with its model card.

    python scripts/export_onnx.py --weights runs/y8n-640/weights/best.pt
    python scripts/export_onnx.py --weights best.pt --out weights/bone-r-default.onnx --imgsz 640 --static

The ONNX file goes to ``--out`` (default ``<weights folder>/onnx/<stem>.onnx``: not
beside the ``.pt``, whose card ``<stem>.json`` says backend "yolo"). Its card is a
copy of the ``.pt``'s card with ``backend: "onnx"`` and the export settings. The
input is dynamic (batch, height, width) unless ``--static``: the ``onnx``
backend then feeds a stride-aligned rectangle, exactly as Ultralytics' PyTorch
predictor does, so boxes match and a non-square radiograph costs less.

The ``.pt`` is a pickle: export only weights you trust (your own runs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from inference import DISCLAIMER, Contract, card_path_for, load_model_card, sha256_file  # noqa: E402


class ExportError(Exception):
    """A problem the user can fix; printed as one line."""


def default_out(weights: Path) -> Path:
    return weights.parent / "onnx" / f"{weights.stem}.onnx"


def export_onnx(weights: str | Path, out: str | Path | None = None, *, imgsz: int | None = None, opset: int | None = None,
                dynamic: bool = True, simplify: bool = True, contract: Contract | None = None) -> Path:
    """Export `weights` (.pt) to ONNX at `out` and write its card; returns the ONNX path.

    The export runs on a copy in a temporary folder, so nothing is written beside the input.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    weights = Path(weights)
    if not weights.is_file():
        raise ExportError(f"weights not found: {weights}")
    if weights.suffix != ".pt":
        raise ExportError(f"expected an Ultralytics .pt checkpoint, got {weights.name}")
    card = load_model_card(weights)
    if card is None and contract is None:
        raise ExportError(f"no model card {card_path_for(weights).name} beside {weights}: pass --contract to state the "
                          "harmonization contract the model was trained with")
    card = dict(card or {"name": weights.stem, "classes": ["fracture"], "disclaimer": DISCLAIMER})
    if contract is not None:
        card["contract"] = contract.to_dict()
    imgsz = int(imgsz or card.get("imgsz") or 640)
    if imgsz % 32:
        raise ExportError(f"imgsz must be a multiple of 32, got {imgsz}")
    out = Path(out) if out else default_out(weights)
    if out.suffix != ".onnx":
        raise ExportError(f"--out must end in .onnx, got {out}")
    if out.resolve() == weights.resolve().with_suffix(".onnx"):
        raise ExportError(f"{out} would share its model card {card_path_for(out).name} with {weights.name}; choose another --out")
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory(prefix="bone-r-export-") as tmp:
        local = Path(tmp) / weights.name
        shutil.copy2(weights, local)
        produced = YOLO(str(local), task="detect").export(format="onnx", imgsz=imgsz, opset=opset, dynamic=dynamic,
                                                          simplify=simplify, half=False, nms=False, batch=1, device="cpu")
        produced = Path(produced)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(produced), out)
    import onnx

    model = onnx.load(str(out), load_external_data=False)
    used_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    import ultralytics

    card.update(
        backend="onnx",
        imgsz=imgsz,
        export={
            "from": str(weights),
            "from_sha256": sha256_file(weights),
            "format": "onnx",
            "imgsz": imgsz,
            "opset": used_opset,
            "dynamic": dynamic,
            "simplify": simplify,
            "ultralytics": ultralytics.__version__,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
    )
    card.setdefault("disclaimer", DISCLAIMER)
    card_path_for(out).write_text(json.dumps(card, indent=2) + "\n")
    return out


def match_detections(reference: list, candidate: list, conf: float, *, iou_min: float = 0.95, score_tol: float = 0.02) -> dict:
    """Do two backends' detections (same image, same pixels) agree above `conf`?

    Greedy matching in reference-score order: each reference box takes, among the
    unused candidates with IoU > iou_min, the one closest in score (boxes clipped to
    the image border can coincide). `ok`: the same number of boxes at score >= conf,
    and every reference box has a partner with IoU > iou_min and |score difference| < score_tol.
    """
    import numpy as np

    from evaluate import box_iou

    ref = [d for d in reference if d.score >= conf]
    cand = [d for d in candidate if d.score >= conf]
    if not ref or not cand:
        return {"n_reference": len(ref), "n_candidate": len(cand), "matched": 0, "min_iou": None, "max_score_diff": None,
                "max_coord_diff": None, "ok": len(ref) == len(cand)}
    ious = box_iou(np.array([d.xyxy for d in ref]), np.array([d.xyxy for d in cand]))
    used: set[int] = set()
    worst_iou, worst_diff, worst_px, matched = 1.0, 0.0, 0.0, 0
    for i, det in enumerate(ref):
        free = [j for j in range(len(cand)) if j not in used]
        close = [j for j in free if ious[i, j] > iou_min]
        if not close:
            worst_iou = min(worst_iou, max((float(ious[i, j]) for j in free), default=0.0))
            continue
        j = min(close, key=lambda k: abs(det.score - cand[k].score))
        used.add(j)
        matched += 1
        worst_iou = min(worst_iou, float(ious[i, j]))
        worst_diff = max(worst_diff, abs(det.score - cand[j].score))
        worst_px = max(worst_px, float(np.abs(np.subtract(det.xyxy, cand[j].xyxy)).max()))
    ok = len(ref) == len(cand) == matched and worst_iou > iou_min and worst_diff < score_tol
    return {"n_reference": len(ref), "n_candidate": len(cand), "matched": matched, "min_iou": round(worst_iou, 5),
            "max_score_diff": round(worst_diff, 6), "max_coord_diff": round(worst_px, 4), "ok": ok}


def check_against_pytorch(pt_weights: Path, onnx_path: Path, images: list[Path], conf: float) -> list[dict]:
    """Both models through `inference.Predictor` (same decode, contract and mapping) on each image."""
    from inference import Predictor

    pt, ox = Predictor(pt_weights), Predictor(onnx_path)
    rows = []
    for image in images:
        a = pt.predict(image, conf=conf, hints=False).detections
        b = ox.predict(image, conf=conf, hints=False).detections
        rows.append({"image": str(image), **match_detections(a, b, conf)})
    return rows


def _median_ms(kind: str, weights: str, image: str, runs: int) -> float:
    """One timing, run in a fresh process (see `benchmark`)."""
    import statistics
    import time

    if kind == "ultralytics":
        from ultralytics import YOLO

        card = load_model_card(weights) or {}
        model = YOLO(weights, task="detect")

        def once():
            model.predict(image, imgsz=int(card.get("imgsz", 640)), conf=0.25, device="cpu", verbose=False)
    else:
        from inference import Predictor

        predictor = Predictor(weights)

        def once():
            predictor.predict(image, conf=0.25)
    once()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        once()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 1)


def benchmark(pt_weights: Path, onnx_path: Path, image: Path, runs: int) -> dict[str, float]:
    """Median end-to-end milliseconds per image: Predictor(onnx), Predictor(.pt) and Ultralytics' own predict.

    Each is timed in its own fresh process: once torch has run, its OpenMP threads
    keep spinning and would slow whatever is timed next in the same process.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = {}
    for key, kind, weights in (("onnx_predictor_ms", "predictor", onnx_path), ("pt_predictor_ms", "predictor", pt_weights),
                               ("ultralytics_predict_ms", "ultralytics", pt_weights)):
        with ctx.Pool(1) as pool:
            out[key] = pool.apply(_median_ms, (kind, str(weights), str(image), runs))
    out["speedup_vs_ultralytics"] = round(out["ultralytics_predict_ms"] / out["onnx_predictor_ms"], 2)
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, required=True, help="Ultralytics .pt (its card <stem>.json is copied)")
    p.add_argument("--out", type=Path, default=None, help="the .onnx to write (default: <weights folder>/onnx/<stem>.onnx)")
    p.add_argument("--imgsz", type=int, default=None, help="export image size (default: the card's imgsz, else 640)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: Ultralytics' choice)")
    p.add_argument("--static", action="store_true", help="fixed imgsz x imgsz input instead of a dynamic H x W")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    p.add_argument("--contract", type=Path, default=None, help="contract JSON, when the .pt has no model card")
    p.add_argument("--check", type=Path, nargs="*", default=[], metavar="IMAGE",
                   help="compare ONNX and PyTorch boxes on these images (exit 1 on a mismatch)")
    p.add_argument("--conf", type=float, default=0.25, help="score level for --check (default: %(default)s)")
    p.add_argument("--bench", type=int, default=0, metavar="N", help="time N end-to-end predictions on the first --check image")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        contract = Contract.load(args.contract) if args.contract else None
        out = export_onnx(args.weights, args.out, imgsz=args.imgsz, opset=args.opset, dynamic=not args.static,
                          simplify=not args.no_simplify, contract=contract)
    except (ExportError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} and its card {card_path_for(out)}")
    rc = 0
    if args.check:
        rows = check_against_pytorch(args.weights, out, args.check, args.conf)
        for row in rows:
            print(json.dumps(row))
            rc |= not row["ok"]
        if not any(row["n_reference"] for row in rows):
            print(f"note: no box scored >= {args.conf} on these images, so nothing was compared; lower --conf")
        print("boxes match the PyTorch model" if not rc else "MISMATCH between ONNX and PyTorch boxes", file=sys.stderr if rc else sys.stdout)
        if args.bench:
            print(json.dumps({"image": str(args.check[0]), "runs": args.bench, **benchmark(args.weights, out, args.check[0], args.bench)}))
    print(DISCLAIMER)
    return 1 if rc else 0


if __name__ == "__main__":
    sys.exit(main())
