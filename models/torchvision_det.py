"""torchvision detectors (Faster R-CNN, RetinaNet, FCOS) as Bone-R backends.

A checkpoint (``train_torchvision.py``'s ``weights/best.pth``) is a plain dict
``{"model": state_dict, "config": {...}}`` of tensors and JSON-able values, read
with ``torch.load(..., weights_only=True)``: no pickled code is ever executed.
``config`` says the detector (``arch``), the backbone (``effnet_lite0_fpn``,
``effnet_lite1_fpn``, ``effnet_lite2_fpn`` or ``resnet50_fpn``), the image size
(long side) and the rest needed to rebuild the network before the weights are loaded.

``predict`` takes a harmonized RGB image, brings its long side to the training
size with area interpolation (as the training data loader did), runs the model
and returns `Detection`s in the given image's pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bone_r.contract import fit_long_side, scale_boxes
from bone_r.detection import Detection
from models.backbones import (
    EFFNET_BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_backbone,
    frozen_norm_as_scale_shift,
    frozen_norm_scale_shift,
)

ARCHS = ("fasterrcnn", "retinanet", "fcos")
CHECKPOINT_FORMAT = "bone-r-torchvision-1"  # the "format" of every checkpoint written here or by the trainer
CONFIG_VERSION = 1


def default_config(arch: str, backbone: str = "effnet_lite0_fpn", imgsz: int = 512, **overrides: Any) -> dict[str, Any]:
    """A complete, JSON-able model config; `overrides` replace its keys."""
    if arch not in ARCHS:
        raise ValueError(f"unknown detector {arch!r}; choose one of {', '.join(ARCHS)}")
    config = {
        "version": CONFIG_VERSION,
        "arch": arch,
        "backbone": backbone,
        "classes": ["fracture"],
        "num_classes": 2,  # background + fracture (label 1)
        "imgsz": int(imgsz),  # long side the model sees
        "fpn_channels": 128 if backbone in EFFNET_BACKBONES else 256,
        "frozen_bn": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "score_thresh": 0.001,
        "detections_per_img": 100,
        # Faster R-CNN's box head dominates its CPU time: fewer proposals, a narrower head (EfficientNet-Lite0/1/2;
        # ResNet keeps torchvision's 1024 so COCO weights fit).
        "box_head_dim": 512 if backbone in EFFNET_BACKBONES else 1024,
        "rpn_post_nms_top_n_test": 300,
        # training only: RPN proposals kept per level before NMS and per image after it (torchvision: 2000/2000
        # for FPN models; 1000/500 cut a CPU training step ~10% here, and the box head samples 128 of them anyway)
        "rpn_pre_nms_top_n_train": 1000,
        "rpn_post_nms_top_n_train": 500,
        "box_batch_size_per_image": 128,
        # which backbone layers train: frozen EfficientNet blocks / trainable ResNet layers
        "freeze_blocks": 0,
        "trainable_layers": 5,
    }
    config.update(overrides)
    return config


def _anchor_generator(config: dict[str, Any]):
    """Anchors sized for fractures (small, often elongated) on the backbone's levels."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    arch = config["arch"]
    if config["backbone"] == "resnet50_fpn":
        return None  # torchvision's defaults, so COCO weights fit
    if arch == "fasterrcnn":  # levels: stride 8, 16, 32 + pool (64)
        sizes = ((16, 24), (32, 48), (64, 96), (128, 192))
        return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    if arch == "retinanet":  # levels: stride 8 .. 128
        sizes = tuple((s, round(s * 2 ** (1 / 3)), round(s * 2 ** (2 / 3))) for s in (16, 32, 64, 128, 256))
        return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    return None  # FCOS: its default one anchor point per level


