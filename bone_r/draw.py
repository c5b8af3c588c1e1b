"""Boxes on a radiograph: the one drawing code of every overlay (visualize.py, compare_overlay.py, the service).

`draw_overlay` draws the model boxes (solid, one colour per model), the ground-truth
boxes when given (dashed, white on black), one label per box, and below the image a
key (the models' colours, the ground-truth line, a title) and the disclaimer band.

Labels never overlap each other and never cover the box they name: `place_labels`
puts each one outside its box (above, below, right or left, nearest first), away
from the other boxes where it can. When a label cannot be put there without covering
another box (crowded boxes, more than `max_direct` boxes, a box filling the image),
every box gets a small number tag instead, placed by the same rule, and the key below
the image lists each number with its label, score and best-guess words. Nothing is
drawn over the radiograph but boxes, their labels or tags, and thin leader lines from
a tag that had to move away from its box.

Detections are any objects with ``xyxy`` (image pixels), ``score``, ``label``, ``model``
and ``hints`` (bone_r.detection.Detection). Imports nothing else of the project.

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from bone_r.contract import display_image

# One palette for every overlay (Okabe-Ito, colour-blind safe), RGB.
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0), (204, 121, 167)]
TRUTH_COLOR = (255, 255, 255)  # ground truth: white dashes on a black outline, visible on bone and on background
TRUTH_OUTLINE = (0, 0, 0)
FONT = cv2.FONT_HERSHEY_SIMPLEX
MAX_DIRECT = 6  # more boxes than this: numbered tags and a key, whatever room there is
LABEL_RINGS = 3  # a label may sit this many label-heights away from its box (then a leader line joins them)
TAG_RINGS = 12

Rect = tuple[int, int, int, int]  # x1, y1, x2, y2 (x2, y2 exclusive)


# --------------------------------------------------------------------------- layout (pure geometry)


def intersects(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def overlap_area(a: Rect, b: Rect) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def grow(r: Rect, by: int) -> Rect:
    return r[0] - by, r[1] - by, r[2] + by, r[3] + by


def int_box(xyxy: Sequence[float]) -> Rect:
    """A box in whole pixels, as cv2.rectangle draws it (its far edge included)."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in xyxy)
    return x1, y1, max(x2, x1) + 1, max(y2, y1) + 1


@dataclass(frozen=True)
class Placement:
    rect: Rect  # where the label goes
    ring: int  # 0: against its box; k: k label-heights further out (draw a leader line)
    covered: int  # pixels of other boxes (and `avoid` rects) under it


def candidates(box: Rect, size: tuple[int, int], bounds: tuple[int, int], gap: int, ring: int) -> list[Rect]:
    """Places for a `size` label outside `box`, `ring` steps out: above, below, right, left (each at the box's
    start, end and middle), inside `bounds` (W, H); a place is shifted along the box's side to fit the image."""
    x1, y1, x2, y2 = box
    lw, lh = size
    W, H = bounds
    d = gap + ring * (lh + gap)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    out: list[Rect] = []

    def add(x: float, y: float) -> None:
        x, y = int(round(x)), int(round(y))
        if 0 <= x <= W - lw and 0 <= y <= H - lh and (r := (x, y, x + lw, y + lh)) not in out:
            out.append(r)

    def clamp(v: float, hi: int) -> float:
        return min(max(v, 0), max(hi, 0))

    for y in (y1 - d - lh, y2 + d):  # above, below
        for x in (x1, x2 - lw, cx - lw / 2):
            add(clamp(x, W - lw), y)
    for x in (x2 + d, x1 - d - lw):  # right, left
        for y in (y1, y2 - lh, cy - lh / 2):
            add(x, clamp(y, H - lh))
    return out


def place_labels(boxes: Sequence[Rect], sizes: Sequence[tuple[int, int]], bounds: tuple[int, int], *, gap: int = 2,
                 keep_out: Sequence[Rect] = (), avoid: Sequence[Rect] = (), max_rings: int = LABEL_RINGS) -> list[Placement | None]:
    """One place per label, in the order given (the first gets the best place), or None where there is none.

    A label stays inside `bounds` (W, H) and never overlaps another label, a `keep_out`
    rect, or its own box grown by `gap`. Of the allowed places (`candidates`, ring 0
    first) it takes the first that covers no other box of `boxes` and no `avoid` rect;
    when every allowed place within `max_rings` covers some, the one covering least.
    """
    placed: list[Rect] = list(keep_out)
    out: list[Placement | None] = []
    for i, (box, size) in enumerate(zip(boxes, sizes)):
        own = grow(box, gap)
        others = [b for j, b in enumerate(boxes) if j != i and b != box] + list(avoid)
        best: Placement | None = None
        for ring in range(max_rings):
            for rect in candidates(box, size, bounds, gap, ring):
                if intersects(rect, own) or any(intersects(rect, q) for q in placed):
                    continue
                covered = sum(overlap_area(rect, o) for o in others)
                if best is None or covered < best.covered:
                    best = Placement(rect, ring, covered)
                if covered == 0:
                    break
            if best is not None and best.covered == 0:
                break
        out.append(best)
        if best is not None:
            placed.append(best.rect)
    return out


