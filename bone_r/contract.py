"""The harmonization contract: a Contract holds every rule and applies it (`Contract.harmonize`, `Contract.to_uint8`,
`Contract.dicom_display`); the one long-side resize (`fit_long_side`) and box scaling between sizes, used by the trainer,
the torchvision backend and the ONNX backend alike. Research and teaching tool, not a diagnosis.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class Contract:
    """The harmonization contract: what every image looks like to a model.

    It is data, recorded in the dataset manifest and in the model card, so that
    prediction reproduces exactly what training saw.

    - ``clahe_clip`` / ``clahe_grid``: OpenCV CLAHE clip limit and tile grid
      (grid × grid tiles); ``clahe_clip = 0`` disables CLAHE.
    - ``max_side``: images whose long side is larger are downscaled
      (aspect preserved, area interpolation); smaller images are never upscaled.
    - ``high_bit_rule``: how >8-bit PNG/TIFF data becomes 8-bit. ``minmax``
      stretches the image's own min..max to 0..255, so 12-bit data stored in
      16-bit containers keeps its full contrast (no clipping, no /256).
    - ``dicom_voi``: the DICOM display rule. ``standard``: Modality LUT
      (RescaleSlope/Intercept), then the VOI LUT Sequence if present, else the
      first WindowCenter/WindowWidth pair, else min..max; MONOCHROME1 inverted.
    - ``reduced_decode``: 0 (off, the default) or a long side N: a JPEG file or a JPEG 2000 DICOM frame
      may be decoded at 1/2, 1/4 or 1/8 of its size (libjpeg DCT scaling, OpenJPEG resolution levels),
      the strongest reduction whose long side stays >= N
      (`decode_reduction`); the ``max_side`` resize still follows. It changes the pixels a model sees, so it
      is a rule like the others; recorded in ``to_dict`` only when on, so cards and manifests written
      before it existed read as off (JOURNAL 2026-11-29 measures it).
    """

    clahe_clip: float = 2.0
    clahe_grid: int = 8
    max_side: int = 1024
    high_bit_rule: str = "minmax"
    dicom_voi: str = "standard"
    version: int = 1
    reduced_decode: int = 0

    def __post_init__(self):
        if not (self.clahe_clip >= 0 and math.isfinite(self.clahe_clip)):
            raise ValueError(f"clahe_clip must be a finite number >= 0, got {self.clahe_clip!r}")
        if int(self.clahe_grid) < 1:
            raise ValueError(f"clahe_grid must be >= 1, got {self.clahe_grid!r}")
        if int(self.max_side) < 32:
            raise ValueError(f"max_side must be >= 32, got {self.max_side!r}")
        if self.high_bit_rule not in HIGH_BIT_RULES:
            raise ValueError(f"high_bit_rule must be one of {sorted(HIGH_BIT_RULES)}, got {self.high_bit_rule!r}")
        if self.dicom_voi not in DICOM_VOI_RULES:
            raise ValueError(f"dicom_voi must be one of {list(DICOM_VOI_RULES)}, got {self.dicom_voi!r}")
        if isinstance(self.reduced_decode, bool) or not isinstance(self.reduced_decode, int) or not (
                self.reduced_decode == 0 or self.reduced_decode >= 32):
            raise ValueError(f"reduced_decode must be 0 (off) or a long side >= 32, got {self.reduced_decode!r}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.reduced_decode:  # off: absent, as in every card and manifest written before the rule existed
            del data["reduced_decode"]
        return data

    def decode_reduction(self, width: int, height: int) -> int:
        """1, 2, 4 or 8: the factor `reduced_decode` allows for an image of this size (1 when off)."""
        if not self.reduced_decode:
            return 1
        for factor in (8, 4, 2):
            if max(width, height) // factor >= self.reduced_decode:
                return factor
        return 1

    def harmonize(self, gray: np.ndarray) -> np.ndarray:
        """`harmonize` under this contract."""
        return harmonize(gray, self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Contract:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown contract keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=True))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Contract:
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path} does not hold a contract mapping")
        return cls.from_dict(data)


def long_side_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(width, height) after fitting the long side to `long_side`: aspect kept, rounded, never upscaled.

    The one size rule of the project: harmonization (`Contract.max_side`), the trainer, the torchvision backend and
    the ONNX backend (the model's `imgsz`) all use it, so their pixels agree."""
    if max(width, height) <= long_side:
        return width, height
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def fit_long_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """`image` (H x W or H x W x C) area-downscaled so that its long side is at most `long_side`; never upscaled."""
    height, width = image.shape[:2]
    new_w, new_h = long_side_size(width, height, long_side)
    if (new_w, new_h) == (width, height):
        return image
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)


def scale_boxes(boxes: np.ndarray, from_wh: tuple[int, int], to_wh: tuple[int, int]) -> np.ndarray:
    """xyxy boxes on an image of size `from_wh` mapped onto the same image at `to_wh` (clipped to it)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    sx = to_wh[0] / from_wh[0]
    sy = to_wh[1] / from_wh[1]
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]] * sx, 0, to_wh[0])
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]] * sy, 0, to_wh[1])
    return boxes


def minmax_to_uint8(gray: np.ndarray) -> np.ndarray:
    """8-bit data passes through; wider data is min..max stretched to 0..255 (the ``minmax`` high-bit rule)."""
    if gray.dtype == np.uint8:
        return gray
    lo, hi = float(gray.min()), float(gray.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return np.zeros(gray.shape, np.uint8)
    scaled = (gray.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


# The rules a contract may name, and the code that applies each. A new rule is one entry here (and its function).
HIGH_BIT_RULES = {"minmax": minmax_to_uint8}
# DICOM display rules: the decoder (`bone_r.image`) asks `Contract.dicom_display` which one to apply.
DICOM_VOI_RULES = ("standard",)


def harmonized_size(width: int, height: int, contract: Contract) -> tuple[int, int]:
    """(width, height) of the harmonized image for an original of this size."""
    return long_side_size(width, height, contract.max_side)


def to_uint8(gray: np.ndarray, contract: Contract | None = None) -> np.ndarray:
    """8-bit data passes through; wider data goes through the contract's `high_bit_rule` (default ``minmax``)."""
    return HIGH_BIT_RULES[(contract or Contract()).high_bit_rule](gray)


def harmonize(gray: np.ndarray, contract: Contract | None = None) -> np.ndarray:
    """The 3-channel uint8 image a model sees, from `load_image`'s grayscale.

    Downscale to the contract's long side (`fit_long_side`: area interpolation, aspect kept),
    bring high-bit data to 8 bits (`high_bit_rule`), CLAHE, then gray -> RGB (three equal channels).
    """
    contract = contract or Contract()
    if gray.ndim != 2:
        raise ValueError(f"harmonize expects a 2-D grayscale array, got shape {gray.shape}")
    # Resize before the 8-bit mapping: cheaper, and area averaging keeps the precision.
    gray = to_uint8(fit_long_side(gray, contract.max_side), contract)
    if contract.clahe_clip > 0:
        clahe = cv2.createCLAHE(clipLimit=float(contract.clahe_clip), tileGridSize=(contract.clahe_grid, contract.clahe_grid))
        gray = clahe.apply(gray)
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)


def display_image(gray: np.ndarray) -> np.ndarray:
    """An RGB uint8 view of `load_image`'s grayscale for drawing on (no CLAHE)."""
    return cv2.cvtColor(to_uint8(gray), cv2.COLOR_GRAY2RGB)
