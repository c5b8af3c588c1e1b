"""Draw a model's boxes on radiographs: score, best-guess hints, legend, disclaimer band.

    # predict with a model, then draw (PNG, JPEG or DICOM in; PNG or JPEG out)
    python visualize.py --image xray.dcm --weights weights/bone-r-default.pt --out overlay.png
    # draw saved predictions (what `inference.py --json` or `evaluate.py --save-predictions` wrote)
    python visualize.py --image xray.png --predictions results.json --out overlay.jpg
    # a folder of images -> a folder of overlays (never inside the input folder)
    python visualize.py --image scans/ --predictions results.json --out overlays/
    # with the ground truth drawn dashed (YOLO labels: one .txt, or a folder of <image stem>.txt)
    python visualize.py --image data/merged/images/test/x.png --truth data/merged/labels/test --out overlay.png

The drawing is `inference.draw_overlay` (`bone_r.draw`), the same code the service's
`overlay=true` uses: labels outside the box they name and never over each other (or
numbered tags and a key when boxes crowd), the key and the disclaimer below the image.
Images are decoded by `inference.load_image` only. Saved predictions are shown
down to each record's own threshold (or `--conf`), so records kept down to score 0.001
for evaluation still draw only the boxes a user would see.

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import inference
from inference import Detection

OUT_SUFFIXES = {".png", ".jpg", ".jpeg"}


class VisualizeError(ValueError):
    """Bad input: the message is one line for a person."""


def encode(rgb, suffix: str, jpeg_quality: int = 92) -> bytes:
    """PNG (lossless) or JPEG bytes of an RGB overlay."""
    suffix = suffix.lower()
    if suffix == ".png":
        return inference.encode_png(rgb)
    if suffix in (".jpg", ".jpeg"):
        import cv2

        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        return buf.tobytes()
    raise VisualizeError(f"cannot write {suffix!r} overlays: use .png, .jpg or .jpeg")


def load_records(path: Path) -> list[dict[str, Any]]:
    """Prediction records: a list, one record, or {"predictions": [...]}."""
    if not path.is_file():
        raise VisualizeError(f"predictions file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise VisualizeError(f"{path} is not valid JSON: {err}") from None
    if isinstance(data, dict):
        data = [data] if "image" in data else data.get("predictions")
    if not isinstance(data, list) or not all(isinstance(r, dict) and "image" in r for r in data):
        raise VisualizeError(f"{path}: expected prediction records with an 'image' key each (inference.py --json)")
    return data


def find_record(records: list[dict[str, Any]], image: Path) -> dict[str, Any]:
    """The record for `image`: same resolved path, else the only record with that file name."""
    target = os.path.realpath(image)
    same_name = []
    for rec in records:
        name = str(rec.get("image", ""))
        if name and os.path.realpath(name) == target:
            return rec
        if Path(name).name == image.name:
            same_name.append(rec)
    if len(same_name) == 1:
        return same_name[0]
    if len(records) == 1 and not same_name and not records[0].get("image"):
        return records[0]  # a record from bytes (no file name)
    how = "several records share its file name" if same_name else "no record names it"
    raise VisualizeError(f"{image}: {how} in the predictions file")


def detections_from_record(record: dict[str, Any], size: tuple[int, int], conf: float | None = None,
                           model: str | None = None) -> list[Detection]:
    """The record's boxes with score >= `conf` (default: the record's own threshold), hints filled in if absent."""
    if record.get("error"):
        raise VisualizeError(f"{record.get('image')}: the prediction failed: {record['error']}")
    rec_size = record.get("image_size")
    if rec_size is not None and (int(rec_size[0]), int(rec_size[1])) != tuple(size):
        raise VisualizeError(f"{record.get('image')}: the prediction was made on a {rec_size[0]}x{rec_size[1]} image, "
                             f"this image is {size[0]}x{size[1]}")
    threshold = conf if conf is not None else float(record.get("threshold", 0.0) or 0.0)
    out = []
    for raw in record.get("detections") or []:
        try:
            det = Detection.from_dict(raw)
        except (ValueError, TypeError) as err:
            raise VisualizeError(f"{record.get('image')}: bad detection: {err}") from None
        if det.score < threshold:
            continue
        if model is not None:
            det.model = model
        if det.hints is None:
            det.hints = inference.guess_type_and_severity(det, size)
        out.append(det)
    out.sort(key=lambda d: d.score, reverse=True)
    return out


def truth_for(image: Path, truth: Path | None, size: tuple[int, int]) -> list[tuple[float, ...]] | None:
    """Ground-truth boxes of `image` in its pixels from YOLO labels (None without `truth`).

    `truth` is one label file, or a folder holding ``<image stem>.txt``; an image without
    a file there has no fracture marked (as evaluate.py counts a missing label file).
    Every row is a box (a polygon row: its bounding box), as in evaluate.py.
    """
    if truth is None:
        return None
    from evaluate import EvaluationError, read_yolo_boxes

    label = truth / f"{image.stem}.txt" if truth.is_dir() else truth
    if not label.is_file():
        if truth.is_dir():
            return []
        raise VisualizeError(f"--truth {truth} is neither a label file nor a folder")
    try:
        boxes, _ = read_yolo_boxes(label, *size)
    except EvaluationError as err:
        raise VisualizeError(str(err)) from None
    return [tuple(b) for b in boxes.tolist()]


def render(loaded: inference.LoadedImage, detections: list[Detection], **kw: Any):
    """The overlay of `detections` on a decoded image: `inference.draw_overlay` on its display view."""
    return inference.draw_overlay(inference.display_image(loaded.pixels), detections, **kw)


def _error(message: str, under_progress_bar: bool) -> None:
    if under_progress_bar:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)  # keeps the bar intact
    else:
        print(message, file=sys.stderr)


def _inside(path: Path, folder: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Draw fracture boxes with scores and best-guess hints on radiographs "
                                            "(research tool, not a diagnosis).")
    p.add_argument("--image", required=True, type=Path, help="an image (PNG/JPEG/TIFF/BMP/DICOM) or a folder of them")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--predictions", type=Path, help="saved predictions (inference.py --json) to draw instead of predicting")
    src.add_argument("--weights", type=Path, help="model weights to predict with (default: the bundled model)")
    p.add_argument("--backend", default=None, help="detector backend for --weights (default: from the card or file type)")
    p.add_argument("--mode", default="balanced", choices=inference.MODES, help="operating point when predicting")
    p.add_argument("--conf", type=float, default=None, help="draw boxes with score >= this (overrides the mode / the record's threshold)")
    p.add_argument("--out", required=True, type=Path, help="overlay file (.png/.jpg), or a folder when --image is a folder")
    p.add_argument("--format", default="png", choices=["png", "jpg"], help="overlay format in folder mode (default png)")
    p.add_argument("--truth", type=Path, default=None,
                   help="ground truth to draw dashed: a YOLO label file, or a folder of <image stem>.txt")
    p.add_argument("--no-hints", action="store_true", help="leave out the best-guess type/severity line")
    p.add_argument("--title", default=None, help="a line in the key below the image")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-pixels", type=int, default=inference.DEFAULT_MAX_PIXELS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return _run(args)
    except VisualizeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.conf is not None and not 0 <= args.conf <= 1:
        raise VisualizeError(f"--conf must lie in [0, 1], got {args.conf}")
    if not args.image.exists():
        raise VisualizeError(f"{args.image} does not exist")
    if args.truth is not None and not args.truth.exists():
        raise VisualizeError(f"--truth {args.truth} does not exist")
    folder = args.image.is_dir()
    if folder:
        images = inference.list_images(args.image)
        if not images:
            raise VisualizeError(f"no images found in {args.image}")
        if _inside(args.out, args.image):
            raise VisualizeError(f"--out {args.out} lies inside the input folder {args.image}; choose another folder")
        if args.out.exists() and not args.out.is_dir():
            raise VisualizeError(f"--out must be a folder when --image is a folder ({args.out} is a file)")
    else:
        images = [args.image]
        if args.out.suffix.lower() not in OUT_SUFFIXES:
            raise VisualizeError(f"--out must end in .png, .jpg or .jpeg, got {args.out.name!r}")
        if os.path.realpath(args.out) == os.path.realpath(args.image):
            raise VisualizeError("--out would overwrite the input image")
    records = load_records(args.predictions) if args.predictions else None
    predictor = None
    if records is None:
        try:
            predictor = inference.Predictor(args.weights, args.backend, args.device, max_pixels=args.max_pixels)
        except (FileNotFoundError, ValueError) as err:
            raise VisualizeError(str(err)) from None

    progress = images
    if folder:
        from tqdm import tqdm

        progress = tqdm(images, desc="overlay", unit="img")
        args.out.mkdir(parents=True, exist_ok=True)
    written, failed, n_boxes = 0, 0, 0
    for path in progress:
        out = args.out / f"{path.stem}.{args.format}" if folder else args.out
        try:
            loaded = inference.load_image(path, max_pixels=args.max_pixels)
            if predictor is not None:
                pred = predictor.predict_loaded(loaded, str(path), args.mode, args.conf)
                detections = pred.detections
            else:
                detections = detections_from_record(find_record(records, path), loaded.meta.size, args.conf)
            truth = truth_for(path, args.truth, loaded.meta.size)
        except (inference.ImageDecodeError, VisualizeError) as err:
            failed += 1
            _error(f"error: {path}: {err}", folder)
            continue
        rgb = render(loaded, detections, show_hints=not args.no_hints, title=args.title, truth=truth)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(encode(rgb, out.suffix))
        written += 1
        n_boxes += len(detections)
    where = args.out if folder else args.out.parent
    print(f"{written} overlay(s) written to {where} ({n_boxes} box(es) drawn), {failed} failed")
    print(inference.DISCLAIMER)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
