"""Bone-R's shared inference module: `Predictor` (a detector, its model card's contract, thresholds and box rule:
the one prediction path) and the predict command, on top of the `bone_r` library (decode, harmonize, detections,
cards, modes). The service, the site's scripts, the evaluation and the benchmark predict through it. Model specs
(``name=weights[:backend]``) for the commands that compare several models live here too. Importing it has no side
effects: heavy libraries (pydicom, torch, the model backends) load on first use.

    python inference.py --image xray.png --out prediction.png --json prediction.json

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bone_r import DISCLAIMER
from bone_r.bulk import ALL, ResumeError, ShardSpecError, StreamedOutput, parse_shard, prefetch, relative_key, resume
from bone_r.card import ModelCard, load_model_card, resolve
from bone_r.contract import Contract, harmonize, scale_boxes
from bone_r.detection import Detection, Prediction, guess_type_and_severity
from bone_r.draw import encode_png, overlay_for
from bone_r.image import (
    DEFAULT_MAX_MEMORY,
    DEFAULT_MAX_PIXELS,
    OVERLAY_BYTES_PER_PIXEL,
    ImageDecodeError,
    LoadedImage,
    load_image,
    scan_folder,
)
from bone_r.metrics import match_detections
from bone_r.modes import MODES, resolve_threshold
from bone_r.runs import ROOT, display_path

WEIGHTS_DIR = ROOT / "weights"
DEFAULT_MODEL_NAME = "bone-r-default"


def default_weights() -> Path:
    """The bundled default model; a clear error when it is missing."""
    for suffix in (".onnx", ".pt"):
        path = WEIGHTS_DIR / f"{DEFAULT_MODEL_NAME}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no bundled model found at {display_path(WEIGHTS_DIR / DEFAULT_MODEL_NAME)}.onnx (or .pt); "
        "pass --weights PATH to a trained model (e.g. runs/<name>/weights/best.pt from train.py)"
    )


# --------------------------------------------------------------------------- prediction


class Predictor:
    """A detector plus its contract, thresholds, box rule and test-time augmentation: the one prediction path.

    `weights` defaults to the bundled model. The contract, the thresholds, the box rule and
    the test-time augmentation (`tta`: "hflip" also predicts the mirrored image and fuses
    the two views) come from the weights' model card, so prediction sees what training saw;
    without a card the documented defaults are used (and reported as such).
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        backend: str | None = None,
        device: str = "cpu",
        contract: Contract | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        detector: Any = None,
        card: ModelCard | dict[str, Any] | None = None,
        imgsz: int | None = None,
        tta: str | None = None,
    ):
        self.max_pixels = max_pixels
        if isinstance(card, dict):
            card = ModelCard.from_dict(card)
        if detector is not None:  # injected (tests, the ensemble)
            self.weights = Path(weights) if weights else None
            self.card = card
        else:
            self.weights = Path(weights) if weights else default_weights()
            if not self.weights.is_file():
                raise FileNotFoundError(f"weights not found: {self.weights}")
            self.card = card if card is not None else load_model_card(self.weights)
        # explicit arguments, then the card, then the defaults: the backend is handed the resolved size
        self.settings = resolve(self.card, imgsz=imgsz, contract=contract, tta=tta)
        if detector is None:
            from models import build_detector, infer_backend

            detector = build_detector(backend or infer_backend(self.weights, self.card), self.weights, device=device,
                                      imgsz=self.settings.imgsz)
        if self.settings.tta == "hflip":
            from bone_r.fusion import MirrorTTA

            detector = MirrorTTA(detector)
        self.detector = detector
        self.contract = self.settings.contract
        self.box_rule = self.settings.box_rule

    @property
    def name(self) -> str:
        return getattr(self.detector, "name", "detector")

    def threshold(self, mode: str = "balanced", conf: float | None = None) -> tuple[float, str]:
        return resolve_threshold(mode, self.card, conf)

    def predict_loaded(
        self, loaded: LoadedImage, image: str = "", mode: str = "balanced", conf: float | None = None,
        min_score: float | None = None, hints: bool = True, timings: dict[str, float] | None = None,
        contract: Contract | None = None,
    ) -> Prediction:
        """Predict on an already decoded image. `min_score` keeps lower boxes (evaluation uses 0.001);
        `contract` replaces the model's for this call (evaluation of an already harmonized tree)."""
        threshold, source = self.threshold(mode, conf)
        keep = threshold if min_score is None else min(min_score, threshold)
        timings = dict(timings or {})
        t0 = time.perf_counter()
        rgb = harmonize(loaded.pixels, contract or self.contract)
        t1 = time.perf_counter()
        raw = self.detector.predict(rgb, keep)
        t2 = time.perf_counter()
        meta = loaded.meta
        harmonized_wh = (rgb.shape[1], rgb.shape[0])
        detections = []
        if raw:
            boxes = scale_boxes(np.array([d.xyxy for d in raw]), harmonized_wh, meta.size)
            for det, box in zip(raw, boxes):
                if det.score < keep:
                    continue
                out = Detection(tuple(box), det.score, det.label, det.model or self.name)
                if hints:
                    out.hints = guess_type_and_severity(out, meta.size)
                detections.append(out)
        detections = self.box_rule.apply(detections)
        t3 = time.perf_counter()
        timings.update(harmonize_ms=(t1 - t0) * 1e3, model_ms=(t2 - t1) * 1e3, post_ms=(t3 - t2) * 1e3)
        return Prediction(image, meta.width, meta.height, mode, threshold, source, detections, timings, meta)

    def predict_paths(self, paths: list[Path], mode: str = "balanced", conf: float | None = None, workers: int = 0,
                      worker_kind: str = "thread", **load_kw: Any) -> Iterator[tuple[Path, Prediction | ImageDecodeError, LoadedImage | None]]:
        """``(path, prediction or the decode error, decoded image)`` for each path in order, with `workers` images
        decoded ahead of the model on threads or processes (`bone_r.bulk.prefetch`); `load_kw` goes to `load_image`
        (budgets), the contract is the model's."""
        decode = functools.partial(timed_load, contract=self.contract, **load_kw)
        for path, decoded in prefetch(decode, paths, workers, worker_kind):
            if isinstance(decoded, ImageDecodeError):
                yield path, decoded, None
                continue
            if isinstance(decoded, BaseException):
                raise decoded
            loaded, decode_ms = decoded
            yield path, self.predict_loaded(loaded, str(path), mode, conf, timings={"decode_ms": decode_ms}), loaded

    def predict(self, source: str | Path | bytes, mode: str = "balanced", conf: float | None = None, **kw: Any) -> Prediction:
        """Decode, harmonize, detect, and map boxes back to original pixels."""
        t0 = time.perf_counter()
        loaded = load_image(source, max_pixels=self.max_pixels, contract=self.contract)
        decode_ms = (time.perf_counter() - t0) * 1e3
        name = "" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
        return self.predict_loaded(loaded, name, mode, conf, timings={"decode_ms": decode_ms}, **kw)