def build_model(config: dict[str, Any], *, pretrained_backbone: bool = False) -> nn.Module:
    """The detector described by `config`, untrained except for an optional pretrained backbone."""
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.ops import MultiScaleRoIAlign

    arch = config["arch"]
    if arch not in ARCHS:
        raise ValueError(f"unknown detector {arch!r}; choose one of {', '.join(ARCHS)}")
    backbone = build_backbone(config["backbone"], arch, pretrained=pretrained_backbone, frozen_bn=bool(config["frozen_bn"]),
                              fpn_channels=int(config["fpn_channels"]), freeze_blocks=int(config.get("freeze_blocks", 0)),
                              trainable_layers=int(config.get("trainable_layers", 5)))
    size = int(config["imgsz"])
    common = dict(min_size=size, max_size=size, image_mean=config["image_mean"], image_std=config["image_std"])
    anchors = _anchor_generator(config)
    n_cls = int(config["num_classes"])
    thresh, per_img = float(config["score_thresh"]), int(config["detections_per_img"])
    if arch == "fasterrcnn":
        if anchors is not None:  # three backbone levels + pool, not ResNet's four
            common["rpn_anchor_generator"] = anchors
            common["box_roi_pool"] = MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2)
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

        dim = int(config.get("box_head_dim", 1024))
        head = TwoMLPHead(backbone.out_channels * 7 * 7, dim)
        return FasterRCNN(backbone, num_classes=None, box_head=head, box_predictor=FastRCNNPredictor(dim, n_cls),
                          box_score_thresh=thresh, box_detections_per_img=per_img,
                          rpn_pre_nms_top_n_train=int(config.get("rpn_pre_nms_top_n_train", 2000)),
                          rpn_post_nms_top_n_train=int(config.get("rpn_post_nms_top_n_train", 1000)),
                          rpn_post_nms_top_n_test=int(config.get("rpn_post_nms_top_n_test", 1000)),
                          box_batch_size_per_image=int(config.get("box_batch_size_per_image", 512)), **common)
    if anchors is not None:
        common["anchor_generator"] = anchors
    if arch == "retinanet":
        model = RetinaNet(backbone, num_classes=n_cls, score_thresh=thresh, detections_per_img=per_img, **common)
    else:
        model = FCOS(backbone, num_classes=n_cls, score_thresh=thresh, detections_per_img=per_img, **common)
    return model


def set_model_size(model: nn.Module, size: int) -> None:
    """Make the detector's transform bring every image's long side to `size` (also used for scale jitter)."""
    model.transform.min_size = (int(size),)
    model.transform.max_size = int(size)


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """A train_torchvision.py checkpoint, read with weights_only=True; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        raise ValueError(f"{path} is not a Bone-R torchvision checkpoint readable with weights_only=True "
                         f"({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt.get("config"), dict):
        raise ValueError(f"{path} is not a Bone-R torchvision checkpoint (expected a dict with 'model' and 'config')")
    return ckpt


def half_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point tensors as float16 (half the bytes; `model_from_checkpoint` loads them back as float32)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def save_half_checkpoint(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Write `src`'s weights rounded to float16 storage at `dst` (what the bundled .pth stores), with a copy of
    its model card; the optimizer state is left out (a start for fine-tuning, not a resume point). Returns it."""
    from bone_r.card import card_path_for
    from bone_r.runs import save_checkpoint

    ckpt = load_checkpoint(src)
    half = {k: v for k, v in ckpt.items() if k != "optimizer"}
    half["model"] = half_state(ckpt["model"])
    half["stored_dtype"] = "float16"
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(dst, half)
    card = card_path_for(src)
    if card.is_file():
        card_path_for(dst).write_text(card.read_text())
    return half


