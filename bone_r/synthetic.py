"""Synthetic radiographs with known answers, for tests (and the docs demo).

A phantom is a soft-tissue background with a bright, bone-like shaft (cortex
brighter than the marrow) crossing the image; a fractured phantom has a dark
gap line drawn across the shaft, and its box is the tight box around that gap.
Nothing here reads real data.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from bone_r.dataset import GroundTruth, GTImage
from bone_r.detection import Detection


@dataclass
class Phantom:
    pixels: np.ndarray  # 2-D uint16 (0..65535) or uint8
    box: tuple[int, int, int, int] | None  # xyxy of the fracture, None when intact

    @property
    def yolo_row(self) -> str:
        """The YOLO label line of the fracture box ('' for an intact phantom)."""
        if self.box is None:
            return ""
        h, w = self.pixels.shape
        x1, y1, x2, y2 = self.box
        return f"0 {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"


def make_phantom(height: int = 256, width: int = 200, *, fractured: bool = True, seed: int = 0, bits: int = 16) -> Phantom:
    """A bone-like phantom; `bits` 16 gives uint16 using 12 bits of range (as many detectors store)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = 0.18 + 0.05 * np.sin(xx / width * 3.1 + rng.uniform(0, 3)) + 0.03 * (yy / height)
    # a vertical-ish shaft: cortex (bright rim) around marrow
    cx = width * rng.uniform(0.4, 0.6)
    half = width * rng.uniform(0.12, 0.18)
    tilt = rng.uniform(-0.15, 0.15)
    centre = cx + tilt * (yy - height / 2)
    dist = np.abs(xx - centre)
    shaft = dist < half
    cortex = shaft & (dist > half * 0.55)
    img = np.where(shaft, 0.55, img)
    img = np.where(cortex, 0.85, img)
    box = None
    if fractured:
        # a dark oblique gap across the shaft at a random height
        fy = height * rng.uniform(0.3, 0.7)
        slope = rng.uniform(-0.4, 0.4)
        thickness = max(2.0, height * 0.012)
        line_y = fy + slope * (xx - cx)
        gap = shaft & (np.abs(yy - line_y) < thickness)
        img = np.where(gap, 0.25, img)
        ys, xs = np.nonzero(gap)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    img = img + rng.normal(0, 0.01, img.shape)
    img = np.clip(img, 0, 1)
    if bits == 8:
        return Phantom((img * 255).round().astype(np.uint8), box)
    return Phantom((img * 4095).round().astype(np.uint16), box)  # 12 bits used in a 16-bit container


def encode(pixels: np.ndarray, ext: str, **params: int) -> bytes:
    flags: list[int] = []
    if ext in (".jpg", ".jpeg"):
        flags = [cv2.IMWRITE_JPEG_QUALITY, params.get("quality", 92)]
    ok, buf = cv2.imencode(ext, pixels, flags)
    assert ok, f"cannot encode {ext}"
    return buf.tobytes()


def to_8bit(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    return (pixels.astype(np.float32) / pixels.max() * 255).round().astype(np.uint8)


def truncated_jpeg(pixels: np.ndarray, keep: float = 0.6) -> bytes:
    data = encode(to_8bit(pixels), ".jpg")
    return data[: int(len(data) * keep)]


def make_dicom(
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple | None = None,  # (center, width) or ([c1, c2], [w1, w2])
    voi_lut: np.ndarray | None = None,  # LUT entries, first input value 0, 16-bit output
    voi_function: str | None = None,
    compress: str | None = None,  # "rle", "jpeg2000" or "jpegls" (lossless)
    preamble: bool = True,
) -> bytes:
    """A minimal DX DICOM file around `stored` (uint16 or uint8), written with pydicom."""
    import pydicom
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = "PHANTOM"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    bits = 8 if stored.dtype == np.uint8 else 16
    ds.BitsAllocated = bits
    ds.BitsStored = bits if bits == 8 else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if slope is not None or intercept is not None:
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function:
        ds.VOILUTFunction = voi_function
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, 16]
        item.add_new(0x00283006, "US", [int(v) for v in voi_lut])  # LUTData
        ds.VOILUTSequence = [item]
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    if compress == "rle":
        from pydicom.uid import RLELossless

        ds.compress(RLELossless)
    elif compress == "jpeg2000":
        from pydicom.uid import JPEG2000Lossless

        ds.compress(JPEG2000Lossless)
    elif compress == "jpegls":
        from pydicom.uid import JPEGLSLossless

        ds.compress(JPEGLSLossless)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    data = buf.getvalue()
    return data if preamble else data[128:]


