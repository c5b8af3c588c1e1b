"""Recover a torchvision checkpoint (weights/*.pth) from its own ONNX export, to continue training from it.

    python scripts/onnx_to_pth.py --onnx weights/bone-r-default.onnx --out weights/bone-r-default.pth [--fp16]

(`make setup` runs it with `--fp16` for the bundle: its .pth is made here, not stored in git.)

`scripts/export_onnx.py` keeps every trainable tensor under its state-dict name
(``model.<key>``), but ONNX export folds each FrozenBatchNorm2d into one Mul and
one Add constant after its convolution (scale = w / sqrt(var + eps), shift =
b - mean * scale). Those are read back from the graph (the Mul/Add that follow
the convolution the norm layer belongs to) and stored as an exactly equivalent
frozen norm: weight = scale, bias = shift, mean = 0, var = 1 - eps. The model
config comes from the card beside the ONNX file. `--check IMAGE ...` compares
the written checkpoint's boxes with the ONNX file's on those images (float32
must match; float16 reports the difference).

``--fp16`` stores the tensors as float16 (half the bytes; they load as float32,
so the predictions move by float16 rounding: fine to fine-tune from, not to
replace the ONNX file). Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


class RecoverError(Exception):
    pass


def initializers(graph) -> dict[str, np.ndarray]:
    """The graph's constant tensors by the name its nodes use: a weight stored as float16 (`export_onnx.py
    --store-fp16`: a float16 initializer cast back to float32 at the top of the graph) under the cast's output name,
    as float32. Found by the graph's structure, not by the stored name (`store_weights_fp16` may lengthen it).
    Equal constants are stored once by the exporter, the others being Identity nodes of it (e.g. the frozen norms
    of an untrained model, all scale 1/sqrt(1 + eps)): an Identity's output gets its input's value."""
    from onnx import TensorProto, numpy_helper

    half = {i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT16}
    cast_back = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "Cast" and n.input[0] in half}
    out = {}
    for init in graph.initializer:
        value = numpy_helper.to_array(init)
        if init.name in cast_back:
            out[cast_back[init.name]] = value.astype(np.float32)
        else:
            out[init.name] = value
    for node in graph.node:  # in graph order: an Identity of an Identity resolves too
        if node.op_type == "Identity" and node.input[0] in out:
            out[node.output[0]] = out[node.input[0]]
    return out


def folded_norms(graph) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """conv weight name -> (scale, shift) of the Mul/Add pair that follows that convolution."""
    consts = initializers(graph)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def const_input(node) -> np.ndarray | None:
        values = [consts[n] for n in node.input if n in consts]
        return values[0] if len(values) == 1 else None

    out = {}
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or not node.input[1].startswith("model."):
            continue
        nxt = consumers.get(node.output[0], [])
        if len(nxt) != 1 or nxt[0].op_type != "Mul":
            continue
        mul = nxt[0]
        after = consumers.get(mul.output[0], [])
        scale = const_input(mul)
        if scale is None or len(after) != 1 or after[0].op_type != "Add" or const_input(after[0]) is None:
            continue
        out[node.input[1]] = (scale.reshape(-1), const_input(after[0]).reshape(-1))
    return out


def recover_state(onnx_path: Path, config: dict) -> dict:
    import onnx
    import torch

    from models.backbones import EFFNET_BLOCK_CONV_NORMS, EFFNET_STEM_CONV_NORM, frozen_norm_as_scale_shift
    from models.torchvision_det import build_model

    conv_before_norm = {norm: conv for conv, norm in (EFFNET_STEM_CONV_NORM, *EFFNET_BLOCK_CONV_NORMS)}
    graph = onnx.load(str(onnx_path)).graph
    named = {name[len("model."):]: value for name, value in initializers(graph).items() if name.startswith("model.")}
    norms = folded_norms(graph)
    model = build_model(config)
    state = model.state_dict()
    eps = {name: float(m.eps) for name, m in model.named_modules() if hasattr(m, "running_var") and hasattr(m, "eps")}
    recovered, missing = {}, []
    for key, ref in state.items():
        prefix, _, leaf = key.rpartition(".")
        if key in named:
            value = torch.from_numpy(named[key].copy())
        elif prefix in eps:
            parent, _, norm = prefix.rpartition(".")
            pair = norms.get(f"model.{parent}.{conv_before_norm.get(norm)}.weight")
            if pair is None:
                missing.append(key)
                continue
            scale, shift = (torch.from_numpy(a.copy()) for a in pair)
            value = frozen_norm_as_scale_shift(scale, shift, eps[prefix])[leaf]
        else:
            missing.append(key)
            continue
        if value.shape != ref.shape:
            raise RecoverError(f"{key}: shape {tuple(value.shape)} in the ONNX file, {tuple(ref.shape)} in the model")
        recovered[key] = value.to(ref.dtype)
    if missing:
        raise RecoverError(f"{len(missing)} tensor(s) not found in {onnx_path.name}, e.g. {missing[:3]}")
    return recovered


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", type=Path, required=True, help="an ONNX file written by scripts/export_onnx.py from a torchvision checkpoint")
    p.add_argument("--card", type=Path, default=None, help="its model card (default: the .json beside it)")
    p.add_argument("--out", type=Path, required=True, help="the checkpoint to write (.pth)")
    p.add_argument("--fp16", action="store_true", help="store float16 tensors (load as float32)")
    p.add_argument("--check", type=Path, nargs="*", default=[], metavar="IMAGE",
                   help="compare the written checkpoint's boxes with the ONNX file's on these images (export_onnx's check)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    from bone_r.card import ModelCard
    from bone_r.runs import save_checkpoint
    from models.torchvision_det import CHECKPOINT_FORMAT, half_state

    card_path = args.card or args.onnx.with_suffix(".json")
    try:
        card = ModelCard.load(card_path)
        config = card.extra["model_config"]
        state = recover_state(args.onnx, config)
    except (OSError, ValueError, KeyError) as err:
        print(f"onnx_to_pth: error: cannot read {card_path} or {args.onnx}: {err}", file=sys.stderr)
        return 2
    except RecoverError as err:
        print(f"onnx_to_pth: error: {err}", file=sys.stderr)
        return 2
    if args.fp16:
        state = half_state(state)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(args.out, {"format": CHECKPOINT_FORMAT, "model": state, "config": config,
                               "epoch": int(card.extra.get("training", {}).get("epochs", 0)),
                               "recovered_from": args.onnx.name, "stored_dtype": "float16" if args.fp16 else "float32"})
    print(f"onnx_to_pth: {len(state)} tensors -> {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    if args.check:
        from inference import check_against_pytorch

        rows = check_against_pytorch(args.out, args.onnx, args.check, conf=0.05, score_tol=0.02 if args.fp16 else 1e-4)
        for row in rows:
            print(json.dumps(row))
        same = sum(bool(row.get("ok")) for row in rows)
        worst = max((row["max_score_diff"] or 0.0 for row in rows), default=0.0)
        print(f"onnx_to_pth: {same}/{len(rows)} image(s) give the ONNX file's boxes; max score difference {worst:.6f}")
        if same < len(rows) and not args.fp16:  # float16 rounding may flip a near-tie in NMS; float32 must match
            print("onnx_to_pth: error: the checkpoint's boxes differ from the ONNX file's", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