def average_states(states: list[dict[str, torch.Tensor]], config: dict[str, Any],
                   weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """The weighted average (a "model soup") of state dicts of one network (`config`), in float32.

    A frozen norm is stored in either of two equivalent forms (trained: the ImageNet statistics; recovered from ONNX
    by `onnx_to_pth.py`: scale and shift with mean 0, var 1 - eps), so its four tensors are not averaged as stored:
    each is brought to scale and shift first, and the average is written back in the recovered form. Integer
    tensors must be equal in every state. Raises ValueError on different keys or shapes."""
    from torchvision.ops import FrozenBatchNorm2d

    if not states:
        raise ValueError("nothing to average")
    weights = [1.0 / len(states)] * len(states) if weights is None else [float(w) for w in weights]
    if len(weights) != len(states) or min(weights) < 0 or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"averaging weights must be {len(states)} non-negative numbers that sum to 1: {weights}")
    keys = list(states[0])
    for i, state in enumerate(states[1:], 2):
        if set(state) != set(keys):
            raise ValueError(f"checkpoint {i} has other tensors than checkpoint 1 ({len(set(state) ^ set(keys))} differ)")
        for k in keys:
            if state[k].shape != states[0][k].shape:
                raise ValueError(f"checkpoint {i}: {k} has shape {tuple(state[k].shape)}, "
                                 f"checkpoint 1 {tuple(states[0][k].shape)}")
    norms = {f"{name}.": module.eps for name, module in build_model(config, pretrained_backbone=False).named_modules()
             if isinstance(module, FrozenBatchNorm2d)}
    leaves = ("weight", "bias", "running_mean", "running_var")
    out: dict[str, torch.Tensor] = {}
    for prefix, eps in norms.items():
        pairs = [frozen_norm_scale_shift(*(state[prefix + n].float() for n in leaves), eps) for state in states]
        scale = sum(w * s for w, (s, _) in zip(weights, pairs))
        shift = sum(w * t for w, (_, t) in zip(weights, pairs))
        out |= {prefix + n: t for n, t in frozen_norm_as_scale_shift(scale, shift, eps).items()}
    for k in keys:
        if k in out:
            continue
        if states[0][k].is_floating_point():
            out[k] = sum(w * state[k].float() for w, state in zip(weights, states))
        elif all(torch.equal(state[k], states[0][k]) for state in states):
            out[k] = states[0][k].clone()
        else:
            raise ValueError(f"{k} (integer) differs between the checkpoints: it cannot be averaged")
    return {k: out[k] for k in keys}


def checkpoint_arch(path: str | Path) -> str:
    """The backend name ('fasterrcnn', 'retinanet' or 'fcos') a checkpoint was trained as."""
    arch = load_checkpoint(path)["config"].get("arch")
    if arch not in ARCHS:
        raise ValueError(f"{path}: its config names no known detector ({arch!r})")
    return str(arch)


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    model = build_model(ckpt["config"], pretrained_backbone=False)
    model.load_state_dict(ckpt["model"], strict=True)
    return model.eval()


class TorchvisionDetector:
    """A trained torchvision detector; `arch` must match the checkpoint's."""

    arch: str | None = None

    def __init__(self, weights: str | Path, device: str = "cpu", imgsz: int | None = None, arch: str | None = None):
        path = Path(weights)
        ckpt = load_checkpoint(path)
        self.config = ckpt["config"]
        expected = arch or self.arch
        if expected and self.config.get("arch") != expected:
            raise ValueError(f"{path} holds a {self.config.get('arch')} model, not {expected}; use --backend {self.config.get('arch')}")
        self.device = torch.device("cuda" if device.startswith("cuda") or device.isdigit() else "cpu")
        self.model = model_from_checkpoint(ckpt).to(self.device)
        self.imgsz = int(imgsz or self.config["imgsz"])
        set_model_size(self.model, self.imgsz)
        self.name = f"{self.config['arch']}:{path.stem}"
        self.classes = list(self.config.get("classes", ["fracture"]))

    @torch.inference_mode()
    def predict(self, rgb: np.ndarray, conf: float) -> list[Detection]:
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
        h, w = rgb.shape[:2]
        image = fit_long_side(rgb, self.imgsz)  # as the training loader did: the model then sees the same pixels
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0).to(self.device)
        out = self.model([tensor])[0]
        boxes = out["boxes"].cpu().numpy().astype(np.float64)
        scores = out["scores"].cpu().numpy().astype(np.float64)
        labels = out["labels"].cpu().numpy()
        keep = (labels >= 1) & (scores >= conf)
        boxes = scale_boxes(boxes[keep], (image.shape[1], image.shape[0]), (w, h))
        names = [self.classes[min(int(lab) - 1, len(self.classes) - 1)] for lab in labels[keep]]
        return [Detection(tuple(b), min(max(float(s), 0.0), 1.0), n, self.name) for b, s, n in zip(boxes, scores[keep], names)]


class FasterRCNNDetector(TorchvisionDetector):
    arch = "fasterrcnn"


class RetinaNetDetector(TorchvisionDetector):
    arch = "retinanet"


class FCOSDetector(TorchvisionDetector):
    arch = "fcos"


# --------------------------------------------------------------------------- ONNX export (scripts/export_onnx.py)


