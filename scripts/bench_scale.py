"""Scaling benchmarks (issue 15): bulk prediction throughput, DICOM decoders, reduced-resolution decoding.

    python scripts/bench_scale.py predict --images data/merged/images/test --n 60 --repeats 3 --threads 1
    python scripts/bench_scale.py shards --images ../shared/data/fracatlas/images --counts 3 7 64
    python scripts/bench_scale.py decoders --dicom ../shared/data/dicom-samples --repeats 7
    python scripts/bench_scale.py reduced --dicom ../shared/data/dicom-samples \\
        --jpegs ../shared/data/fracatlas/images/Fractured --png ../shared/data/grazpedwri-dx-sample --n 60 --repeats 3

Every alternative is timed interleaved with the others in the same run (round-robin over the repeats), so a
shared, noisy machine slows them alike; each row is the median of the repeats, and ratios come from one run.
`predict` times `Predictor.predict_paths` (the loop `inference.py` runs) with the model loaded beforehand:
images/s for each backend x decode workers. `decoders` decodes the first frame of each DICOM sample with every
installed decoder of its family (`bone_r.image.DICOM_DECODERS`) and checks it against pylibjpeg's pixels, and times
`load_image` end to end with the decoder order against pylibjpeg alone (the decoder before the order existed).
`reduced` times `load_image` with the contract's `reduced_decode` off and on. Prints a JSON report (--out too).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bone_r.contract import Contract
from bone_r.image import DICOM_DECODERS, decode_dicom_frame, dicom_family, list_images, load_image
from bone_r.runs import display_path, print_json, set_threads


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("predict", help="images/s of Predictor.predict_paths: backend x decode workers")
    t.add_argument("--images", type=Path, required=True, help="a folder of radiographs")
    t.add_argument("--n", type=int, default=60, help="the first N images (sorted)")
    t.add_argument("--weights", type=Path, nargs="+",
                   default=[Path("weights/bone-r-default.onnx"), Path("weights/bone-r-default.pth")])
    t.add_argument("--workers", default="0,1,2", help="decode workers to compare (comma-separated)")
    t.add_argument("--process-workers", default="2", help="also with process workers (comma-separated; '' for none)")
    t.add_argument("--threads", type=int, default=1, help="model CPU threads (set_threads)")
    c = sub.add_parser("shards", help="check that N-way shards of a folder cover it exactly once (no model)")
    c.add_argument("--images", type=Path, required=True)
    c.add_argument("--counts", type=int, nargs="+", default=[3, 7, 64], help="the N values to check")
    d = sub.add_parser("decoders", help="DICOM first-frame decode ms per decoder, and pixel identity")
    d.add_argument("--dicom", type=Path, required=True, help="a folder of DICOM files")
    r = sub.add_parser("reduced", help="load_image ms with the contract's reduced_decode off and on")
    r.add_argument("--dicom", type=Path, default=None)
    r.add_argument("--jpegs", type=Path, default=None, help="a folder of JPEGs (the first --n, sorted)")
    r.add_argument("--png", type=Path, default=None, help="a folder of (16-bit) PNGs")
    r.add_argument("--n", type=int, default=60)
    r.add_argument("--side", type=int, default=512, help="the reduced_decode long side")
    for s in (t, c, d, r):
        s.add_argument("--repeats", type=int, default=3)
        s.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    return p


def bench_shards(args) -> dict[str, Any]:
    """Each N-way partition of the folder's entries as `inference.py --shard i/N` makes it: cover, overlap, sizes."""
    from bone_r.bulk import Shard, relative_key
    from bone_r.image import scan_folder

    images, skipped = scan_folder(args.images)
    entries = images + [p for p, _ in skipped]
    key = relative_key(args.images)
    rows = {}
    for n in args.counts:
        parts = [Shard(i, n).select(entries, key=key) for i in range(n)]
        flat = [p for part in parts for p in part]
        rows[str(n)] = {"in_shards": len(flat), "distinct": len(set(flat)), "equals_folder": set(flat) == set(entries),
                        "smallest": min(map(len, parts)), "largest": max(map(len, parts))}
    return {"images": display_path(args.images), "entries": len(entries), "shards": rows}


