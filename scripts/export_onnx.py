"""Export a trained detector to ONNX, with its model card: an Ultralytics YOLO ``.pt`` or a torchvision ``.pth``.

    python scripts/export_onnx.py --weights runs/y8n-640/weights/best.pt
    python scripts/export_onnx.py --weights best.pt --out weights/bone-r-default.onnx --imgsz 640 --static
    python scripts/export_onnx.py --weights runs/frcnn/weights/best.pth --out weights/frcnn.onnx \
        --check img1.png img2.png --bench 20 --threads 2

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
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bone_r import DISCLAIMER
from bone_r.card import card_path_for, load_model_card
from bone_r.contract import Contract
from bone_r.runs import display_path, set_threads, sha256_file

ROOT = Path(__file__).resolve().parents[1]

TORCHVISION_OPSET = 17
FP16_MIN_ELEMENTS = 1024  # --store-fp16 leaves smaller tensors (biases, norms, anchors) in float32: they weigh nothing
FP16_MAX = 65504.0  # the largest finite float16
STORAGE_KEY = "weights_storage"  # ONNX metadata and card export key: "float32" or "float16"


class ExportError(Exception):
    """A problem the user can fix; printed as one line."""


def default_out(weights: Path) -> Path:
    return weights.parent / "onnx" / f"{weights.stem}.onnx"


def export_onnx(weights: str | Path, out: str | Path | None = None, *, imgsz: int | None = None, opset: int | None = None,
                dynamic: bool = True, simplify: bool = True, contract: Contract | None = None,
                store_fp16: bool = False) -> Path:
    """Export `weights` (YOLO .pt or torchvision .pth) to ONNX at `out` and write its card; returns the ONNX path.

    `store_fp16`: large weights stored as float16 and cast back to float32 in the graph (see `store_weights_fp16`).
    """
    weights = Path(weights)
    if not weights.is_file():
        raise ExportError(f"weights not found: {weights}")
    if weights.suffix == ".pth":
        if not dynamic:
            raise ExportError("torchvision exports take any height and width (a fixed size would only add padding); "
                              "drop --static")
        return export_torchvision(weights, out, imgsz=imgsz, opset=opset, contract=contract, store_fp16=store_fp16)
    if weights.suffix != ".pt":
        raise ExportError(f"expected an Ultralytics .pt or a train_torchvision.py .pth checkpoint, got {weights.name}")
    return _export_yolo(weights, out, imgsz=imgsz, opset=opset, dynamic=dynamic, simplify=simplify, contract=contract,
                        store_fp16=store_fp16)


def _card_and_out(weights: Path, out: str | Path | None, contract: Contract | None) -> tuple[dict, Path]:
    """The weights' card (a copy, with `contract` if given) and the checked output path."""
    card = load_model_card(weights)
    if card is None and contract is None:
        raise ExportError(f"no model card {card_path_for(weights).name} beside {weights}: pass --contract to state the "
                          "harmonization contract the model was trained with")
    card = dict(card or {"name": weights.stem, "classes": ["fracture"], "disclaimer": DISCLAIMER})
    if contract is not None:
        card["contract"] = contract.to_dict()
    out = Path(out) if out else default_out(weights)
    if out.suffix != ".onnx":
        raise ExportError(f"--out must end in .onnx, got {out}")
    if out.resolve() == weights.resolve().with_suffix(".onnx"):
        raise ExportError(f"{out} would share its model card {card_path_for(out).name} with {weights.name}; choose another --out")
    return card, out