class OnnxExportWrapper(nn.Module):
    """The detector as ONNX holds it: a normalized model-resolution image (1, 3, h, w) -> (boxes, scores, labels).

    The normalization and the resize to the model's resolution happen outside, in torchvision's order (normalize,
    then resize): models/onnx.py reproduces `TorchvisionDetector.predict` and torchvision's transform in numpy, bit
    for bit. Everything after them is the trained model unchanged: padding to a multiple of 32, backbone, RPN or
    dense head, box decoding and NMS. Boxes are in the input's pixels.
    """

    def __init__(self, model: nn.Module):
        import copy

        from torchvision.models.detection.transform import GeneralizedRCNNTransform

        class NoResizeTransform(GeneralizedRCNNTransform):
            def normalize(self, image):
                return image

            def resize(self, image, target=None):
                return image, target

            def postprocess(self, result, image_shapes, original_image_sizes):
                return result

        super().__init__()
        self.model = copy.deepcopy(model).eval()
        t = self.model.transform
        self.model.transform = NoResizeTransform(t.min_size, t.max_size, t.image_mean, t.image_std,
                                                 size_divisible=t.size_divisible, fixed_size=t.fixed_size)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model([image[0]])[0]
        return out["boxes"], out["scores"], out["labels"]


def nms_output_limit(model: nn.Module) -> int:
    """How many boxes any NMS in `model` may keep before its caller cuts the list (RPN post-NMS top-n, detections)."""
    limits = [int(getattr(model, "detections_per_img", 0) or 0)]
    if hasattr(model, "roi_heads"):
        limits.append(int(model.roi_heads.detections_per_img))
    if hasattr(model, "rpn"):
        limits.append(int(model.rpn._post_nms_top_n["testing"]))
    return max(limits)


def onnx_export_patches(nms_limit: int):
    """A context manager that makes torchvision's traced graph faster in ONNX Runtime, same boxes:

    - NMS keeps at most `nms_limit` boxes (ONNX NonMaxSuppression's max_output_boxes_per_class): every caller
      keeps only the first (highest-score) ones anyway, so greedy NMS can stop there (7.7 -> 0.2 ms per image
      for the RPN's ~3,300 boxes);
    - the multi-scale RoIAlign merges its levels by one row gather instead of torchvision's element-wise
      ScatterElements over a (rois, C, 7, 7) index tensor (about 12 ms per image on CPU).
    """
    import contextlib

    import torchvision.ops.boxes as box_ops
    import torchvision.ops.poolers as poolers
    from torch.onnx import symbolic_opset11 as opset11

    class LimitedNms(torch.autograd.Function):
        @staticmethod
        def forward(ctx, boxes, scores, iou_threshold: float, limit: int):
            return torch.ops.torchvision.nms(boxes, scores, iou_threshold)[:limit]

        @staticmethod
        def symbolic(g, boxes, scores, iou_threshold: float, limit: int):
            selected = g.op("NonMaxSuppression", opset11.unsqueeze(g, boxes, 0),
                            opset11.unsqueeze(g, opset11.unsqueeze(g, scores, 0), 0),
                            g.op("Constant", value_t=torch.tensor([limit], dtype=torch.long)),
                            g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float)))
            column = g.op("Constant", value_t=torch.tensor([2], dtype=torch.long))
            return opset11.squeeze(g, opset11.select(g, selected, 1, column), 1)

    def batched_nms(boxes, scores, idxs, iou_threshold):
        # torchvision's coordinate trick (classes apart by an offset); the 0 keeps max() defined on no boxes
        max_coordinate = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()
        offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
        return LimitedNms.apply(boxes + offsets[:, None], scores, float(iou_threshold), int(nms_limit))

    def merge_levels(levels, unmerged_results):
        order = torch.cat([torch.where(levels == level)[0] for level in range(len(unmerged_results))])
        return torch.cat(unmerged_results)[torch.argsort(order)]

    @contextlib.contextmanager
    def patched():
        saved = box_ops.batched_nms, poolers._onnx_merge_levels
        box_ops.batched_nms, poolers._onnx_merge_levels = batched_nms, merge_levels
        try:
            yield
        finally:
            box_ops.batched_nms, poolers._onnx_merge_levels = saved

    return patched()
