"""Export a trained detector to ONNX, with its model card: an Ultralytics YOLO ``.pt`` or a torchvision ``.pth``.

    python scripts/export_onnx.py --weights runs/y8n-640/weights/best.pt
    python scripts/export_onnx.py --weights best.pt --out weights/bone-r-default.onnx --imgsz 640 --static
    python scripts/export_onnx.py --weights runs/frcnn/weights/best.pth --out weights/frcnn.onnx \
        --check img1.png img2.png --bench 20 --threads 2
    python scripts/export_onnx.py --weights runs/ft3/weights/best.pth --fp16-checkpoint runs/cand/bone-r-default.pth \
        --out runs/cand/bone-r-default.onnx --store-fp16 --check img1.png    # a bundle candidate: float16 .pth + .onnx

The ONNX file goes to ``--out`` (default ``<weights folder>/onnx/<stem>.onnx``: not
beside the weights, whose card ``<stem>.json`` names the PyTorch backend). Its card is
a copy of the weights' card with ``backend: "onnx"`` and the export settings
(``export``: source weights and their sha256, opset, input size, ``source_backend``).
Both run in the ``onnx`` backend (models/onnx.py), which tells them apart by the
file's metadata.

- YOLO: the input is dynamic (batch, height, width) unless ``--static``: the backend
  then feeds a stride-aligned rectangle, exactly as Ultralytics' PyTorch predictor
  does, so boxes match and a non-square radiograph costs less.
- torchvision (Faster R-CNN, RetinaNet, FCOS from ``train_torchvision.py``): the whole
  detector after the normalization and the resize (padding, backbone, heads, NMS)
  with a dynamic height and width; the backend reproduces the PyTorch backend's
  normalization and resize bit for bit, so boxes match to float precision. Two graph rewrites make it faster without changing
  a box (see `models.torchvision_det.onnx_export_patches`). Test-time settings
  (proposals, score threshold, detections per image) are the checkpoint's.

``--check`` runs both backends through `inference.Predictor` on the given images and
compares boxes; ``--bench N`` times both, interleaved image by image in two worker
processes so that a busy machine slows both alike, and prints the speed-up.

The ``.pt`` is a pickle: export only weights you trust (your own runs). ``.pth``
checkpoints are read with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bone_r import DISCLAIMER
from bone_r.card import DEFAULT_IMGSZ, ModelCard, card_path_for, load_model_card
from bone_r.contract import Contract
from bone_r.runs import set_threads
from inference import check_against_pytorch
from models.export import FP16_MIN_ELEMENTS, TORCHVISION_OPSET, ExportError, export_onnx
from models.torchvision_det import save_half_checkpoint


def _bench_worker(conn, kind: str, weights: str, threads: int, conf: float) -> None:
    """One model in its own process: predicts each image path the parent sends and answers its stage times (ms).

    A process per model: once torch has run, its OpenMP threads keep spinning for a while and would slow
    whatever ran next in the same process; and the idle worker waits on its pipe, costing nothing.
    """
    import time

    set_threads(threads)
    if kind == "ultralytics":
        from ultralytics import YOLO

        imgsz = int((load_model_card(weights) or ModelCard()).imgsz or DEFAULT_IMGSZ)
        model = YOLO(weights, task="detect")

        def once(path: str) -> dict[str, float]:
            t0 = time.perf_counter()
            model.predict(path, imgsz=imgsz, conf=conf, device="cpu", verbose=False)
            return {"end_to_end": (time.perf_counter() - t0) * 1e3}
    else:
        from bone_r.image import load_image
        from inference import Predictor

        predictor = Predictor(weights)

        def once(path: str) -> dict[str, float]:
            t0 = time.perf_counter()
            loaded = load_image(path, max_pixels=predictor.max_pixels)
            t1 = time.perf_counter()
            pred = predictor.predict_loaded(loaded, path, conf=conf)
            t2 = time.perf_counter()
            times = pred.timings_ms
            return {"decode": (t1 - t0) * 1e3, "harmonize": times["harmonize_ms"], "model": times["model_ms"],
                    "post": times["post_ms"], "end_to_end": (t2 - t0) * 1e3}
    conn.send("ready")
    while (path := conn.recv()) is not None:
        conn.send(once(path))


def benchmark(pt_weights: Path, onnx_path: Path, images: list[Path], runs: int, *, threads: int | None = None,
              warmup: int = 2, conf: float = 0.25) -> dict:
    """Median ms per stage for the ONNX and the PyTorch model through `inference.Predictor` (and, for a YOLO
    ``.pt``, Ultralytics' own ``YOLO(pt).predict(path)``), timed interleaved: each of `runs` rounds gives the
    next image to every model in turn (the order alternating), so load from other processes falls on all alike.
    `speedup`: the PyTorch model's median end-to-end ms over the ONNX model's, on the same images in the same run.
    """
    import multiprocessing
    import statistics

    threads = int(threads or available_threads())
    models = [("onnx", "predictor", onnx_path), ("pytorch", "predictor", pt_weights)]
    if Path(pt_weights).suffix == ".pt":
        models.append(("ultralytics", "ultralytics", pt_weights))
    ctx = multiprocessing.get_context("spawn")
    workers = {}
    load_before = os.getloadavg()
    try:
        for name, kind, weights in models:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_bench_worker, args=(child, kind, str(weights), threads, conf), daemon=True)
            proc.start()
            workers[name] = (proc, parent)
        for name, (_proc, conn) in workers.items():
            try:
                ready = conn.recv()
            except EOFError:  # the worker died while loading its model (its traceback is on stderr)
                ready = None
            if ready != "ready":
                raise ExportError(f"the {name} timing worker did not start")
        times: dict[str, list[dict[str, float]]] = {name: [] for name in workers}
        for i in range(warmup + runs):
            path = str(images[i % len(images)])
            order = list(workers) if i % 2 == 0 else list(reversed(workers))
            for name in order:
                workers[name][1].send(path)
                answer = workers[name][1].recv()
                if i >= warmup:
                    times[name].append(answer)
    finally:
        for proc, conn in workers.values():
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
    result: dict = {"images": len(images), "runs": runs, "warmup": warmup, "threads": threads,
                    "loadavg_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}
    for name, rows in times.items():
        result[f"{name}_ms"] = {stage: round(statistics.median(r[stage] for r in rows), 1) for stage in rows[0]}
    result["speedup"] = round(result["pytorch_ms"]["end_to_end"] / result["onnx_ms"]["end_to_end"], 2)
    result["model_speedup"] = round(result["pytorch_ms"]["model"] / result["onnx_ms"]["model"], 2)
    if "ultralytics_ms" in result:
        result["speedup_vs_ultralytics"] = round(result["ultralytics_ms"]["end_to_end"] / result["onnx_ms"]["end_to_end"], 2)
    return result


def available_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, required=True,
                   help="Ultralytics .pt or train_torchvision.py .pth (its card <stem>.json is copied)")
    p.add_argument("--out", type=Path, default=None, help="the .onnx to write (default: <weights folder>/onnx/<stem>.onnx)")
    p.add_argument("--imgsz", type=int, default=None, help="export image size (default: the card's imgsz, else 640; "
                   "torchvision: the checkpoint's, which cannot change)")
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default: Ultralytics' choice; torchvision {TORCHVISION_OPSET})")
    p.add_argument("--static", action="store_true", help="YOLO: fixed imgsz x imgsz input instead of a dynamic H x W")
    p.add_argument("--no-simplify", action="store_true", help="YOLO: skip onnxslim (torchvision exports are not slimmed: "
                   "ONNX Runtime's own graph optimizations do the same)")
    p.add_argument("--store-fp16", action="store_true",
                   help=f"store weight tensors of >= {FP16_MIN_ELEMENTS} values as float16 (half the file), cast back to "
                        "float32 in the graph: computes in float32, as fast (ONNX Runtime folds the casts at load)")
    p.add_argument("--fp16-checkpoint", type=Path, default=None, metavar="PTH",
                   help="torchvision: first write the .pth with its weights rounded to float16 storage (what the bundle "
                        "stores; loaded as float32) to PTH and export that: the .onnx and the .pth then hold the same "
                        "weights, and with the same stem (a bundle) one card serves both")
    p.add_argument("--contract", type=Path, default=None, help="contract JSON, when the weights have no model card")
    p.add_argument("--check", type=Path, nargs="*", default=[], metavar="IMAGE",
                   help="compare ONNX and PyTorch boxes on these images (exit 1 on a mismatch)")
    p.add_argument("--conf", type=float, default=0.25, help="score level for --check and --bench (default: %(default)s)")
    p.add_argument("--iou-min", type=float, default=None,
                   help="--check: a matched box's least IoU (default: 0.99 torchvision, 0.95 YOLO)")
    p.add_argument("--score-tol", type=float, default=None,
                   help="--check: the largest score difference (default: 0.001 torchvision, 0.02 YOLO)")
    p.add_argument("--bench", type=int, default=0, metavar="N",
                   help="time N end-to-end predictions of each model, interleaved, cycling over the --check images")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime in --check and "
                   "--bench (default: all usable cores)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.bench and not args.check:
        print("error: --bench times the --check images: pass --check IMAGE ...", file=sys.stderr)
        return 2
    if args.bench < 0 or (args.threads is not None and args.threads < 1) or not 0 <= args.conf <= 1:
        print("error: --bench must be >= 0, --threads >= 1 and --conf in [0, 1]", file=sys.stderr)
        return 2
    missing = [str(p) for p in args.check if not p.is_file()]
    if missing:
        print(f"error: --check image(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.fp16_checkpoint is not None:
        if args.weights.suffix != ".pth" or args.fp16_checkpoint.suffix != ".pth":
            print("error: --fp16-checkpoint takes a torchvision .pth and writes a .pth", file=sys.stderr)
            return 2
        if args.fp16_checkpoint.resolve() == args.weights.resolve():
            print("error: --fp16-checkpoint must not overwrite --weights", file=sys.stderr)
            return 2
        try:
            save_half_checkpoint(args.weights, args.fp16_checkpoint)
        except (ValueError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {args.fp16_checkpoint} (float16 storage) and its card")
        args.weights = args.fp16_checkpoint
    try:
        contract = Contract.load(args.contract) if args.contract else None
        out = export_onnx(args.weights, args.out, imgsz=args.imgsz, opset=args.opset, dynamic=not args.static,
                          simplify=not args.no_simplify, contract=contract, store_fp16=args.store_fp16,
                          shared_card=args.fp16_checkpoint is not None)
    except (ExportError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} and its card {card_path_for(out)}")
    rc = 0
    if args.check:
        torchvision = args.weights.suffix == ".pth"
        iou_min = args.iou_min if args.iou_min is not None else (0.99 if torchvision else 0.95)
        score_tol = args.score_tol if args.score_tol is not None else (1e-3 if torchvision else 0.02)
        if args.threads:
            set_threads(args.threads)
        rows = check_against_pytorch(args.weights, out, args.check, args.conf, iou_min=iou_min, score_tol=score_tol)
        for row in rows:
            print(json.dumps(row))
            rc |= not row["ok"]
        if not any(row["n_reference"] for row in rows):
            print(f"note: no box scored >= {args.conf} on these images, so nothing was compared; lower --conf")
        print("boxes match the PyTorch model" if not rc else "MISMATCH between ONNX and PyTorch boxes", file=sys.stderr if rc else sys.stdout)
        if args.bench:
            print(json.dumps(benchmark(args.weights, out, args.check, args.bench, threads=args.threads, conf=args.conf)))
    print(DISCLAIMER)
    return 1 if rc else 0


if __name__ == "__main__":
    sys.exit(main())