def _ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def bench_predict(args) -> dict[str, Any]:
    from tqdm import tqdm

    from inference import Predictor

    set_threads(args.threads)
    paths = sorted(list_images(args.images))[: args.n]
    if not paths:
        raise SystemExit(f"error: no images in {args.images}")
    configs = [(w, "thread", int(k)) for w in args.weights for k in args.workers.split(",") if k != ""]
    configs += [(w, "process", int(k)) for w in args.weights for k in args.process_workers.split(",") if k != ""]
    predictors = {w: Predictor(w) for w in args.weights}
    for predictor in predictors.values():  # warm-up: first-call costs (graph optimization, allocations)
        list(predictor.predict_paths(paths[:2]))
    rates: dict[str, list[float]] = {}
    for _ in tqdm(range(args.repeats), desc="repeats"):
        for weights, kind, workers in configs:
            t0 = time.perf_counter()
            n = sum(1 for _ in predictors[weights].predict_paths(paths, workers=workers, worker_kind=kind))
            rates.setdefault(f"{weights.suffix[1:]} {kind} workers={workers}", []).append(n / (time.perf_counter() - t0))
    rows = {k: {"images_per_s_median": round(statistics.median(v), 3), "runs": [round(x, 3) for x in v]} for k, v in rates.items()}
    return {"images": display_path(args.images), "n": len(paths), "model_threads": args.threads, "rows": rows}


@contextlib.contextmanager
def _only_pylibjpeg():
    """`DICOM_DECODERS` as the project decoded before the choice existed: pylibjpeg for every family."""
    saved = dict(DICOM_DECODERS)
    DICOM_DECODERS.update({family: ("pylibjpeg",) for family in saved})
    try:
        yield
    finally:
        DICOM_DECODERS.update(saved)


def bench_decoders(args) -> dict[str, Any]:
    import pydicom
    from pydicom.pixels import get_decoder

    rows = []
    for path in sorted(args.dicom.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        tsuid = ds.file_meta.TransferSyntaxUID
        family = dicom_family(tsuid)
        if family is None:
            continue
        plugins = set(get_decoder(tsuid).available_plugins)
        names = [n for n in DICOM_DECODERS[family] if n == "imagecodecs" or n in plugins]
        if "pylibjpeg" not in names:
            continue
        reference = decode_dicom_frame(ds, "pylibjpeg")
        times: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}  # process CPU time: a decoder on several threads
        exact: dict[str, Any] = {}
        for _ in range(args.repeats):
            for name in names:
                try:
                    t0, c0 = time.perf_counter(), time.process_time()
                    arr = decode_dicom_frame(ds, name)
                    times[name].append((time.perf_counter() - t0) * 1e3)
                    cpu[name].append((time.process_time() - c0) * 1e3)
                    exact[name] = bool(arr.shape == reference.shape and np.array_equal(arr, reference))
                    if not exact[name] and arr.shape == reference.shape:
                        exact[name] = f"max |diff| {int(np.abs(arr.astype(np.int32) - reference).max())}"
                except Exception as err:  # noqa: BLE001 - a decoder that cannot read this file: reported
                    exact[name] = f"fails: {type(err).__name__}"
        # end to end (load_image: parse, decode, display rule): the decoder order now vs pylibjpeg alone (before)
        load_now, load_before = [], []
        for _ in range(args.repeats):
            load_now.append(_ms(lambda p=path: load_image(p)))
            with _only_pylibjpeg():
                load_before.append(_ms(lambda p=path: load_image(p)))
        rows.append({"file": path.name, "syntax": tsuid.name, "size": [int(ds.Columns), int(ds.Rows)],
                     "load_image_ms": {"pylibjpeg_only": round(statistics.median(load_before), 1),
                                       "now": round(statistics.median(load_now), 1)},
                     "decoders": {n: {"ms_median": round(statistics.median(t), 1) if t else None,
                                      "cpu_ms_median": round(statistics.median(cpu[n]), 1) if t else None,
                                      "identical": exact[n]} for n, t in times.items()},
                     "first_in_order": next((n for n in names if n in times and times[n]), None),
                     "fastest_identical": min((n for n in names if exact.get(n) is True and times[n]),
                                              key=lambda n: statistics.median(times[n]), default=None),
                     "least_cpu_identical": min((n for n in names if exact.get(n) is True and cpu[n]),
                                                key=lambda n: statistics.median(cpu[n]), default=None)})
    return {"folder": display_path(args.dicom), "repeats": args.repeats, "order": DICOM_DECODERS, "rows": rows}


