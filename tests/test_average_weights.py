"""Weight averaging of detector checkpoints ("model soups"): models.torchvision_det.average_states and
scripts/average_weights.py."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_torchvision import _frozen_effnet_model

from bone_r.runs import sha256_file
from models.torchvision_det import CHECKPOINT_FORMAT, average_states


@pytest.fixture(autouse=True)
def _torch_threads(torch_threads):
    yield


def _norm_prefixes(model) -> dict[str, float]:
    from torchvision.ops import FrozenBatchNorm2d

    return {f"{n}.": m.eps for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)}


def _recovered_form(state: dict[str, torch.Tensor], norms: dict[str, float]) -> dict[str, torch.Tensor]:
    """The same network as onnx_to_pth.py stores it: each frozen norm as scale and shift, mean 0, var 1 - eps."""
    out = dict(state)
    for prefix, eps in norms.items():
        scale = state[prefix + "weight"] * (state[prefix + "running_var"] + eps).rsqrt()
        out[prefix + "weight"] = scale
        out[prefix + "bias"] = state[prefix + "bias"] - state[prefix + "running_mean"] * scale
        out[prefix + "running_mean"] = torch.zeros_like(scale)
        out[prefix + "running_var"] = torch.full_like(scale, 1.0 - eps)
    return out


def _two_states():
    model, config = _frozen_effnet_model()
    a = {k: v.clone() for k, v in model.state_dict().items()}
    norms = _norm_prefixes(model)
    gen = torch.Generator().manual_seed(1)
    # b: a after "training": every trainable tensor moved, the frozen norms as they were
    b = {k: v + 0.05 * torch.randn(v.shape, generator=gen) * v.std().clamp_min(1e-3)
         if v.is_floating_point() and v.dim() and not any(k.startswith(p) for p in norms) else v.clone()
         for k, v in a.items()}
    return model, config, a, b, norms


def _features(model, state, x):
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return model.backbone(x)


def test_average_is_the_mean_and_reads_either_form_of_a_frozen_norm():
    model, config, a, b, norms = _two_states()
    assert len(norms) > 40  # EfficientNet-Lite0's stem + blocks
    plain = {k: (a[k] + b[k]) / 2 if a[k].is_floating_point() else a[k] for k in a}
    soup = average_states([a, _recovered_form(b, norms)], config)
    assert list(soup) == list(a)
    for k, v in plain.items():
        if not any(k.startswith(p) for p in norms):
            torch.testing.assert_close(soup[k], v)  # ordinary tensors: the plain mean
    # the frozen norms were stored differently, yet the soup computes what the plain mean computes
    x = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    ref, got = _features(model, plain, x), _features(model, soup, x)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-4)
    # weights: all on one checkpoint gives that checkpoint back (as a function)
    only_b = average_states([a, b], config, [0.0, 1.0])
    for key, value in _features(model, b, x).items():
        torch.testing.assert_close(_features(model, only_b, x)[key], value, rtol=1e-4, atol=1e-4)


def test_average_refuses_what_cannot_be_averaged():
    _, config, a, b, _ = _two_states()
    with pytest.raises(ValueError, match="sum to 1"):
        average_states([a, b], config, [0.7, 0.2])
    with pytest.raises(ValueError, match="sum to 1"):
        average_states([a, b], config, [0.5])
    shorter = {k: v for k, v in b.items() if k != "rpn.head.conv.0.0.weight"}
    with pytest.raises(ValueError, match="other tensors"):
        average_states([a, shorter], config)
    key = "roi_heads.box_predictor.cls_score.bias"
    with pytest.raises(ValueError, match="has shape"):
        average_states([a, {**b, key: torch.zeros(3)}], config)


def test_average_weights_script_writes_a_soup_with_its_card_and_leaves_inputs_alone(tmp_path, capsys):
    from bone_r.card import base_card, write_card
    from bone_r.contract import Contract
    from scripts.average_weights import main

    _, config, a, b, _ = _two_states()
    paths = []
    for name, state in (("a", a), ("b", {k: v.half() if v.is_floating_point() else v for k, v in b.items()})):
        path = tmp_path / name / "weights" / "best.pth"
        path.parent.mkdir(parents=True)
        torch.save({"format": CHECKPOINT_FORMAT, "model": state, "config": config, "epoch": 3, "val_map50": 0.4}, path)
        write_card(path, base_card(name=name, backend="fasterrcnn", architecture="fasterrcnn_effnet_lite0_fpn",
                                   imgsz=config["imgsz"], contract=Contract(), started_from="test", training={},
                                   dataset_yaml="d.yaml", splits_sha256="abc", model_config=config))
        paths.append(path)
    before = [sha256_file(p) for p in paths]
    out = tmp_path / "soup" / "weights" / "best.pth"
    assert main([str(p) for p in paths] + ["--out", str(out), "--weights", "0.25", "0.75"]) == 0
    assert [sha256_file(p) for p in paths] == before
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["config"] == config
    key = "roi_heads.box_predictor.cls_score.weight"
    torch.testing.assert_close(ckpt["model"][key], 0.25 * a[key] + 0.75 * b[key].half().float())
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["name"] == "soup" and card["contract"] == Contract().to_dict()
    assert [s["weight"] for s in card["training"]["averaged_from"]] == [0.25, 0.75]
    assert "weighted average" in card["started_from"] and card["model_config"] == config

    # bad input: one line, exit 2, nothing written over an input
    capsys.readouterr()
    assert main([str(paths[0]), "--out", str(tmp_path / "x.pth")]) == 2
    assert main([str(paths[0]), str(paths[1]), "--out", str(paths[1])]) == 2
    other = tmp_path / "other.pth"
    torch.save({"format": CHECKPOINT_FORMAT, "model": a, "config": {**config, "box_head_dim": 256}}, other)
    assert main([str(paths[0]), str(other), "--out", str(tmp_path / "y.pth")]) == 2
    assert main([str(paths[0]), str(tmp_path / "missing.pth"), "--out", str(tmp_path / "z.pth")]) == 2
    assert main([str(other), str(paths[0]), "--out", str(tmp_path / "w.pth")]) == 2  # the first has no card
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("error: ") for line in err), err
    assert "another network" in err[2] and "not found" in err[3] and "names no image contract" in err[4]
    assert [sha256_file(p) for p in paths] == before
    assert not any((tmp_path / n).exists() for n in ("y.pth", "z.pth", "w.pth"))
