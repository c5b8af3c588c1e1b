"""Service overhead: `/detect` p50 against the bare in-process prediction on the same images.

1. Starts the service on loopback (or uses `--url`) and loads the same weights in
   this process with `inference.Predictor`.
2. For `--repeats` rounds over the images, one after the other (never at once):
   a `POST /detect` (client-side wall time), `predictor.predict(bytes)` in process
   (decode + harmonize + model + boxes: what the CLI pays), and the model call alone.
   Interleaving gives both sides the same machine load.
3. overhead = (detect p50 - predict p50) / predict p50; pass when <= `--max-overhead`.

    .venv/bin/python scripts/overhead.py --weights weights/bone-r-default.pt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bone_r.contract import harmonize
from bone_r.image import load_image
from bone_r.modes import MODES
from scripts.service_harness import LocalServer, add_server_args, percentile, radiograph_pngs


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Compare /detect latency with the bare in-process prediction.")
    add_server_args(p)
    p.add_argument("--images", type=int, default=4, help="distinct radiograph-sized PNGs")
    p.add_argument("--repeats", type=int, default=8, help="timed calls per image and side")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per side first")
    p.add_argument("--mode", default="balanced", choices=MODES)
    p.add_argument("--max-overhead", type=float, default=0.20, help="allowed (detect - predict) / predict at p50")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    return p


def measure(args, url: str, images: list[bytes]) -> tuple[list[float], list[float], list[float], dict[str, list[float]]]:
    """Interleaved timings, so that both sides see the same machine load (the CPU may be shared)."""
    import httpx
    from tqdm import tqdm

    import inference

    os.environ.setdefault("YOLO_OFFLINE", "1")
    predictor = inference.Predictor(args.weights, args.backend, args.device)
    harmonized = [harmonize(load_image(d).pixels, predictor.contract) for d in images]
    threshold, _ = predictor.threshold(args.mode)
    detect_ms, predict_ms, model_ms = [], [], []
    stages: dict[str, list[float]] = {}  # server- and in-process stage timings, for the breakdown
    with httpx.Client(timeout=300) as client:
        def call(data: bytes) -> float:
            t0 = time.perf_counter()
            r = client.post(f"{url}/detect", params={"mode": args.mode}, files={"file": ("x.png", data, "image/png")})
            ms = (time.perf_counter() - t0) * 1e3
            if r.status_code != 200:
                raise SystemExit(f"error: /detect answered {r.status_code}: {r.text[:200]}")
            for key, value in r.json()["timings_ms"].items():
                stages.setdefault(f"service.{key}", []).append(value)
            return ms

        for i in range(args.warmup):
            call(images[i % len(images)])
            predictor.predict(images[i % len(images)], args.mode)
        for _ in tqdm(range(args.repeats), desc="overhead", unit="round"):
            for data, rgb in zip(images, harmonized):
                detect_ms.append(call(data))
                t0 = time.perf_counter()
                prediction = predictor.predict(data, args.mode)
                predict_ms.append((time.perf_counter() - t0) * 1e3)
                for key, value in prediction.timings_ms.items():
                    stages.setdefault(f"in_process.{key}", []).append(value)
                t0 = time.perf_counter()
                predictor.detector.predict(rgb, threshold)
                model_ms.append((time.perf_counter() - t0) * 1e3)
    return detect_ms, predict_ms, model_ms, stages


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.url and args.weights is None:
        print("note: with --url, the in-process side loads the default weights; pass the server's --weights too", file=sys.stderr)
    images = radiograph_pngs(args.images)
    with LocalServer(args) as server:
        health = server.health
        try:
            detect_ms, predict_ms, model_ms, stages = measure(args, server.url, images)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    detect_p50, predict_p50, model_p50 = (percentile(v, 50) for v in (detect_ms, predict_ms, model_ms))
    overhead = (detect_p50 - predict_p50) / predict_p50
    report = {
        "model": {"backend": health.get("backend"), "detector": health.get("detector"), "weights": health.get("weights")},
        "images": args.images, "repeats": args.repeats, "image_mb": [round(len(b) / 1e6, 2) for b in images],
        "detect_p50_ms": round(detect_p50, 1), "predict_p50_ms": round(predict_p50, 1), "model_only_p50_ms": round(model_p50, 1),
        "overhead_ms": round(detect_p50 - predict_p50, 1),
        "overhead_vs_predict": round(overhead, 4),
        "overhead_vs_model_only": round((detect_p50 - model_p50) / model_p50, 4),
        "stage_p50_ms": {k: round(percentile(v, 50), 2) for k, v in sorted(stages.items())},
        "max_overhead": args.max_overhead,
        "pass": overhead <= args.max_overhead,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"/detect p50 {detect_p50:.1f} ms vs in-process predict p50 {predict_p50:.1f} ms: overhead "
          f"{detect_p50 - predict_p50:+.1f} ms ({overhead:+.1%}; limit {args.max_overhead:.0%}) -> "
          f"{'PASS' if report['pass'] else 'FAIL'}  [model call alone: {model_p50:.1f} ms]")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
