"""Foundation benchmarks: preprocess throughput and load_image peak memory.

    python scripts/bench_foundation.py throughput --n 200 --size 2560x2048 --workers 1 2 --repeats 3
    python scripts/bench_foundation.py memory --megapixels 100

`throughput` writes N 16-bit PNG phantoms of the given HxW to a temporary folder,
then times `scripts/preprocess.py` over them (fresh output each run) for each
worker count, and reports the median images/s. `memory` writes one image at the
pixel limit and measures, in a fresh process, the peak resident memory of
`load_image` on it (and of `harmonize` after it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bone_r.contract import Contract
from bone_r.image import DEFAULT_MAX_PIXELS
from bone_r.preprocess import plan, preprocess_tree


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput", help="preprocess.py images/s")
    t.add_argument("--n", type=int, default=200)
    t.add_argument("--size", default="2560x2048", help="HxW of the phantoms")
    t.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    t.add_argument("--repeats", type=int, default=3)
    m = sub.add_parser("memory", help="peak RSS of load_image at the pixel limit")
    m.add_argument("--megapixels", type=float, default=100.0)
    m.add_argument("--format", choices=["png16", "png8", "jpeg"], default="png16")
    return p


def throughput(args) -> dict:
    import cv2
    from tqdm import tqdm

    from bone_r.synthetic import make_phantom

    h, w = (int(v) for v in args.size.lower().split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="boner-bench-"))
    try:
        src = tmp / "src"
        src.mkdir()
        base = [make_phantom(h, w, seed=s).pixels for s in range(4)]
        for i in tqdm(range(args.n), desc="write phantoms"):
            cv2.imwrite(str(src / f"p{i:04d}.png"), base[i % 4])
        results = {}
        for workers in args.workers:
            rates = []
            for r in range(args.repeats):
                out = tmp / f"out-{workers}-{r}"
                t0 = time.perf_counter()
                images, others = plan(src, out)  # what scripts/preprocess.py runs
                rows, _ = preprocess_tree(images, others, out, Contract(), workers=workers, max_pixels=DEFAULT_MAX_PIXELS, quiet=True)
                elapsed = time.perf_counter() - t0
                if any(r["error"] for r in rows):
                    raise SystemExit("preprocess failed on some phantoms")
                rates.append(args.n / elapsed)
                shutil.rmtree(out)
            results[workers] = {"median_images_per_s": round(statistics.median(rates), 2), "runs": [round(x, 2) for x in rates]}
            print(f"workers={workers}: median {results[workers]['median_images_per_s']} images/s over {args.repeats} runs {results[workers]['runs']}")
        if 1 in results and len(results) > 1:
            for workers, res in results.items():
                if workers != 1:
                    print(f"speed-up {workers} vs 1 worker: {res['median_images_per_s'] / results[1]['median_images_per_s']:.2f}x")
        return {"n": args.n, "size_hw": [h, w], "results": results}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Peak RSS from /proc (VmHWM): it belongs to this process image, unlike ru_maxrss, which
# Linux carries over from the parent across fork+exec.
_PROBE = r"""
import sys, time, json
def peak_mb():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024
import numpy as np, cv2
from bone_r.image import load_image, DEFAULT_MAX_PIXELS
from bone_r.contract import harmonize
data = open(sys.argv[1], 'rb').read()
base = peak_mb()
t0 = time.perf_counter()
img = load_image(data, max_pixels=DEFAULT_MAX_PIXELS)
t1 = time.perf_counter()
after_load = peak_mb()
rgb = harmonize(img.pixels)
after_harm = peak_mb()
print(json.dumps({"shape": list(img.pixels.shape), "dtype": str(img.pixels.dtype), "file_mb": len(data) / 2**20,
                  "peak_before_mb": base, "peak_after_load_mb": after_load,
                  "load_increase_mb": after_load - base, "peak_after_harmonize_mb": after_harm,
                  "array_mb": img.pixels.nbytes / 2**20, "load_s": t1 - t0}))
"""


def memory(args) -> dict:
    import cv2
    import numpy as np

    side = int((args.megapixels * 1e6) ** 0.5)
    while side * side > args.megapixels * 1e6:
        side -= 1
    tmp = Path(tempfile.mkdtemp(prefix="boner-mem-"))
    try:
        rng = np.random.default_rng(0)
        yy = np.linspace(0, 1, side, dtype=np.float32)[:, None]
        xx = np.linspace(0, 1, side, dtype=np.float32)[None, :]
        img = (np.sin(xx * 40) * np.cos(yy * 30) + 1) / 2
        img += rng.normal(0, 0.02, (side, side)).astype(np.float32)
        if args.format == "png16":
            arr, ext = (np.clip(img, 0, 1) * 4095).astype(np.uint16), ".png"
        else:
            arr, ext = (np.clip(img, 0, 1) * 255).astype(np.uint8), ".png" if args.format == "png8" else ".jpg"
        del img
        path = tmp / f"big{ext}"
        cv2.imwrite(str(path), arr)
        del arr
        out = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout)
        result["megapixels"] = side * side / 1e6
        print(json.dumps(result, indent=2))
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    throughput(args) if args.what == "throughput" else memory(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
