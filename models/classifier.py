"""The image-level abnormality classifier (EfficientNet-Lite0, one logit) that `train_mura_cls.py` trains and the
ensemble fuses with a detector: its checkpoint format, its input (letterboxed gray squares) and its loader.
Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bone_r.contract import Contract

CHECKPOINT_FORMAT = "bone-r-classifier-1"


def letterbox_square(gray_or_rgb: np.ndarray, size: int) -> np.ndarray:
    """Long side to `size` (area when shrinking, linear when growing), centred on a black square."""
    import cv2

    h, w = gray_or_rgb.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = cv2.resize(gray_or_rgb, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    out = np.zeros((size, size) + gray_or_rgb.shape[2:], np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


def to_tensor(square_gray: np.ndarray, mean: list[float], std: list[float]):
    """One gray square -> a normalized (3, H, W) float tensor (three equal channels, as harmonize gives)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(square_gray)).float().div_(255.0)
    x = x.unsqueeze(0).expand(3, -1, -1)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (x - m) / s


def build_classifier(pretrained: bool):
    """EfficientNet-Lite0 with a single-logit head (ImageNet weights from the installed package when `pretrained`)."""
    from torch import nn

    from models.backbones import load_effnet_lite

    net = load_effnet_lite("lite0", pretrained)
    net._fc = nn.Linear(net._fc.in_features, 1)
    return net


class AbnormalityClassifier:
    """A trained classifier: ``clf(rgb) -> p_abnormal`` for a harmonized RGB image (what `harmonize` gives)."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        import torch

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"classifier not found: {path}")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
            raise ValueError(f"{path} is not a Bone-R classifier readable with weights_only=True ({type(err).__name__})") from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a Bone-R classifier checkpoint ({CHECKPOINT_FORMAT})")
        self.config = ckpt["config"]
        self.contract = Contract.from_dict(self.config["contract"]) if self.config.get("contract") else None
        self.imgsz = int(self.config["imgsz"])
        self.device = torch.device("cuda" if device.startswith("cuda") or device.isdigit() else "cpu")
        self.model = build_classifier(pretrained=False)
        self.model.load_state_dict(ckpt["model"], strict=True)
        self.model.eval().to(self.device)
        self.name = f"classifier:{path.stem}"

    def __call__(self, rgb: np.ndarray) -> float:
        import cv2
        import torch

        if rgb.ndim == 3:  # harmonized images have three equal channels; anything else is made gray
            same = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
            rgb = rgb[..., 0] if same else cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY)
        square = letterbox_square(rgb.astype(np.uint8, copy=False), self.imgsz)
        x = to_tensor(square, self.config["mean"], self.config["std"]).unsqueeze(0).to(self.device)
        with torch.inference_mode():
            return float(torch.sigmoid(self.model(x)).item())


def load_classifier(path: str | Path, device: str = "cpu") -> AbnormalityClassifier:
    """The trained abnormality classifier at `path` (best.pth): a callable rgb -> p_abnormal."""
    return AbnormalityClassifier(path, device)