# --------------------------------------------------------------------------- drawing


# --------------------------------------------------------------------------- CLI


# --------------------------------------------------------------------------- model specs (benchmark, ensemble, comparison)


class ModelSpecError(ValueError):
    """A model spec or models file that cannot be used: the message is one line for a person."""


@dataclass
class ModelSpec:
    name: str
    weights: Path
    backend: str | None = None


def parse_model_spec(spec: str) -> ModelSpec:
    """``name=weights[:backend]``; a bare path is named after its stem."""
    from models import available_backends

    name, sep, rest = spec.partition("=")
    if not sep:
        name, rest = Path(spec).stem, spec
    if not name or not rest:
        raise ModelSpecError(f"bad model spec {spec!r}: expected name=weights[:backend]")
    backend = None
    head, colon, tail = rest.rpartition(":")
    if colon and tail in available_backends():
        rest, backend = head, tail
    return ModelSpec(name, Path(rest), backend)


def load_models_yaml(path: str | Path) -> list[ModelSpec]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ModelSpecError(f"models file not found: {path}")
    data = yaml.safe_load(path.read_text())
    if isinstance(data, dict):
        data = data.get("models", data)
    if not isinstance(data, list) or not all(isinstance(m, dict) and "weights" in m for m in data):
        raise ModelSpecError(f"{path}: expected a list of {{name, weights, backend}}")
    base = path.resolve().parent
    specs = []
    for m in data:
        w = Path(m["weights"])
        specs.append(ModelSpec(str(m.get("name") or w.stem), w if w.is_absolute() else base / w, m.get("backend")))
    return specs


