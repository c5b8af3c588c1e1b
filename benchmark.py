"""Benchmark models on one split through evaluate.py's functions, or time them (--speed).

    # accuracy: every model on the same split -> console table + docs/data/benchmark.json
    python benchmark.py --data data/merged/dataset.yaml --models yolo=weights/bone-r-default.pt onnx=weights/bone-r-default.onnx
    # speed: median / p90 ms per image for each stage, PyTorch vs the default backend, one run
    python benchmark.py --speed --models pt=weights/bone-r-default.pt onnx=weights/bone-r-default.onnx --threads 2

Models are ``name=weights[:backend]`` (backend: a name from `models.available_backends()`;
default: the model card's, else the file type) or a YAML list (``--models-yaml``) of
``{name, weights, backend}``.

Accuracy: each model predicts the split (boxes down to score 0.001) and is scored
by `run_evaluation`; its operating thresholds come from its model card
(chosen on val by `evaluate.py --write-card`), else they are chosen on the val split
now by `choose_operating_points`. The JSON follows docs/data/benchmark.schema.json.

Speed: on N images (default: synthetic 16-bit phantom radiographs of 2000x2500 px
written as PNG to a temporary folder; or ``--images DIR``), after a warm-up, per model:
decode (`load_image`), harmonize (`harmonize`), model
(`detector.predict`), post (mapping to original pixels + hints) and end to end; for a
YOLO ``.pt`` also plain Ultralytics ``YOLO(pt).predict(path)`` end to end on the same
files. Every model predicts at its balanced threshold (the plain Ultralytics run uses the
same conf and imgsz). ``--threads`` (default: all cores) caps torch's threads, OpenMP and
the ONNX backend's intra-op threads (``BONE_R_ORT_THREADS``); it is set before any model loads.

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bone_r import site
from bone_r.card import DEFAULT_IMGSZ, ModelCard, load_model_card
from bone_r.dataset import DataError, load_ground_truth
from bone_r.image import list_images, load_image
from bone_r.metrics import jsonable, run_evaluation
from bone_r.modes import resolve_threshold
from bone_r.report import num, with_ci
from bone_r.runs import display_path, git_commit, set_threads
from inference import ModelSpec, build_predictor, load_models_yaml, parse_model_spec

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "docs" / "data" / "benchmark.json"
SCHEMA_NAME = "benchmark.schema.json"


class BenchmarkError(ValueError):
    """Bad input: the message is one line for a person."""


def count_params(detector: Any) -> int | None:
    """Parameters of a torch-backed detector (found on `.model`, `.model.model`, ...), else None."""
    obj = detector
    for _ in range(3):
        params = getattr(obj, "parameters", None)
        if callable(params):
            try:
                return int(sum(p.numel() for p in params()))
            except TypeError:
                return None
        obj = getattr(obj, "model", None)
        if obj is None:
            return None
    return None


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "p90": None}
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(round(0.9 * (len(values) - 1))))]
    return {"median": round(statistics.median(values), 2), "p90": round(p90, 2)}


def _e2e_ms(record: dict[str, Any]) -> float | None:
    t = record.get("timings_ms") or {}
    keys = ("decode_ms", "harmonize_ms", "model_ms", "post_ms")
    return sum(float(t[k]) for k in keys) if all(k in t for k in keys) else None


# --------------------------------------------------------------------------- accuracy


def backend_label(predictor: Any) -> str:
    """The detector's name, marked when its card has it predict each image mirrored too (twice the model time)."""
    mirrored = getattr(getattr(predictor, "settings", None), "tta", "none") == "hflip"
    return f"{predictor.name} + mirror" if mirrored else str(predictor.name)


def benchmark_row(spec: ModelSpec, predictor: Any, summary: dict[str, Any], thresholds_source: str,
                  ms_per_image: dict[str, Any], n_errors: int = 0) -> dict[str, Any]:
    """One benchmark.json row from an evaluation summary: an evaluate.py report, or the `metrics` of a model card
    (both hold `box`, `image_auc` and `image_level`)."""
    bal = summary["image_level"].get("balanced") or {}
    return {
        "name": spec.name,
        "weights": display_path(spec.weights),
        "backend": backend_label(predictor),
        "map50": summary["box"]["map50"],
        "map50_95": summary["box"]["map50_95"],
        "roc_auc": (summary.get("image_auc") or {}).get("roc_auc"),
        "balanced": {"threshold": bal.get("threshold"), "sensitivity": bal.get("sensitivity"), "specificity": bal.get("specificity")},
        "thresholds_source": thresholds_source,
        "ms_per_image": ms_per_image,
        "params": count_params(predictor.detector),
        "size_mb": round(spec.weights.stat().st_size / 2**20, 3) if spec.weights.is_file() else None,
        "n_errors": n_errors,
    }


