"""Exporting a checkpoint to ONNX: torchvision detectors (traced with their size, weights optionally stored in
float16, checked on the trace input) and Ultralytics models; the exported card is written by `bone_r.card.write_card`.
Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from bone_r import DISCLAIMER
from bone_r.card import DEFAULT_IMGSZ, ModelCard, card_path_for, load_model_card, write_card
from bone_r.contract import Contract
from bone_r.runs import display_path, sha256_file

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
                store_fp16: bool = False, shared_card: bool = False) -> Path:
    """Export `weights` (YOLO .pt or torchvision .pth) to ONNX at `out` and write its card; returns the ONNX path.

    `store_fp16`: large weights stored as float16 and cast back to float32 in the graph (see `store_weights_fp16`).
    `shared_card`: `out` may sit beside `weights` with the same stem, as in a bundle (`weights/bone-r-default.{onnx,pth}`):
    the export's card then replaces the weights' card and serves both files.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise ExportError(f"weights not found: {weights}")
    if weights.suffix == ".pth":
        if not dynamic:
            raise ExportError("torchvision exports take any height and width (a fixed size would only add padding); "
                              "drop --static")
        return export_torchvision(weights, out, imgsz=imgsz, opset=opset, contract=contract, store_fp16=store_fp16,
                                  shared_card=shared_card)
    if weights.suffix != ".pt":
        raise ExportError(f"expected an Ultralytics .pt or a train_torchvision.py .pth checkpoint, got {weights.name}")
    return _export_yolo(weights, out, imgsz=imgsz, opset=opset, dynamic=dynamic, simplify=simplify, contract=contract,
                        store_fp16=store_fp16, shared_card=shared_card)


def _card_and_out(weights: Path, out: str | Path | None, contract: Contract | None,
                  shared_card: bool = False) -> tuple[ModelCard, Path]:
    """The weights' card (a copy, with `contract` if given) and the checked output path."""
    card = load_model_card(weights)
    if card is None and contract is None:
        raise ExportError(f"no model card {card_path_for(weights).name} beside {weights}: pass --contract to state the "
                          "harmonization contract the model was trained with")
    card = replace(card, extra=dict(card.extra)) if card else ModelCard(name=weights.stem, extra={"disclaimer": DISCLAIMER})
    if contract is not None:
        card.contract = contract
    out = Path(out) if out else default_out(weights)
    if out.suffix != ".onnx":
        raise ExportError(f"--out must end in .onnx, got {out}")
    if out.resolve() == weights.resolve().with_suffix(".onnx") and not shared_card:
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
                       contract: Contract | None = None, store_fp16: bool = False, shared_card: bool = False) -> Path:
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
    card, out = _card_and_out(weights, out, contract, shared_card)
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


def _write_export_card(card: ModelCard, weights: Path, out: Path, proto, *, imgsz: int, source_backend: str,
                       fp16: dict | None, **details) -> None:
    """Write `out`'s card: the weights' card with backend onnx and an `export` record (`details` are the exporter's)."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    card.backend, card.imgsz = "onnx", imgsz
    card.extra["export"] = {
        "from": display_path(weights), "from_sha256": sha256_file(weights), "format": "onnx",
        "source_backend": source_backend, "imgsz": imgsz, "opset": opset, **details, **_storage_card(fp16),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    card.extra.setdefault("disclaimer", DISCLAIMER)
    write_card(out, card, keep_results=False)


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
                 store_fp16: bool = False, shared_card: bool = False) -> Path:
    """Export an Ultralytics .pt. The export runs on a copy in a temporary folder, so nothing is written beside the input."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    card, out = _card_and_out(weights, out, contract, shared_card)
    imgsz = int(imgsz or card.imgsz or DEFAULT_IMGSZ)
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