def build_predictor(spec: ModelSpec, device: str = "cpu") -> Predictor:
    """The spec's Predictor; any failure to load it is a `ModelSpecError` of one line."""
    try:
        return Predictor(spec.weights, spec.backend, device)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise ModelSpecError(f"model {spec.name}: {err}") from None
    except Exception as err:  # noqa: BLE001 - a backend failing to load a file: one line, no traceback
        raise ModelSpecError(f"model {spec.name}: cannot load {spec.weights}: {type(err).__name__}: {err}") from None


def check_against_pytorch(pt_weights: Path, onnx_path: Path, images: list[Path], conf: float, *, iou_min: float = 0.95,
                          score_tol: float = 0.02) -> list[dict]:
    """Both models through `Predictor` (same decode, contract and mapping) on each image."""
    pt, ox = Predictor(pt_weights), Predictor(onnx_path)
    rows = []
    for image in images:
        a = pt.predict(image, conf=conf, hints=False).detections
        b = ox.predict(image, conf=conf, hints=False).detections
        rows.append({"image": str(image), **match_detections(a, b, conf, iou_min=iou_min, score_tol=score_tol)})
    return rows


def overlay_path(out: Path, folder: Path, image: Path) -> Path:
    """Where folder mode writes an image's overlay: its path below `folder` with ".png" added, so that
    a.png, a.jpg and sub/a.png get a.png.png, a.jpg.png and sub/a.png.png instead of overwriting each other."""
    relative = image.relative_to(folder)
    return out / relative.parent / f"{relative.name}.png"


