"""Several models on the same radiograph(s): one overlay PNG and the site's predictions.json.

    # predict with each model (name=weights[:backend], as benchmark.py takes them)
    python compare_overlay.py --image xray.png --models yolo=weights/bone-r-default.pt onnx=weights/bone-r-default.onnx \\
        --out compare.png
    # or draw saved predictions, one file per model (inference.py --json / evaluate.py --save-predictions)
    python compare_overlay.py --image xray.png --predictions yolo=runs/a.json fcos=runs/b.json --out compare.png
    # with the ground truth dashed (YOLO labels: one .txt, or a folder of <image stem>.txt)
    python compare_overlay.py --image x.png --truth labels/ --models ... --out compare.png

Each model gets its own colour (`PALETTE`, in the order given) and key
entry; boxes are drawn by `draw_overlay` (labels outside their boxes, never
over each other; numbered tags and a key when boxes crowd). The PNG shows each model's boxes
at or above its own threshold (`--mode` from its model card, or `--conf`).

Unless `--no-site`, it also writes `docs/data/predictions.json` (the viewer's format,
`docs/data/predictions.schema.json`) with every box down to `--min-score`, so the
site's confidence slider has something to move through, plus a display copy of each
image (`docs/data/local-<name>.png`, git-ignored: a real radiograph may not be ours
to publish) and `docs/data/bundle.js`, the copy of the site's JSON that the page
reads when it is opened from disk (file://), where browsers refuse to fetch JSON.

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import inference
from bone_r import DISCLAIMER, site
from bone_r.contract import fit_long_side, to_uint8
from bone_r.dataset import DataError, truth_for
from bone_r.detection import Detection, RecordError, detections_from_record, find_record, load_records
from bone_r.draw import encode_png, render
from bone_r.image import DEFAULT_MAX_PIXELS, ImageDecodeError, LoadedImage, load_image
from bone_r.modes import MODES
from bone_r.site import SITE_DATA, hex_color, model_colors, site_payload
from inference import ModelSpecError

ROOT = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- models


def parse_named(spec: str) -> tuple[str, str]:
    """``name=value``; a bare value is named after its file stem."""
    name, sep, value = spec.partition("=")
    if not sep:
        name, value = Path(spec).stem, spec
    if not name or not value:
        raise CompareError(f"bad spec {spec!r}: expected NAME=PATH")
    return name, value


class CompareError(ValueError):
    """Bad arguments or inputs for a comparison; main() prints it and exits 2."""


class ModelSource:
    """One model of the comparison: a Predictor, or a file of saved records."""

    def __init__(self, name: str, predictor: inference.Predictor | None = None, records: list[dict[str, Any]] | None = None):
        self.name, self.predictor, self.records = name, predictor, records

    def detections(self, path: Path, loaded: LoadedImage, mode: str, conf: float | None,
                   min_score: float) -> tuple[list[Detection], float, str]:
        """(boxes down to `min_score`, this model's display threshold, where it came from)."""
        if self.predictor is not None:
            pred = self.predictor.predict_loaded(loaded, str(path), mode, conf, min_score=min_score)
            dets = pred.detections
            threshold, source = pred.threshold, pred.threshold_source
        else:
            record = find_record(self.records, path)
            dets = detections_from_record(record, loaded.meta.size, conf=min_score)
            threshold = conf if conf is not None else float(record.get("threshold", 0.0) or 0.0)
            source = "conf" if conf is not None else str(record.get("threshold_source", "record"))
        for det in dets:
            det.model = self.name
        return dets, threshold, source


def build_sources(args: argparse.Namespace) -> list[ModelSource]:
    sources = []
    for spec in args.models:
        try:
            ms = inference.parse_model_spec(spec)
        except ModelSpecError as err:
            raise CompareError(str(err)) from None
        try:
            predictor = inference.Predictor(ms.weights, ms.backend, args.device, max_pixels=args.max_pixels)
        except (FileNotFoundError, ValueError, ImportError) as err:
            raise CompareError(f"model {ms.name}: {err}") from None
        sources.append(ModelSource(ms.name, predictor=predictor))
    for spec in args.predictions:
        name, path = parse_named(spec)
        sources.append(ModelSource(name, records=load_records(Path(path))))
    names = [s.name for s in sources]
    if not sources:
        raise CompareError("no models: pass --models NAME=WEIGHTS ... and/or --predictions NAME=RESULTS.json ...")
    if len(set(names)) != len(names):
        raise CompareError(f"model names must be unique, got {names}")
    return sources


# --------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Compare several models' boxes on the same radiograph(s): an overlay PNG and "
                                            "the site's predictions.json (research tool, not a diagnosis).")
    p.add_argument("--image", required=True, nargs="+", type=Path, help="one or more images (PNG/JPEG/TIFF/BMP/DICOM)")
    p.add_argument("--models", nargs="+", default=[], metavar="NAME=WEIGHTS[:BACKEND]", help="models to predict with")
    p.add_argument("--predictions", nargs="+", default=[], metavar="NAME=RESULTS.json", help="saved predictions, one file per model")
    p.add_argument("--out", required=True, type=Path, help="overlay PNG (a folder when several images are given)")
    p.add_argument("--mode", default="balanced", choices=MODES, help="each model's operating point for the PNG")
    p.add_argument("--conf", type=float, default=None, help="one threshold for every model in the PNG (overrides --mode)")
    p.add_argument("--min-score", type=float, default=0.05, help="lowest score kept in predictions.json (default 0.05)")
    p.add_argument("--hints", action="store_true", help="also write the best-guess hint line on the PNG")
    p.add_argument("--truth", type=Path, default=None,
                   help="ground truth to draw dashed (and put in predictions.json): a YOLO label file, or a folder of <image stem>.txt")
    p.add_argument("--site-dir", type=Path, default=SITE_DATA, help=f"where predictions.json goes (default {SITE_DATA.relative_to(ROOT)})")
    p.add_argument("--site-max-side", type=int, default=1024, help="long side of the display copy written for the site")
    p.add_argument("--no-site", action="store_true", help="write only the PNG")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return _run(args)
    except (CompareError, RecordError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _site_image(loaded: LoadedImage, max_side: int) -> bytes:
    import cv2

    gray = fit_long_side(to_uint8(loaded.pixels), max_side)
    ok, buf = cv2.imencode(".png", gray)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _run(args: argparse.Namespace) -> int:
    for name in ("conf", "min_score"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:
            raise CompareError(f"--{name.replace('_', '-')} must lie in [0, 1], got {value}")
    if args.site_max_side < 32:
        raise CompareError("--site-max-side must be >= 32")
    if args.truth is not None and not args.truth.exists():
        raise CompareError(f"--truth {args.truth} does not exist")
    missing = [str(p) for p in args.image if not p.is_file()]
    if missing:
        raise CompareError(f"not a file: {', '.join(missing)}")
    several = len(args.image) > 1
    if several and args.out.suffix:
        raise CompareError("--out must be a folder when several images are given")
    if not several and args.out.suffix.lower() != ".png":
        raise CompareError(f"--out must end in .png, got {args.out.name!r}")
    stems = [p.stem for p in args.image]
    if len(set(stems)) != len(stems):
        raise CompareError("the images must have different file names (their stems name the outputs)")
    sources = build_sources(args)
    names = [s.name for s in sources]
    colors = model_colors(names)

    from tqdm import tqdm

    site_images, model_info = [], {}
    for path in tqdm(args.image, desc="compare", unit="img", disable=not several):
        try:
            loaded = load_image(path, max_pixels=args.max_pixels)
            per_model = [(s, *s.detections(path, loaded, args.mode, args.conf, args.min_score)) for s in sources]
            truth = truth_for(path, args.truth, loaded.meta.size)
        except ImageDecodeError as err:
            raise CompareError(f"{path}: {err}") from None
        shown, everything = [], []
        for source, dets, threshold, how in per_model:
            shown += [d for d in dets if d.score >= threshold]
            everything += dets
            model_info.setdefault(source.name, {"name": source.name, "color": hex_color(colors[source.name]),
                                                "threshold": round(threshold, 6), "threshold_source": how, "mode": args.mode,
                                                "description": _describe(source)})
        title = f"{len(names)} models, mode {args.mode}" if args.conf is None else f"{len(names)} models, conf {args.conf:g}"
        rgb = render(loaded, shown, colors=colors, legend=names, show_hints=args.hints, title=title, truth=truth)
        out = args.out / f"{path.stem}_compare.png" if several else args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(encode_png(rgb))
        counts = ", ".join(f"{s.name} {sum(d.score >= t for d in dets)}" for s, dets, t, _ in per_model)
        print(f"{path}: boxes at threshold: {counts} -> {out}")
        if not args.no_site:
            src = f"local-{path.stem}.png"
            args.site_dir.mkdir(parents=True, exist_ok=True)
            (args.site_dir / src).write_bytes(_site_image(loaded, args.site_max_side))
            entry = {"id": path.stem, "src": src, "width": loaded.meta.width, "height": loaded.meta.height,
                     "caption": f"{path.name} ({loaded.meta.format}, {loaded.meta.width}x{loaded.meta.height})",
                     "detections": [d.to_dict() for d in sorted(everything, key=lambda d: d.score, reverse=True)]}
            if truth is not None:
                entry["ground_truth"] = [{"xyxy": [round(v, 2) for v in box], "label": "fracture"} for box in truth]
            site_images.append(entry)
    if not args.no_site:
        payload = site_payload(list(model_info.values()), site_images, generator="compare_overlay.py", synthetic=False,
                               notes=[f"boxes down to score {args.min_score:g}; each model's threshold is its {args.mode} "
                                      "operating point" if args.conf is None else f"boxes down to score {args.min_score:g}"])
        written = site.write_json(args.site_dir / "predictions.json", payload)
        bundle = site.write_bundle(args.site_dir)
        print(f"site data: {written} (+ {len(site_images)} local-*.png image(s), {bundle.name}); "
              "the local-*.png copies are git-ignored: publish a radiograph only if its licence allows")
    print(DISCLAIMER)
    return 0


def _describe(source: ModelSource) -> str:
    if source.predictor is not None:
        weights = source.predictor.weights.name if source.predictor.weights else "injected"
        return f"{source.predictor.name} ({weights})"
    return "saved predictions"


if __name__ == "__main__":
    sys.exit(main())