def write_dataset(root: Path, n: int = 6, size: tuple[int, int] = (256, 200), *, positives: float = 0.5, seed: int = 0) -> list[Phantom]:
    """A tiny YOLO tree `root/images/{train,val,test}` + `root/labels/...` of 8-bit PNG phantoms."""
    phantoms = []
    splits = ["train", "val", "test"]
    for i in range(n):
        split = splits[i % 3]
        fractured = (i % int(round(1 / positives))) == 0 if positives > 0 else False
        ph = make_phantom(*size, fractured=fractured, seed=seed + i, bits=8)
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "images" / split / f"ph{i:03d}.png"), ph.pixels)
        (root / "labels" / split / f"ph{i:03d}.txt").write_text(ph.yolo_row + ("\n" if ph.yolo_row else ""))
        phantoms.append(ph)
    return phantoms


MODEL_A = "demo-yolo (synthetic)"


MODEL_B = "demo-fcos (synthetic)"


def jitter(box: tuple[float, ...], rng: np.random.Generator, amount: float, size: tuple[int, int]) -> tuple[float, ...]:
    """A detector's imperfect copy of a true box: each side moved by up to `amount` of the box's size."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    dx1, dx2 = rng.uniform(-amount, amount, 2) * w
    dy1, dy2 = rng.uniform(-amount, amount, 2) * h
    x1, x2 = sorted((float(np.clip(x1 + dx1, 0, size[0])), float(np.clip(x2 + dx2, 0, size[0]))))
    y1, y2 = sorted((float(np.clip(y1 + dy1, 0, size[1])), float(np.clip(y2 + dy2, 0, size[1]))))
    return x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)


def random_box(rng: np.random.Generator, size: tuple[int, int]) -> tuple[float, ...]:
    w, h = rng.uniform(0.06, 0.25) * size[0], rng.uniform(0.03, 0.12) * size[1]
    x, y = rng.uniform(0, size[0] - w), rng.uniform(0, size[1] - h)
    return x, y, x + w, y + h


DETECTORS = {
    # name: (chance to find a true box, its score range, box jitter, false positives per image, their score range)
    MODEL_A: (0.85, (0.35, 0.95), 0.12, 0.8, (0.02, 0.55)),
    MODEL_B: (0.75, (0.30, 0.90), 0.20, 0.5, (0.02, 0.50)),
}


def demo_detect(name: str, boxes: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> list[Detection]:
    find, (s_lo, s_hi), amount, fp_rate, (f_lo, f_hi) = DETECTORS[name]
    out = []
    for box in boxes:
        if rng.uniform() < find:
            out.append(Detection(jitter(tuple(box), rng, amount, size), round(float(rng.uniform(s_lo, s_hi)), 4), "fracture", name))
    for _ in range(rng.poisson(fp_rate)):
        out.append(Detection(random_box(rng, size), round(float(rng.uniform(f_lo, f_hi)), 4), "fracture", name))
    return out


def demo_ground_truth(n: int, split: str, rng: np.random.Generator) -> GroundTruth:
    """Made-up cases (no image files): sizes, 0-2 true boxes, a source, a region, and pairs sharing a group."""
    sources = ["demo-atlas", "demo-hip", "demo-hand"]
    regions = {"demo-atlas": ["hand", "leg", "shoulder"], "demo-hip": ["hip"], "demo-hand": ["hand", "wrist"]}
    images = []
    for i in range(n):
        source = sources[i % len(sources)]
        region = regions[source][(i // len(sources)) % len(regions[source])]
        size = (int(rng.integers(300, 700)), int(rng.integers(350, 900)))
        n_boxes = int(rng.choice([0, 0, 0, 1, 1, 2]))
        boxes = np.array([random_box(rng, size) for _ in range(n_boxes)], dtype=np.float64).reshape(-1, 4)
        key = f"{split}/case{i:04d}.png"
        images.append(GTImage(Path("/synthetic-demo") / key, key, size[0], size[1], boxes, int(n_boxes > 0),
                                       source, region, f"{split}-group{i // 2:04d}"))
    return GroundTruth(images, split, "synthetic demo (generated cases, no images)", None,
                                ["synthetic demo: made-up cases and predictions"], None)
