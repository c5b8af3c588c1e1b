"""Draw a model's boxes on radiographs: score, best-guess hints, legend, disclaimer band.

    # predict with a model, then draw (PNG, JPEG or DICOM in; PNG or JPEG out)
    python visualize.py --image xray.dcm --weights weights/bone-r-default.pt --out overlay.png
    # draw saved predictions (what `inference.py --json` or `evaluate.py --save-predictions` wrote)
    python visualize.py --image xray.png --predictions results.json --out overlay.jpg
    # a folder of images -> a folder of overlays (never inside the input folder)
    python visualize.py --image scans/ --predictions results.json --out overlays/
    # with the ground truth drawn dashed (YOLO labels: one .txt, or a folder of <image stem>.txt)
    python visualize.py --image data/merged/images/test/x.png --truth data/merged/labels/test --out overlay.png

The drawing is `draw_overlay` (`bone_r.draw`), the same code the service's
`overlay=true` uses: labels outside the box they name and never over each other (or
numbered tags and a key when boxes crowd), the key and the disclaimer below the image.
Images are decoded by `load_image` only. Saved predictions are shown
down to each record's own threshold (or `--conf`), so records kept down to score 0.001
for evaluation still draw only the boxes a user would see.

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import inference
from bone_r import DISCLAIMER
from bone_r.dataset import DataError, truth_for
from bone_r.detection import (
    RecordError,
    detections_from_record,
    find_record,
    load_records,
)
from bone_r.draw import encode_png, render
from bone_r.image import DEFAULT_MAX_PIXELS, ImageDecodeError, list_images, load_image
from bone_r.modes import MODES

OUT_SUFFIXES = {".png", ".jpg", ".jpeg"}


class VisualizeError(ValueError):
    """Bad input: the message is one line for a person."""


def encode(rgb, suffix: str, jpeg_quality: int = 92) -> bytes:
    """PNG (lossless) or JPEG bytes of an RGB overlay."""
    suffix = suffix.lower()
    if suffix == ".png":
        return encode_png(rgb)
    if suffix in (".jpg", ".jpeg"):
        import cv2

        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        return buf.tobytes()
    raise VisualizeError(f"cannot write {suffix!r} overlays: use .png, .jpg or .jpeg")


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
    p.add_argument("--mode", default="balanced", choices=MODES, help="operating point when predicting")
    p.add_argument("--conf", type=float, default=None, help="draw boxes with score >= this (overrides the mode / the record's threshold)")
    p.add_argument("--out", required=True, type=Path, help="overlay file (.png/.jpg), or a folder when --image is a folder")
    p.add_argument("--format", default="png", choices=["png", "jpg"], help="overlay format in folder mode (default png)")
    p.add_argument("--truth", type=Path, default=None,
                   help="ground truth to draw dashed: a YOLO label file, or a folder of <image stem>.txt")
    p.add_argument("--no-hints", action="store_true", help="leave out the best-guess type/severity line")
    p.add_argument("--title", default=None, help="a line in the key below the image")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
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
        images = list_images(args.image)
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
    try:
        records = load_records(args.predictions) if args.predictions else None
    except DataError as err:
        raise VisualizeError(str(err)) from None
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
            loaded = load_image(path, max_pixels=args.max_pixels, contract=predictor.contract if predictor else None)
            if predictor is not None:
                pred = predictor.predict_loaded(loaded, str(path), args.mode, args.conf)
                detections = pred.detections
            else:
                detections = detections_from_record(find_record(records, path), loaded.meta.size, args.conf)
            truth = truth_for(path, args.truth, loaded.meta.size)
        except (ImageDecodeError, VisualizeError, RecordError, DataError) as err:
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
    print(DISCLAIMER)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
