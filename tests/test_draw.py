"""bone_r.draw: labels outside the box they name and never over each other; the truth dashed; readable at 500 and 2,000 px."""

from __future__ import annotations

import numpy as np
import pytest

from bone_r import draw
from bone_r.detection import Detection

GRAY = 90


def flat(h: int, w: int) -> np.ndarray:
    return np.full((h, w, 3), GRAY, np.uint8)


def random_boxes(rng: np.random.Generator, n: int, w: int, h: int, crowd: bool) -> list[draw.Rect]:
    """`n` boxes, spread over the image or crowded around one spot (a detector without NMS)."""
    out = []
    for _ in range(n):
        bw, bh = rng.uniform(0.04, 0.2) * w, rng.uniform(0.03, 0.15) * h
        cx, cy = (rng.normal(0.5, 0.06, 2) if crowd else rng.uniform(0.1, 0.9, 2)) * (w, h)
        x1, y1 = np.clip(cx - bw / 2, 0, w - bw), np.clip(cy - bh / 2, 0, h - bh)
        out.append(draw.int_box((x1, y1, x1 + bw, y1 + bh)))
    return out


@pytest.mark.parametrize("side", [500, 2000])
@pytest.mark.parametrize("crowd", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_placed_labels_never_overlap_each_other_nor_cover_their_box(side, crowd, seed):
    rng = np.random.default_rng(seed)
    w, h = side, int(side * 1.2)
    boxes = random_boxes(rng, 25, w, h, crowd)
    unit = max(1, side // 800)
    sizes = [(int(rng.integers(20, 160)) * unit, 18 * unit) for _ in boxes]
    keep_out = [(0, 0, 60, 30)]
    gap = 3
    places = draw.place_labels(boxes, sizes, (w, h), gap=gap, keep_out=keep_out, max_rings=draw.TAG_RINGS)
    placed = [(i, p) for i, p in enumerate(places) if p is not None]
    assert len(placed) >= 20  # nearly all find a place, crowded or not
    for i, p in placed:
        x1, y1, x2, y2 = p.rect
        assert (x2 - x1, y2 - y1) == sizes[i] and 0 <= x1 and 0 <= y1 and x2 <= w and y2 <= h
        assert not draw.intersects(p.rect, draw.grow(boxes[i], gap)), f"label {i} covers its own box"
        assert not draw.intersects(p.rect, keep_out[0])
        for j, q in placed:
            assert j == i or not draw.intersects(p.rect, q.rect), f"labels {i} and {j} overlap"


def test_a_label_prefers_a_place_free_of_other_boxes():
    boxes = [(100, 100, 140, 120), (100, 60, 200, 98)]  # the second sits right above the first
    places = draw.place_labels(boxes, [(40, 14)] * 2, (400, 300), gap=2)
    assert places[0].covered == 0 and places[0].rect[1] >= 120  # below, not above over the other box
    assert places[1].covered == 0


def _dets(boxes, scores, model="m"):
    return [Detection(b, s, "fracture", model) for b, s in zip(boxes, scores)]


def interior_untouched(out: np.ndarray, box, thick: int) -> bool:
    x1, y1, x2, y2 = box
    inner = out[y1 + thick + 1:y2 - thick - 1, x1 + thick + 1:x2 - thick - 1]
    return inner.size > 0 and bool((inner == GRAY).all())


def test_direct_labels_sit_outside_their_boxes():
    img = flat(400, 500)
    boxes = [(60, 80, 160, 140), (300, 200, 420, 260), (200, 320, 280, 370)]
    dets = _dets(boxes, [0.9, 0.7, 0.4])
    for d in dets:
        d.hints = {"type": "focal (best guess)", "severity": "mild or subtle"}
    out = draw.draw_overlay(img, dets)
    assert out.shape[1] == 500 and out.shape[0] > 400
    for b in boxes:
        assert interior_untouched(out, b, 2)  # no label plate, no text inside any box
    # each label (orange text on a dark plate) is there: dark plates right next to each box
    canvas = out[:400]
    assert ((canvas < 40).all(axis=2)).sum() > 3 * 400


def test_no_label_covers_another_box_either():
    """A small box inside a large one: a label beside the small box would hide the large box's inside, so the small box
    gets a number tag outside the large box (with a leader line) and the key below says what the number is."""
    img = flat(300, 400)
    big, small = (40, 40, 360, 260), (180, 140, 220, 160)
    out = draw.draw_overlay(img, _dets([big, small], [0.8, 0.6]), show_hints=False)
    inside = out[43:257, 43:357].copy()
    inside[140 - 43 - 3:160 - 43 + 3, 180 - 43 - 3:220 - 43 + 3] = GRAY  # the small box itself
    assert not (inside < 40).all(axis=2).any(), "a dark label plate lies inside the large box"
    assert out.shape[0] - 300 > 2 * 14  # the key lists the numbered boxes


def test_crowded_boxes_get_numbered_tags_and_a_key_below():
    img = flat(500, 400)
    rng = np.random.default_rng(3)
    boxes = [draw.int_box(b) for b in [(150 + rng.uniform(-30, 30), 200 + rng.uniform(-30, 30)) for _ in range(10)]
             for b in [(b[0], b[1], b[0] + 60, b[1] + 40)]]
    dets = _dets(boxes, list(np.linspace(0.9, 0.2, 10)))
    few = draw.draw_overlay(img, dets[:1])
    many = draw.draw_overlay(img, dets)
    assert many.shape[1] == 400
    assert many.shape[0] - few.shape[0] >= 5 * 14  # the key lists all ten: two columns of five rows here
    key = many[500:]
    orange = (np.abs(key.astype(int) - draw.PALETTE[0]).max(axis=2) <= 30).sum()
    assert orange > 10 * 40  # ten orange "n  fracture 0.xx" rows


def test_truth_is_dashed_and_on_top():
    img = flat(300, 300)
    truth = (50, 50, 250, 200)
    out = draw.draw_overlay(img, _dets([(48, 48, 252, 202)], [0.8]), truth=[truth])
    top_edge = out[50, 60:240]
    white = (top_edge > 200).all(axis=1)
    runs = np.count_nonzero(np.diff(white.astype(int)))
    assert white.sum() > 60 and runs >= 10  # dashes: white and dark alternate along the edge
    # without truth: no dashes, no key entry for it
    plain = draw.draw_overlay(img, _dets([(48, 48, 252, 202)], [0.8]))
    assert not (plain[50, 60:240] > 200).all(axis=1).any()
    assert plain.shape[0] == out.shape[0]  # the key's one line holds "m" and "ground truth" alike
    assert (out[300:] > 200).all(axis=2).sum() > (plain[300:] > 200).all(axis=2).sum() + 50


def plate_height(out: np.ndarray, box, h: int) -> int:
    """Rows of the dark label plate above `box` (the label's place on a flat image)."""
    x1, y1 = box[0], box[1]
    column = out[:y1, x1 + 2]
    dark = (column < 40).all(axis=1)
    return int(dark.sum())


def test_readable_on_a_500_and_a_2000_px_radiograph():
    heights = {}
    for side in (500, 2000):
        img = flat(side, int(side * 0.8))
        box = (int(side * 0.3), int(side * 0.5), int(side * 0.5), int(side * 0.6))
        out = draw.draw_overlay(img, _dets([box], [0.8]), show_hints=False)
        heights[side] = plate_height(out, box, side)
    assert heights[500] >= 14  # text about 11 px tall on a 500-px image
    assert heights[2000] >= 2.2 * heights[500]  # and it grows with the image (2.5x at 2,000 px)