def timed_load(path: Path, **kw: Any) -> tuple[LoadedImage, float]:
    """`load_image` and its wall time in ms (module level: a process pool pickles it)."""
    t0 = time.perf_counter()
    loaded = load_image(path, **kw)
    return loaded, (time.perf_counter() - t0) * 1e3


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Find and localize fractures on radiographs (research tool, not a diagnosis).",
    )
    p.add_argument("--image", required=True, type=Path, help="an image (PNG/JPEG/TIFF/BMP/DICOM) or a folder of them")
    p.add_argument("--weights", type=Path, default=None, help="model weights (default: the bundled model in weights/)")
    p.add_argument("--backend", default=None, help="detector backend (default: from the model card or file type)")
    p.add_argument("--mode", default="balanced", choices=MODES, help="operating point (thresholds from the model card)")
    p.add_argument("--conf", type=float, default=None, help="score threshold in [0, 1], overriding --mode")
    p.add_argument("--out", type=Path, default=None, help="overlay PNG (a folder when --image is a folder)")
    p.add_argument("--json", type=Path, default=None,
                   help="write the prediction(s) as JSON; a .jsonl path writes one record per line as each image "
                        "finishes (shards concatenate with cat; --resume continues it)")
    p.add_argument("--csv", type=Path, default=None,
                   help="write a flat table, one row per detection, as each image finishes")
    p.add_argument("--shard", default=None, metavar="i/N",
                   help="folder mode: predict only shard i of N (0-based) of the folder's sorted images, so that N "
                        "processes, machines or array jobs cover it exactly once, e.g. "
                        "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")
    p.add_argument("--resume", action="store_true",
                   help="folder mode: skip images already in the .jsonl/--csv output (a torn last record from a "
                        "killed run is cut and predicted again) and append the rest")
    p.add_argument("--workers", type=int, default=0,
                   help="decode this many images ahead of the model on worker threads (0: decode in turn)")
    p.add_argument("--worker-kind", default="thread", choices=("thread", "process"),
                   help="decode workers are threads (default; the decoders release the GIL) or processes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse images with more pixels")
    p.add_argument("--max-memory-mb", type=float, default=DEFAULT_MAX_MEMORY / 1e6,
                   help="refuse images whose decode (and overlay) would need more memory, estimated from the header")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.conf is not None and not 0 <= args.conf <= 1:
        print(f"error: --conf must lie in [0, 1], got {args.conf}", file=sys.stderr)
        return 2
    if not args.max_memory_mb > 0:
        print(f"error: --max-memory-mb must be above 0, got {args.max_memory_mb}", file=sys.stderr)
        return 2
    if not args.image.exists():
        print(f"error: {args.image} does not exist", file=sys.stderr)
        return 2
    folder = args.image.is_dir()
    if not folder and (args.shard or args.resume):
        print("error: --shard and --resume need --image to be a folder", file=sys.stderr)
        return 2
    if args.workers < 0:
        print(f"error: --workers must be 0 or more, got {args.workers}", file=sys.stderr)
        return 2
    try:
        shard = parse_shard(args.shard) if args.shard is not None else ALL
    except ShardSpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    jsonl = args.json is not None and args.json.suffix.lower() == ".jsonl"
    if args.resume and (not (jsonl or args.csv) or (args.json and not jsonl)):
        print("error: --resume appends to --json FILE.jsonl and/or --csv FILE (a .json array cannot be appended to)",
              file=sys.stderr)
        return 2
    images, skipped = scan_folder(args.image) if folder else ([args.image], [])
    if not images and not skipped:
        print(f"error: no images found in {args.image}", file=sys.stderr)
        return 2
    if folder:  # one partition of images and unreadable entries alike, so each is reported by exactly one shard
        entries = shard.select([(p, None) for p in images] + list(skipped), key=lambda e: relative_key(args.image)(e[0]))
        images, skipped = [p for p, why in entries if why is None], [(p, why) for p, why in entries if why is not None]
    streams = ([StreamedOutput(args.json, "jsonl")] if jsonl else []) + ([StreamedOutput(args.csv, "csv")] if args.csv else [])
    done: set[str] = set()
    if args.resume:
        try:
            state = resume(streams)
        except (ResumeError, UnicodeDecodeError) as err:
            print(f"error: cannot resume: {err}", file=sys.stderr)
            return 2
        done = state.done
        for path, cut in state.cut_bytes.items():
            if cut:
                print(f"resume: cut {cut} byte(s) of a torn or partial last record from {path}; "
                      "that image is predicted again", file=sys.stderr)
        before = len(images) + len(skipped)
        images = [p for p in images if str(p) not in done]
        skipped = [(p, why) for p, why in skipped if str(p) not in done]
        print(f"resume: {before - len(images) - len(skipped)} of {before} image(s) of this shard already done")
    try:
        predictor = Predictor(args.weights, args.backend, args.device, max_pixels=args.max_pixels)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if folder and args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    for stream in streams:
        stream.open(append=args.resume)
    records, failures = [], 0

    def emit(record: dict[str, Any]) -> None:
        records.append(record)
        for stream in streams:
            stream.write(record)

    for path, reason in skipped:  # reported like any image that failed: a line here, a record in the JSON/CSV
        failures += 1
        emit({"image": str(path), "error": f"skipped: {reason}"})
        print(f"error: {path}: skipped: {reason}", file=sys.stderr)
    # the overlay is drawn at the original size: its memory is part of the decode budget
    overlay_cost = OVERLAY_BYTES_PER_PIXEL if args.out else 0
    progress = predictor.predict_paths(images, args.mode, args.conf, args.workers, args.worker_kind,
                                       max_pixels=args.max_pixels, max_memory=int(args.max_memory_mb * 1e6),
                                       extra_bytes_per_pixel=overlay_cost)
    if folder:
        from tqdm import tqdm

        progress = tqdm(progress, total=len(images), desc=f"predict{'' if shard == ALL else f' shard {shard}'}", unit="img")
    try:
        for path, pred, loaded in progress:
            if isinstance(pred, ImageDecodeError):
                failures += 1
                emit({"image": str(path), "error": str(pred)})
                print(f"error: {path}: {pred}", file=sys.stderr)
                continue
            if args.out:
                out = overlay_path(args.out, args.image, path) if folder else args.out
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(encode_png(overlay_for(pred, loaded)))
            emit(pred.to_record())  # after the overlay: an image in the output is finished
            if not folder:
                verdict = "FRACTURE SUSPECTED" if pred.fracture_detected else "no fracture found"
                print(f"{path}: {verdict} ({len(pred.detections)} box(es) >= {pred.threshold:.3f}, mode {args.mode}, "
                      f"threshold from {pred.threshold_source})")
                for det in pred.detections:
                    print(f"  {det.label} {det.score:.3f} at {[round(v) for v in det.xyxy]}  "
                          f"[{det.hints['type']}, {det.hints['severity']} - best guess]")
    finally:
        for stream in streams:
            stream.close()
    if args.json and not jsonl:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = records if folder else records[0]
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if folder:
        positives = sum(1 for r in records if r.get("fracture_detected"))
        print(f"{len(records) - failures} image(s) predicted, {positives} with a suspected fracture, {failures} failed")
    print(DISCLAIMER)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