# --------------------------------------------------------------------------- drawing helpers


def hint_words(hints: dict[str, Any]) -> str:
    """A short best-guess line from the hints, e.g. "focal, mild or subtle (best guess)"."""
    kind = str(hints.get("type", "")).split(" (")[0]
    words = ", ".join(str(p) for p in (kind, hints.get("severity", "")) if p)
    return f"{words} (best guess)" if words else "best guess"


def dashed_rectangle(img: np.ndarray, box: Rect, thick: int, dash: int, color=TRUTH_COLOR, outline=TRUTH_OUTLINE) -> None:
    """A dashed rectangle (ground truth): `color` dashes over a continuous dark outline."""
    x1, y1, x2, y2 = box[0], box[1], box[2] - 1, box[3] - 1
    cv2.rectangle(img, (x1, y1), (x2, y2), outline, thick + 2, cv2.LINE_AA)
    for (ax, ay), (bx, by) in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        length = math.hypot(bx - ax, by - ay)
        n = max(1, int(length // (2 * dash)))
        for k in range(n + 1):
            t0, t1 = min(1.0, 2 * k * dash / max(length, 1)), min(1.0, (2 * k + 1) * dash / max(length, 1))
            if t0 >= 1.0:
                break
            p = (int(round(ax + (bx - ax) * t0)), int(round(ay + (by - ay) * t0)))
            q = (int(round(ax + (bx - ax) * t1)), int(round(ay + (by - ay) * t1)))
            cv2.line(img, p, q, color, max(1, thick), cv2.LINE_AA)


def _nearest(rect: Rect, x: float, y: float) -> tuple[int, int]:
    return int(min(max(x, rect[0]), rect[2] - 1)), int(min(max(y, rect[1]), rect[3] - 1))


class _Text:
    """Text metrics at one scale: lines of (text, colour, scale) fitted to a width."""

    def __init__(self, unit: float):
        self.unit = unit
        self.thick = max(1, round(unit))
        self.pad = max(2, round(3 * unit))

    def fit(self, s: str, scale: float, width: float) -> tuple[float, int, int, int]:
        (tw, th), base = cv2.getTextSize(s, FONT, scale, self.thick)
        if tw > width > 0:
            scale *= width / tw
            (tw, th), base = cv2.getTextSize(s, FONT, scale, self.thick)
        return scale, tw, th, base

    def plate_size(self, lines: list[tuple[str, tuple[int, int, int], float]], width: float) -> tuple[int, int]:
        sizes = [self.fit(s, scale, width - 2 * self.pad) for s, _, scale in lines]
        return (max(tw for _, tw, _, _ in sizes) + 2 * self.pad, sum(th + base + self.pad for _, _, th, base in sizes) + self.pad)

    def plate(self, img: np.ndarray, lines: list[tuple[str, tuple[int, int, int], float]], rect: Rect) -> None:
        """Darken `rect` and write `lines` in it."""
        x, y = rect[0], rect[1]
        h, w = img.shape[:2]
        region = img[max(0, y):min(h, rect[3]), max(0, x):min(w, rect[2])]
        region[:] = (region.astype(np.float32) * 0.25).astype(np.uint8)
        ty = y + self.pad
        for s, color, scale in lines:
            scale, _, th, base = self.fit(s, scale, rect[2] - rect[0] - 2 * self.pad)
            ty += th
            cv2.putText(img, s, (x + self.pad, ty), FONT, scale, color, self.thick, cv2.LINE_AA)
            ty += base + self.pad


# --------------------------------------------------------------------------- the overlay


def draw_overlay(
    rgb: np.ndarray,
    detections: Sequence[Any],
    *,
    colors: dict[str, tuple[int, int, int]] | None = None,
    show_hints: bool = True,
    title: str | None = None,
    legend: list[str] | None = None,
    truth: Sequence[Sequence[float]] | None = None,
    max_direct: int = MAX_DIRECT,
) -> np.ndarray:
    """Boxes with their labels on a copy of `rgb`; below it the key and the disclaimer band.

    Boxes (`detections`, `truth` as x1, y1, x2, y2) are in the image's pixels. Each model
    gets its own colour from `PALETTE` (or `colors`), in order of first appearance, and
    a key entry; `legend` lists models to show (in that order) even when they have no
    box here. `truth` boxes are drawn dashed, with a key entry, whenever `truth` is given
    (an empty list: "no fracture marked"). Labels: see the module's docstring. Lines and
    text grow with the image (1x up to 800 px, e.g. 2.5x on a 2,000-px radiograph), so
    the overlay reads the same at any size. The output is as wide as the image.
    """
    canvas = np.ascontiguousarray(rgb.copy())
    if canvas.ndim == 2:
        canvas = cv2.cvtColor(canvas, cv2.COLOR_GRAY2RGB)
    h, w = canvas.shape[:2]
    unit = max(1.0, max(h, w) / 800.0)
    text = _Text(unit)
    thick = max(1, round(2 * unit))
    gap = thick + max(1, round(unit))
    fscale = 0.55 * unit
    dets = sorted(detections, key=lambda d: d.score, reverse=True)  # numbering and the best places go to the best boxes
    models = list(dict.fromkeys([*(legend or []), *(d.model or "model" for d in detections)]))
    colors = dict(colors or {})
    for i, name in enumerate(models):
        colors.setdefault(name, PALETTE[i % len(PALETTE)])
    truth_boxes = [int_box(t) for t in truth] if truth is not None else []

    boxes = [int_box(d.xyxy) for d in dets]
    for det, box in reversed(list(zip(dets, boxes))):  # the best box is drawn last, on top
        cv2.rectangle(canvas, (box[0], box[1]), (box[2] - 1, box[3] - 1), colors[det.model or "model"], thick)
    for t in truth_boxes:  # over the model's boxes: a crowd of them cannot hide the truth
        dashed_rectangle(canvas, t, max(1, round(1.5 * unit)), max(4, round(7 * unit)))

    def leader(place: Placement, box: Rect, color) -> None:
        if place.ring > 0:  # moved away from its box: a thin line joins them
            cx, cy = (place.rect[0] + place.rect[2]) / 2, (place.rect[1] + place.rect[3]) / 2
            bx, by = _nearest(box, cx, cy)
            cv2.line(canvas, _nearest(place.rect, bx, by), (bx, by), color, max(1, thick // 2), cv2.LINE_AA)

    labels = []
    for det in dets:
        color = colors[det.model or "model"]
        lines = [(f"{det.label} {det.score:.2f}", color, fscale)]
        if show_hints and det.hints:
            lines.append((hint_words(det.hints), color, fscale * 0.85))
        labels.append(lines)
    numbered = len(dets) > max_direct
    if dets and not numbered:
        sizes = [text.plate_size(lines, w) for lines in labels]
        places = place_labels(boxes, sizes, (w, h), gap=gap, avoid=truth_boxes, max_rings=LABEL_RINGS)
        numbered = any(p is None or p.covered for p in places)
    if numbered:
        labels_drawn = [[(str(i + 1), lines[0][1], fscale)] for i, lines in enumerate(labels)]
        sizes = [text.plate_size(tag, w) for tag in labels_drawn]
        places = place_labels(boxes, sizes, (w, h), gap=gap, avoid=truth_boxes, max_rings=TAG_RINGS)
    else:
        labels_drawn = labels
    tagless: set[int] = set()
    if dets:
        tagless = {i for i, place in enumerate(places) if place is None}
        for lines, place, box in zip(labels_drawn, places, boxes):  # leader lines first: plates go over them
            if place is not None:
                leader(place, box, lines[0][1])
        for lines, place in zip(labels_drawn, places):
            if place is not None:
                text.plate(canvas, lines, place.rect)

    # the key below the image: models, ground truth, title; then the numbered entries
    entries: list[tuple[str, tuple[int, int, int], str]] = [(name, colors[name], "swatch") for name in models]
    if truth is not None:
        entries.append(("ground truth (dashed)" if truth_boxes else "ground truth: no fracture marked", TRUTH_COLOR, "dashed"))
    if title:
        entries.append((title, (255, 255, 255), ""))
    rows = []
    if numbered:
        for i, (det, lines) in enumerate(zip(dets, labels)):
            words = f"{i + 1}  {det.label} {det.score:.2f}" + (f"  {lines[1][0].removesuffix(' (best guess)')}" if len(lines) > 1 else "")
            rows.append((words + ("  (no room for its number)" if i in tagless else ""), lines[0][1], ""))
        if any(len(lines) > 1 for lines in labels):
            entries.append(("type, severity: best guesses", (255, 255, 255), ""))
    panel = _key_panel(entries, rows, w, text, fscale)
    band = _band("Research tool - not a diagnosis" + ("" if dets else " | no finding above threshold"), w, text, fscale)
    return np.vstack([canvas, *([panel] if panel is not None else []), band])


def _key_panel(entries: list[tuple[str, tuple[int, int, int], str]], rows: list[tuple[str, tuple[int, int, int], str]],
               w: int, text: _Text, fscale: float) -> np.ndarray | None:
    """Key entries flowed left to right (a swatch or a dashed sample before each), then numbered rows in columns."""
    if not entries and not rows:
        return None
    pad = text.pad
    _, _, th, base = text.fit("Ag", fscale, 10**6)
    line_h = th + base + 2 * pad
    sw = th + base  # swatch side
    cells = []  # (x, y, kind, text, colour, scale)
    x = y = pad
    for s, color, kind in entries:
        lead = sw + pad if kind else 0
        scale, tw, _, _ = text.fit(s, fscale, w - 2 * pad - lead)
        if x > pad and x + lead + tw > w - pad:
            x, y = pad, y + line_h
        cells.append((x, y, kind, s, color, scale))
        x += lead + tw + 3 * pad
    if entries:
        y += line_h
    if rows:
        fitted = [text.fit(s, fscale * 0.85, w - 2 * pad) for s, _, _ in rows]
        col_w = max(tw for _, tw, _, _ in fitted) + 3 * pad
        n_cols = max(1, (w - pad) // col_w)
        n_rows = math.ceil(len(rows) / n_cols)
        for k, ((s, color, _), (scale, _, _, _)) in enumerate(zip(rows, fitted)):
            c, r = divmod(k, n_rows)
            cells.append((pad + c * col_w, y + r * line_h, "", s, color, scale))
        y += n_rows * line_h
    panel = np.full((y + pad, w, 3), 24, np.uint8)
    for cx, cy, kind, s, color, scale in cells:
        if kind == "swatch":
            cv2.rectangle(panel, (cx, cy + pad), (cx + sw - 1, cy + pad + sw - 1), color, -1)
        elif kind == "dashed":
            dashed_rectangle(panel, (cx + 1, cy + pad + 1, cx + sw - 1, cy + pad + sw - 1), max(1, round(text.unit)), max(2, sw // 5))
        tx = cx + (sw + pad if kind else 0)
        cv2.putText(panel, s, (tx, cy + pad + th), FONT, scale, color, text.thick, cv2.LINE_AA)
    return panel


def _band(msg: str, w: int, text: _Text, fscale: float) -> np.ndarray:
    """The disclaimer band: dark, white text; on a narrow image just "Not a diagnosis", as large as it fits."""
    scale, _, th, base = text.fit(msg, fscale, w - 2 * text.pad)
    if scale < 0.3:
        msg = "Not a diagnosis"
        scale, _, th, base = text.fit(msg, fscale, w - 2 * text.pad)
    band_h = max(int(26 * text.unit), th + base + 2 * text.pad)
    band = np.full((band_h, w, 3), 40, np.uint8)
    cv2.putText(band, msg, (text.pad, (band_h + th) // 2 - 1), FONT, scale, (255, 255, 255), text.thick, cv2.LINE_AA)
    return band


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def render(loaded: Any, detections: Sequence[Any], **kw: Any) -> np.ndarray:
    """The overlay of `detections` on a decoded image: `draw_overlay` on its display view, at the original size
    (an image decoded reduced, `ImageMeta.reduced`, is scaled back up: boxes are in original pixels)."""
    view = display_image(loaded.pixels)
    meta = getattr(loaded, "meta", None)
    if meta is not None and getattr(meta, "reduced", 1) > 1 and (view.shape[1], view.shape[0]) != meta.size:
        view = cv2.resize(view, meta.size, interpolation=cv2.INTER_LINEAR)
    return draw_overlay(view, detections, **kw)


def overlay_for(prediction: Any, loaded: Any, **kw: Any) -> np.ndarray:
    """The overlay of a `Prediction` on the image it was made from."""
    return render(loaded, prediction.detections, **kw)