def benchmark_model(spec: ModelSpec, data: str | Path, split: str = "test", val_split: str = "val", *, n_boot: int = 2000,
                    seed: int = 0, device: str = "cpu", progress: bool = True, predictor: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(benchmark row, full evaluate report) for one model."""

    predictor = predictor or build_predictor(spec, device)
    card_thresholds = predictor.card.thresholds if predictor.card else None
    try:
        report = run_evaluation(predictor, data, split, val_split, thresholds=card_thresholds or None,
                                         threshold_source="model_card", n_boot=n_boot, seed=seed, progress=progress, keep_records=True)
    except DataError as err:
        raise BenchmarkError(f"model {spec.name}: {err}") from None
    records = report.pop("_records")
    ms = [v for v in map(_e2e_ms, records) if v is not None]
    row = benchmark_row(spec, predictor, report, "model_card" if card_thresholds else "val",
                        _stats(ms) | {"n": len(ms), "what": "decode + harmonize + model + post, per image, during this evaluation"},
                        n_errors=len(report.get("errors", [])))
    return row, report


def row_from_card(spec: ModelSpec, splits_sha256: str | None, split: str = "test", device: str = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """(benchmark row, the card's metrics) from the test metrics `evaluate.py --write-card` stored in the model's card,
    without predicting again. Refused unless the card was scored on `split` of this very dataset (splits.csv hash)."""
    card = load_model_card(spec.weights) or ModelCard()
    metrics = card.metrics
    evaluate_first = (f"run: python evaluate.py --weights {display_path(spec.weights)} --data <dataset.yaml> "
                      f"--write-card")
    if not metrics:
        raise BenchmarkError(f"model {spec.name}: its card has no test metrics; {evaluate_first}")
    if metrics.get("split") != split or not splits_sha256 or metrics.get("splits_sha256") != splits_sha256:
        raise BenchmarkError(f"model {spec.name}: its card was scored on split {metrics.get('split')!r} of a dataset with "
                             f"splits.csv {str(metrics.get('splits_sha256'))[:12]}, not {split!r} of this one "
                             f"({str(splits_sha256)[:12]}); {evaluate_first}")
    predictor = build_predictor(spec, device)  # loads, predicts nothing: backend name and parameter count
    row = benchmark_row(spec, predictor, metrics, "model_card",
                        {"median": None, "p90": None, "n": 0,
                         "what": f"not timed: row from the model card (evaluate.py, {metrics.get('evaluated')})"})
    return row, metrics


def add_speed(payload: dict[str, Any], speed_payload: dict[str, Any]) -> int:
    """Fill `ms_per_image` of benchmark rows from a `--speed --json` result for the same weights file (the timed
    end to end median); returns how many rows were filled."""
    timed = {m["weights"]: m for m in speed_payload.get("models", [])}
    images, machine = speed_payload.get("images", {}), speed_payload.get("machine", {})
    filled = 0
    for row in payload["models"]:
        m = timed.get(row["weights"])
        if m is None:
            continue
        e2e = m["stages_ms"]["end_to_end"]
        row["ms_per_image"] = {"median": e2e["median"], "p90": e2e["p90"], "n": m["stages_ms"]["n"],
                               "what": f"end to end (decode + harmonize + model + post) on {images.get('n')} image(s) of "
                                       f"{images.get('sizes_wh')} px, {machine.get('threads')} thread(s): benchmark.py "
                                       f"--speed at commit {speed_payload.get('commit')}"}
        filled += 1
    return filled


def benchmark(specs: list[ModelSpec], data: str | Path, split: str = "test", val_split: str = "val", *, n_boot: int = 2000,
              seed: int = 0, device: str = "cpu", progress: bool = True, predictors: dict[str, Any] | None = None,
              from_cards: bool = False) -> dict[str, Any]:
    """Every model on the same split -> the docs/data/benchmark.json payload (`from_cards`: rows from the models'
    cards, which evaluate.py scored on this split; nothing is predicted)."""

    sha = load_ground_truth(data, split).splits_sha256 if from_cards else None
    rows, first = [], None
    for spec in specs:
        if from_cards:
            row, report = row_from_card(spec, sha, split, device)
        else:
            row, report = benchmark_model(spec, data, split, val_split, n_boot=n_boot, seed=seed, device=device,
                                          progress=progress, predictor=(predictors or {}).get(spec.name))
        rows.append(row)
        first = first or report
    assert first is not None
    return jsonable({
        "schema": SCHEMA_NAME,
        "generated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(short=True),
        "data": display_path(data),
        "split": split,
        "val_split": val_split,
        "n_images": first["n_images"],
        "n_positive": first["n_positive"],
        "splits_sha256": first.get("splits_sha256"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": device},
        "bootstrap": first.get("bootstrap") if from_cards else {"n_boot": n_boot, "seed": seed, "resampled": "groups"},
        "models": rows,
        "notes": first.get("notes", []),
        "disclaimer": "Research and teaching tool, not a diagnosis.",
    })


def format_table(payload: dict[str, Any]) -> str:
    lines = [f"{payload['split']} split of {payload['data']}: {payload['n_images']} images, {payload['n_positive']} positive "
             f"(commit {payload['commit']})",
             f"{'model':<18} {'backend':<22} {'mAP50':>6} {'mAP50-95':>8} {'tau':>7} {'sens [95% CI]':<20} {'spec [95% CI]':<20} "
             f"{'ms/img':>7} {'params':>10} {'MB':>7}"]
    for r in payload["models"]:
        lines.append(f"{r['name'][:18]:<18} {r['backend'][:22]:<22} {num(r['map50']):>6} {num(r['map50_95']):>8} "
                     f"{num(r['balanced']['threshold'], 4):>7} {with_ci(r['balanced']['sensitivity'], ci_digits=2, note=False):<20} {with_ci(r['balanced']['specificity'], ci_digits=2, note=False):<20} "
                     f"{num(r['ms_per_image']['median'], 1):>7} {r['params'] if r['params'] is not None else 'n/a':>10} "
                     f"{num(r['size_mb'], 1):>7}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- speed


def write_phantoms(folder: Path, n: int, width: int, height: int, seed: int = 0) -> list[Path]:
    """N 16-bit PNG phantom radiographs (bone_r.synthetic) of width x height."""
    import cv2

    from bone_r.synthetic import make_phantom

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"phantom_{i:03d}.png"
        cv2.imwrite(str(path), make_phantom(height, width, fractured=i % 2 == 0, seed=seed + i, bits=16).pixels)
        paths.append(path)
    return paths


def time_pipeline(predictor: Any, images: list[Path], warmup: int = 2, repeats: int = 1) -> dict[str, Any]:
    """Median/p90 ms per image of each stage of `inference.Predictor` (the serving path)."""
    for i in range(warmup):
        predictor.predict(images[i % len(images)])
    stages: dict[str, list[float]] = {k: [] for k in ("decode", "harmonize", "model", "post", "end_to_end")}
    for _ in range(repeats):
        for path in images:
            t0 = time.perf_counter()
            loaded = load_image(path, max_pixels=predictor.max_pixels)
            t1 = time.perf_counter()
            pred = predictor.predict_loaded(loaded, str(path))
            t2 = time.perf_counter()
            stages["decode"].append((t1 - t0) * 1e3)
            stages["harmonize"].append(pred.timings_ms["harmonize_ms"])
            stages["model"].append(pred.timings_ms["model_ms"])
            stages["post"].append(pred.timings_ms["post_ms"])
            stages["end_to_end"].append((t2 - t0) * 1e3)
    return {k: _stats(v) for k, v in stages.items()} | {"n": len(stages["end_to_end"])}


def time_plain_ultralytics(weights: Path, images: list[Path], conf: float, imgsz: int, device: str = "cpu",
                           warmup: int = 2, repeats: int = 1) -> dict[str, Any]:
    """Plain `YOLO(pt).predict(path)` end to end (it decodes the file itself, no harmonization)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    model = YOLO(str(weights), task="detect")
    kw = {"conf": conf, "imgsz": imgsz, "device": device, "verbose": False}
    for i in range(warmup):
        model.predict(str(images[i % len(images)]), **kw)
    times = []
    for _ in range(repeats):
        for path in images:
            t0 = time.perf_counter()
            model.predict(str(path), **kw)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"end_to_end": _stats(times), "n": len(times), "conf": conf, "imgsz": imgsz}


def speed(specs: list[ModelSpec], images: list[Path], *, warmup: int = 2, repeats: int = 1, threads: int | None = None,
          device: str = "cpu", predictors: dict[str, Any] | None = None, plain_ultralytics: bool = True) -> dict[str, Any]:
    """Time every model on the same images in one run; ratios against plain Ultralytics PyTorch."""
    from tqdm import tqdm

    if threads:
        set_threads(threads)
    rows = []
    baseline = None
    for spec in tqdm(specs, desc="speed", unit="model"):
        predictor = (predictors or {}).get(spec.name) or build_predictor(spec, device)
        row: dict[str, Any] = {"name": spec.name, "weights": display_path(spec.weights), "backend": backend_label(predictor)}
        row |= {"stages_ms": time_pipeline(predictor, images, warmup, repeats)}
        if plain_ultralytics and spec.weights.suffix == ".pt" and str(predictor.name).startswith("yolo"):
            conf, _ = resolve_threshold("balanced", predictor.card)
            imgsz = predictor.settings.imgsz or getattr(predictor.detector, "imgsz", None) or DEFAULT_IMGSZ
            row["plain_ultralytics_ms"] = time_plain_ultralytics(spec.weights, images, conf, imgsz, device, warmup, repeats)
            if baseline is None:
                baseline = (spec.name, row["plain_ultralytics_ms"]["end_to_end"]["median"])
        rows.append(row)
    what = "plain Ultralytics YOLO(pt).predict(path)"
    torch_row = next((r for r in rows if Path(r["weights"]).suffix == ".pth"), None)
    if baseline is None and torch_row is not None:  # no YOLO .pt: a torchvision checkpoint's PyTorch backend is plain PyTorch
        baseline = (torch_row["name"], torch_row["stages_ms"]["end_to_end"]["median"])
        what = "the torchvision checkpoint through its PyTorch backend (inference.Predictor)"
    for row in rows:
        med = row["stages_ms"]["end_to_end"]["median"]
        if baseline and baseline[1] and med:
            row["speedup_vs_plain_pytorch"] = round(baseline[1] / med, 3)
    from bone_r.dataset import image_size

    sizes = sorted({image_size(Path(p)) for p in images})
    return {
        "generated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(short=True),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": threads, "device": device},
        "images": {"n": len(images), "sizes_wh": [list(s) for s in sizes], "warmup": warmup, "repeats": repeats},
        "baseline": None if baseline is None else {"model": baseline[0], "what": what, "end_to_end_median_ms": baseline[1]},
        "models": rows,
        "notes": ["speedup_vs_plain_pytorch = the baseline's (plain Ultralytics, else a .pth's PyTorch backend) median end-to-end ms / this model's (>1: faster)",
                  "threads: torch.set_num_threads, OMP_NUM_THREADS and BONE_R_ORT_THREADS (ONNX Runtime intra-op) = --threads"],
    }