def store_weights_fp16(proto, min_elements: int = FP16_MIN_ELEMENTS) -> dict:
    """Halve an ONNX model's file without changing what it computes in: in place, every float32 initializer of at
    least `min_elements` values is stored as float16 (renamed ``<name>_fp16``) and a ``Cast(to=FLOAT)`` node at the
    top of the graph gives back the original name, so every consumer still sees a float32 tensor.

    The arithmetic stays float32; only the weights are rounded (relative error <= 2^-11). ONNX Runtime's constant
    folding replaces the casts by float32 initializers when it creates the session, so the optimized graph (and the
    speed) is the float32 export's. Left in float32: small tensors, tensors with a value beyond float16's range or
    not finite, and initializers that are also graph inputs (a caller may feed those). Returns counts and the
    largest absolute rounding error.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    graph_inputs = {value.name for value in graph.input}
    names = {t.name for t in graph.initializer} | graph_inputs | {o for node in graph.node for o in node.output}
    casts, stats = [], {"tensors": 0, "values": 0, "kept_float32": 0, "max_abs_error": 0.0}
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(init)
        if values.size < min_elements or init.name in graph_inputs:
            stats["kept_float32"] += 1
            continue
        if not np.isfinite(values).all() or np.abs(values).max() > FP16_MAX:
            stats["kept_float32"] += 1
            continue
        half = values.astype(np.float16)
        stored = f"{init.name}_fp16"
        while stored in names:
            stored += "_"
        names.add(stored)
        casts.append(helper.make_node("Cast", [stored], [init.name], to=TensorProto.FLOAT, name=f"{stored}_to_float32"))
        stats["max_abs_error"] = max(stats["max_abs_error"], float(np.abs(half.astype(np.float32) - values).max()))
        stats["tensors"] += 1
        stats["values"] += int(values.size)
        init.CopyFrom(numpy_helper.from_array(half, stored))
    nodes = casts + list(graph.node)  # the casts first: the node list stays in topological order
    del graph.node[:]
    graph.node.extend(nodes)
    return stats


def _set_metadata(proto, key: str, value: str) -> None:
    for prop in proto.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    proto.metadata_props.add(key=key, value=value)


def export_torchvision(weights: Path, out: str | Path | None = None, *, imgsz: int | None = None, opset: int | None = None,
                       contract: Contract | None = None, store_fp16: bool = False) -> Path:
    """Export a train_torchvision.py checkpoint: the detector after the resize, dynamic height and width.

    The graph is checked against PyTorch on the trace input before the card is written (`store_fp16`: after the
    weights are stored as float16, and by ``onnx.checker``).
    """
    import warnings

    import onnx
    import torch
    import torchvision

    from models.backbones import unfold_frozen_norms
    from models.onnx import FORMAT_KEY, TORCHVISION_FORMAT, make_session
    from models.torchvision_det import (
        OnnxExportWrapper,
        load_checkpoint,
        model_from_checkpoint,
        nms_output_limit,
        onnx_export_patches,
    )

    ckpt = load_checkpoint(weights)
    config = ckpt["config"]
    trained = int(config["imgsz"])
    if imgsz and int(imgsz) != trained:
        raise ExportError(f"{weights.name} was trained at imgsz {trained}; a torchvision export keeps it (got --imgsz {imgsz})")
    card, out = _card_and_out(weights, out, contract)
    opset = int(opset or TORCHVISION_OPSET)
    if opset < 16:
        raise ExportError(f"torchvision exports need opset >= 16 (RoiAlign's half-pixel modes), got {opset}")
    model = unfold_frozen_norms(model_from_checkpoint(ckpt))  # each conv's own weights in the graph (float16 storage)
    wrapper = OnnxExportWrapper(model).eval()
    # a portrait, not a multiple of 32: the trace then covers the padding and the clipping to a non-square image
    example = torch.rand(1, 3, trained, max(32, round(trained * 0.8) + 3), generator=torch.Generator().manual_seed(0))
    example = model.transform.normalize(example[0])[None]  # the graph's input is normalized (see OnnxExportWrapper)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        reference = [t.numpy() for t in wrapper(example)]
    try:
        with onnx_export_patches(nms_output_limit(model)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings about shape arithmetic are expected and harmless here
            torch.onnx.export(wrapper, (example,), str(out), opset_version=opset, input_names=["image"],
                              output_names=["boxes", "scores", "labels"], dynamo=False,
                              dynamic_axes={"image": {2: "height", 3: "width"}, "boxes": {0: "n"}, "scores": {0: "n"},
                                            "labels": {0: "n"}})
    except Exception as err:  # noqa: BLE001 - the tracer and the ONNX symbolics raise many types
        out.unlink(missing_ok=True)
        raise ExportError(f"torch.onnx.export failed for {weights.name}: {type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}") from None
    proto = onnx.load(str(out))
    meta = {FORMAT_KEY: TORCHVISION_FORMAT, "source_backend": str(config["arch"]), "backbone": str(config.get("backbone", "")),
            "imgsz": str(trained), "classes": json.dumps(list(config.get("classes", ["fracture"]))),
            "image_mean": json.dumps([float(v) for v in model.transform.image_mean]),
            "image_std": json.dumps([float(v) for v in model.transform.image_std]),
            "input": "image: float32 (1, 3, h, w) RGB at the model's resolution, normalized (x / 255 - mean) / std "
                     "before the resize, as torchvision does (see models/onnx.py)",
            "outputs": "boxes (n, 4) xyxy in the input's pixels, scores (n,), labels (n,) int64 with 1 = the first class",
            STORAGE_KEY: "float32"}
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "bone-r scripts/export_onnx.py"
    fp16 = _store_fp16_or_fail(proto, out) if store_fp16 else None
    onnx.save(proto, str(out))
    got = make_session(out, threads=1).run(["boxes", "scores", "labels"], {"image": example.numpy()})
    if not _same_boxes(reference, got, trained):
        out.unlink()
        raise ExportError(f"the exported graph disagrees with PyTorch on the trace input ({len(got[0])} vs "
                          f"{len(reference[0])} boxes); nothing was written")
    _write_export_card(card, weights, out, proto, imgsz=trained, source_backend=str(config["arch"]), fp16=fp16,
                       input="normalized RGB (1, 3, h, w), dynamic height and width; long side imgsz", dynamic=True,
                       simplify=False, graph_rewrites=["NMS stops at the kept-box limit", "RoIAlign levels merged by a gather"],
                       torch=torch.__version__, torchvision=torchvision.__version__)
    return out


def _write_export_card(card: dict, weights: Path, out: Path, proto, *, imgsz: int, source_backend: str,
                       fp16: dict | None, **details) -> None:
    """Write `out`'s card: the weights' card with backend onnx and an `export` record (`details` are the exporter's)."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    card.update(backend="onnx", imgsz=imgsz, export={
        "from": display_path(weights), "from_sha256": sha256_file(weights), "format": "onnx",
        "source_backend": source_backend, "imgsz": imgsz, "opset": opset, **details, **_storage_card(fp16),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
    card.setdefault("disclaimer", DISCLAIMER)
    card_path_for(out).write_text(json.dumps(card, indent=2) + "\n")


def _store_fp16_or_fail(proto, out: Path) -> dict:
    """`store_weights_fp16` on `proto` with its metadata key, then ``onnx.checker``; on a failure `out` is removed."""
    import onnx

    stats = store_weights_fp16(proto)
    _set_metadata(proto, STORAGE_KEY, "float16")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        out.unlink(missing_ok=True)
        raise ExportError(f"the graph with float16-stored weights is not valid ONNX: {str(err).strip().splitlines()[0][:200]}") from None
    return stats


def _storage_card(fp16: dict | None) -> dict:
    """The card's record of how the weights are stored."""
    if fp16 is None:
        return {STORAGE_KEY: "float32"}
    return {STORAGE_KEY: "float16",
            "weights_storage_note": f"float32 tensors of >= {FP16_MIN_ELEMENTS} values stored as float16 and cast to "
                                    "float32 in the graph (folded away by ONNX Runtime at load); arithmetic in float32",
            "float16_tensors": fp16["tensors"], "float16_values": fp16["values"], "float32_tensors": fp16["kept_float32"],
            "float16_max_abs_error": float(f"{fp16['max_abs_error']:.3g}")}


def _same_boxes(reference: list, got: list, size: int) -> bool:
    """A gross-error check of an export on its trace input: the same number of boxes, scores within 0.01, and every
    reference box has a box of the same label within 1% of the image size in every coordinate. (Coordinates, not
    IoU: an untrained model's boxes can be slivers whose IoU jumps with float noise.) ``--check`` compares closely."""
    import numpy as np

    (ref_boxes, ref_scores, ref_labels), (boxes, scores, labels) = reference, got
    if len(boxes) != len(ref_boxes):
        return False
    if not len(boxes):
        return True
    if np.abs(np.sort(scores) - np.sort(ref_scores)).max() > 1e-2:
        return False
    gap = np.abs(ref_boxes[:, None, :] - boxes[None, :, :]).max(axis=2)
    gap[ref_labels[:, None] != labels[None, :]] = np.inf
    return bool((gap.min(axis=1) < 0.01 * size).all())


def _export_yolo(weights: Path, out: str | Path | None = None, *, imgsz: int | None = None, opset: int | None = None,
                 dynamic: bool = True, simplify: bool = True, contract: Contract | None = None,
                 store_fp16: bool = False) -> Path:
    """Export an Ultralytics .pt. The export runs on a copy in a temporary folder, so nothing is written beside the input."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    card, out = _card_and_out(weights, out, contract)
    imgsz = int(imgsz or card.get("imgsz") or 640)
    if imgsz % 32:
        raise ExportError(f"imgsz must be a multiple of 32, got {imgsz}")
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

    model = onnx.load(str(out), load_external_data=store_fp16)  # the weights themselves only when they are rewritten
    fp16 = None
    if store_fp16:
        fp16 = _store_fp16_or_fail(model, out)
        onnx.save(model, str(out))
    import ultralytics

    _write_export_card(card, weights, out, model, imgsz=imgsz, source_backend="yolo", fp16=fp16, dynamic=dynamic,
                       simplify=simplify, ultralytics=ultralytics.__version__)
    return out


def match_detections(reference: list, candidate: list, conf: float, *, iou_min: float = 0.95, score_tol: float = 0.02) -> dict:
    """Do two backends' detections (same image, same pixels) agree above `conf`?

    Greedy matching in reference-score order: each reference box takes, among the
    unused candidates with IoU > iou_min, the one closest in score (boxes clipped to
    the image border can coincide). `ok`: the same number of boxes at score >= conf,
    and every reference box has a partner with IoU > iou_min and |score difference| < score_tol.
    """
    import numpy as np

    from bone_r.metrics import box_iou

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


def check_against_pytorch(pt_weights: Path, onnx_path: Path, images: list[Path], conf: float, *, iou_min: float = 0.95,
                          score_tol: float = 0.02) -> list[dict]:
    """Both models through `inference.Predictor` (same decode, contract and mapping) on each image."""
    from inference import Predictor

    pt, ox = Predictor(pt_weights), Predictor(onnx_path)
    rows = []
    for image in images:
        a = pt.predict(image, conf=conf, hints=False).detections
        b = ox.predict(image, conf=conf, hints=False).detections
        rows.append({"image": str(image), **match_detections(a, b, conf, iou_min=iou_min, score_tol=score_tol)})
    return rows


def _bench_worker(conn, kind: str, weights: str, threads: int, conf: float) -> None:
    """One model in its own process: predicts each image path the parent sends and answers its stage times (ms).

    A process per model: once torch has run, its OpenMP threads keep spinning for a while and would slow
    whatever ran next in the same process; and the idle worker waits on its pipe, costing nothing.
    """
    import time

    set_threads(threads)
    if kind == "ultralytics":
        from ultralytics import YOLO

        imgsz = int((load_model_card(weights) or {}).get("imgsz", 640))
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
    try:
        contract = Contract.load(args.contract) if args.contract else None
        out = export_onnx(args.weights, args.out, imgsz=args.imgsz, opset=args.opset, dynamic=not args.static,
                          simplify=not args.no_simplify, contract=contract, store_fp16=args.store_fp16)
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