def bench_reduced(args) -> dict[str, Any]:
    import cv2

    off, on = Contract(), Contract(reduced_decode=args.side)
    groups: dict[str, list[Path]] = {}
    if args.dicom:
        groups["dicom"] = sorted(args.dicom.glob("*.dcm"))
    if args.jpegs:
        groups["jpeg"] = sorted(p for p in list_images(args.jpegs) if p.suffix.lower() in (".jpg", ".jpeg"))[: args.n]
    if args.png:
        groups["png"] = sorted(p for p in list_images(args.png) if p.suffix.lower() == ".png")[: args.n]
    report: dict[str, Any] = {"side": args.side, "repeats": args.repeats, "groups": {}}
    for group, paths in groups.items():
        per_file = []
        for path in paths:
            t_off, t_on = [], []
            for _ in range(args.repeats):
                t_off.append(_ms(lambda p=path: load_image(p, contract=off)))
                t_on.append(_ms(lambda p=path: load_image(p, contract=on)))
            full, reduced = load_image(path, contract=off), load_image(path, contract=on)
            row = {"file": path.name, "size": list(full.meta.size), "reduced": reduced.meta.reduced,
                   "decoder_off": full.meta.dicom.get("decoder", full.meta.format),
                   "decoder_on": reduced.meta.dicom.get("decoder", reduced.meta.format),
                   "ms_off": round(statistics.median(t_off), 2), "ms_on": round(statistics.median(t_on), 2)}
            if reduced.meta.reduced > 1:  # how far the reduced pixels are from the full ones area-downscaled to their size
                h, w = reduced.pixels.shape
                a = cv2.resize(full.pixels.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
                row["mean_abs_diff_vs_area_downscale"] = round(float(np.abs(a - reduced.pixels.astype(np.float32)).mean()), 2)
            per_file.append(row)
        hit = [r for r in per_file if r["reduced"] > 1]
        report["groups"][group] = {
            "files": len(per_file), "reduced_files": len(hit),
            "sum_ms_off": round(sum(r["ms_off"] for r in per_file), 1), "sum_ms_on": round(sum(r["ms_on"] for r in per_file), 1),
            "reduced_only_sum_ms_off": round(sum(r["ms_off"] for r in hit), 1),
            "reduced_only_sum_ms_on": round(sum(r["ms_on"] for r in hit), 1),
            "per_file": per_file if group == "dicom" or len(per_file) <= 10 else hit[:20],
        }
    return report


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.repeats < 1:
        print("error: --repeats must be at least 1", file=sys.stderr)
        return 2
    if args.what == "shards" and min(args.counts) < 1:
        print("error: --counts must all be at least 1", file=sys.stderr)
        return 2
    for name in ("images", "dicom", "jpegs", "png"):
        folder = getattr(args, name, None)
        if folder is not None and not folder.is_dir():
            print(f"error: --{name} {folder} is not a folder", file=sys.stderr)
            return 2
    report = {"predict": bench_predict, "shards": bench_shards, "decoders": bench_decoders,
              "reduced": bench_reduced}[args.what](args)
    print_json(report, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