def format_speed(payload: dict[str, Any]) -> str:
    def ms(s):
        return "n/a" if s is None or s.get("median") is None else f"{s['median']:.1f}/{s['p90']:.1f}"

    lines = [f"{payload['images']['n']} image(s) {payload['images']['sizes_wh']}, threads {payload['machine']['threads']}, "
             f"warmup {payload['images']['warmup']}; median/p90 ms per image",
             f"{'model':<16} {'backend':<22} {'decode':>13} {'harmonize':>13} {'model':>13} {'post':>11} {'end-to-end':>13} "
             f"{'plain UL':>13} {'speedup':>8}"]
    for r in payload["models"]:
        s = r["stages_ms"]
        plain = (r.get("plain_ultralytics_ms") or {}).get("end_to_end")
        sp = r.get("speedup_vs_plain_pytorch")
        lines.append(f"{r['name'][:16]:<16} {r['backend'][:22]:<22} {ms(s['decode']):>13} {ms(s['harmonize']):>13} {ms(s['model']):>13} "
                     f"{ms(s['post']):>11} {ms(s['end_to_end']):>13} {ms(plain):>13} {f'x{sp:.2f}' if sp else 'n/a':>8}")
    if payload.get("baseline"):
        lines.append(f"speedup = {payload['baseline']['what']} ({payload['baseline']['model']}) median / the row's median end-to-end")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    if w < 32 or h < 32:
        raise argparse.ArgumentTypeError("width and height must be >= 32")
    return w, h


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark models on one split (accuracy) or time them (--speed). Research tool, not a diagnosis.")
    p.add_argument("--models", nargs="+", default=[], metavar="NAME=WEIGHTS[:BACKEND]", help="models to compare")
    p.add_argument("--models-yaml", type=Path, help="a YAML list of {name, weights, backend}")
    p.add_argument("--data", type=Path, help="dataset yaml (accuracy mode)")
    p.add_argument("--split", default="test")
    p.add_argument("--val-split", default="val", help="where thresholds are chosen for models whose card has none")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help=f"accuracy JSON (default: {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--speed-json", type=Path, default=None, metavar="SPEED_JSON",
                   help="fill ms/image from a `--speed --json SPEED_JSON` run (rows with the same weights)")
    p.add_argument("--from-cards", action="store_true",
                   help="rows from each model's card (test metrics of `evaluate.py --write-card` on this dataset, "
                        "checked by the splits.csv hash) instead of predicting the split again")
    s = p.add_argument_group("speed mode")
    s.add_argument("--speed", action="store_true", help="time each stage instead of scoring")
    s.add_argument("--images", type=Path, help="images to time (default: synthetic phantoms)")
    s.add_argument("--n", type=int, default=10, help="number of synthetic phantoms (or the first N of --images)")
    s.add_argument("--size", type=_size, default=(2000, 2500), help="phantom WIDTHxHEIGHT (default 2000x2500)")
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--repeats", type=int, default=1, help="passes over the images")
    s.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for torch/OpenMP (default: all cores)")
    s.add_argument("--no-plain", action="store_true", help="skip the plain Ultralytics baseline")
    s.add_argument("--json", type=Path, help="save the speed results as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        specs = [parse_model_spec(m) for m in args.models]
        if args.models_yaml:
            specs += load_models_yaml(args.models_yaml)
        if not specs:
            raise BenchmarkError("no models: pass --models NAME=WEIGHTS[:BACKEND] ... or --models-yaml")
        if len({s.name for s in specs}) != len(specs):
            raise BenchmarkError("model names must be unique")
        for spec in specs:
            if not spec.weights.is_file():
                raise BenchmarkError(f"model {spec.name}: weights not found: {spec.weights}")
        if args.speed:
            if args.n < 1 or args.warmup < 0 or args.repeats < 1 or (args.threads is not None and args.threads < 1):
                raise BenchmarkError("--n and --repeats must be >= 1, --warmup >= 0, --threads >= 1")
            return _main_speed(args, specs)
        if args.data is None:
            raise BenchmarkError("--data is required (or pass --speed)")
        if args.n_boot < 0:
            raise BenchmarkError("--n-boot must be >= 0")
        payload = benchmark(specs, args.data, args.split, args.val_split, n_boot=args.n_boot, seed=args.seed,
                            device=args.device, progress=not args.quiet, from_cards=args.from_cards)
        if args.speed_json:
            try:
                speed_payload = json.loads(args.speed_json.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise BenchmarkError(f"cannot read --speed-json: {err}") from None
            if not add_speed(payload, speed_payload):
                raise BenchmarkError(f"{args.speed_json} times none of these weights files")
    except BenchmarkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # DataError and friends
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    site.refresh_bundle(out)  # pages opened from disk read bundle.js
    print(format_table(payload))
    print(f"wrote {out}")
    print("Research and teaching tool, not a diagnosis.")
    return 0


def _main_speed(args: argparse.Namespace, specs: list[ModelSpec]) -> int:

    if args.threads:
        set_threads(args.threads)  # before any model loads
    with tempfile.TemporaryDirectory(prefix="bone-r-speed-") as tmp:
        if args.images:
            if not args.images.is_dir():
                raise BenchmarkError(f"not a folder: {args.images}")
            images = list_images(args.images)[: args.n]
            if not images:
                raise BenchmarkError(f"no images in {args.images}")
        else:
            images = write_phantoms(Path(tmp), args.n, *args.size)
        payload = speed(specs, images, warmup=args.warmup, repeats=args.repeats, threads=args.threads, device=args.device,
                        plain_ultralytics=not args.no_plain)
        payload["images"]["source"] = str(args.images) if args.images else f"synthetic phantoms {args.size[0]}x{args.size[1]} (16-bit PNG)"
    print(format_speed(payload))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
