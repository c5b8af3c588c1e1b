"""make_splits.py and build_dataset.py on tiny synthetic ingested sources with known answers."""

from __future__ import annotations

import csv
import json
import zlib
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from scripts import build_dataset, make_splits


def tiny_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", pixels)
    assert ok
    return buf.tobytes()


def write_source(folder: Path, source: str, images: list[dict], image_suffix: str = ".png", manifest_suffix: str | None = None) -> Path:
    """An ingested source: images/<stem><suffix>, labels/<stem>.txt, manifest.csv.

    Each image dict: stem, group, label (0/1), region, and optional seed (same seed = identical bytes).
    """
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    rows = []
    for n, im in enumerate(images):
        (folder / "images" / f"{im['stem']}{image_suffix}").write_bytes(tiny_png(im.get("seed", zlib.crc32(f"{source}/{n}".encode()))))
        rows_txt = "0 0.500000 0.500000 0.200000 0.200000\n" if im["label"] else ""
        (folder / "labels" / f"{im['stem']}.txt").write_text(rows_txt)
        rows.append(
            {
                "image": f"images/{im['stem']}{manifest_suffix or image_suffix}",
                "source": source,
                "region": im.get("region", "hand"),
                "regions": im.get("region", "hand"),
                "group": im["group"],
                "label": im["label"],
                "boxes": im["label"],
                "weak": 0,
                "original": f"orig/{im['stem']}.jpg",
                "note": "",
            }
        )
    with open(folder / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def read_splits(out: Path) -> list[dict]:
    with open(out / "splits.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def sources(tmp_path: Path) -> list[Path]:
    """Source A: 30 patients x 2 images, both labels; source B: 12 radiographs x 3 augmented copies; C: 2 groups."""
    a = [
        {"stem": f"p{p:02d}_{k}", "group": f"p{p:02d}", "label": int(p % 3 == 0), "region": "hand" if p < 20 else "leg", "seed": 1000 + 2 * p + k}
        for p in range(30)
        for k in range(2)
    ]
    b = [{"stem": f"r{r:02d}_png.rf.{c}", "group": f"r{r:02d}_png", "label": int(r % 2), "region": "hip", "seed": 2000 + 3 * r + c} for r in range(12) for c in range(3)]
    c = [{"stem": f"x{i}", "group": f"x{i}", "label": 0, "region": "wrist", "seed": 3000 + i} for i in range(2)]
    return [
        write_source(tmp_path / "in" / "srcA", "srcA", a),
        write_source(tmp_path / "in" / "srcB", "srcB", b),
        write_source(tmp_path / "in" / "srcC", "srcC", c),
    ]


def run_splits(inputs: list[Path], out: Path, *extra: str) -> int:
    return make_splits.main([*map(str, inputs), "--out", str(out), *extra])


def test_groups_never_cross_and_every_stratum_is_covered(sources: list[Path], tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert run_splits(sources, out) == 0
    printed = capsys.readouterr().out
    rows = read_splits(out)
    assert len(rows) == 60 + 36 + 2
    splits_of = defaultdict(set)
    for r in rows:
        splits_of[r["group"]].add(r["split"])
        assert (out / r["path"]).is_file() and r["path"].startswith(f"images/{r['split']}/{r['source']}__")
        label_file = out / "labels" / r["split"] / (Path(r["path"]).stem + ".txt")
        assert len(label_file.read_text().splitlines()) == int(r["boxes"]) == int(r["label"])
    assert all(len(s) == 1 for s in splits_of.values())
    # the three augmented copies of each radiograph share one group and one split
    b_groups = {r["group"] for r in rows if r["source"] == "srcB"}
    assert len(b_groups) == 12 and all(g.startswith("srcB:r") and g.endswith("_png") for g in b_groups)
    # every stratum (source x region x label) with >= 3 groups has a group in val and in test
    strata = defaultdict(lambda: defaultdict(set))
    for r in rows:
        strata[(r["source"], r["region"], r["label"])][r["split"]].add(r["group"])
    for key, by_split in strata.items():
        n = sum(len(g) for g in by_split.values())
        if n >= 3:
            assert by_split["val"] and by_split["test"] and by_split["train"], key
    assert {r["split"] for r in rows if r["source"] == "srcC"} == {"train"}  # 2 groups: too few to spread
    assert "fracture" in (out / "dataset.yaml").read_text()
    ds = yaml.safe_load((out / "dataset.yaml").read_text())
    assert ds == {"train": "images/train", "val": "images/val", "test": "images/test", "nc": 1, "names": {0: "fracture"}}
    assert "srcA" in printed and "train  total" in printed
    assert make_splits.main(["--verify", str(out)]) == 0


def test_same_seed_same_split_other_seed_differs(sources: list[Path], tmp_path: Path):
    assert run_splits(sources, tmp_path / "s0a", "--seed", "0") == 0
    assert run_splits(sources, tmp_path / "s0b", "--seed", "0") == 0
    assert run_splits(sources, tmp_path / "s1", "--seed", "1") == 0
    a, b, c = ((tmp_path / d / "splits.csv").read_text() for d in ("s0a", "s0b", "s1"))
    assert a == b
    assert a != c


def test_non_empty_output_refused_and_overwrite_clears(sources: list[Path], tmp_path: Path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert run_splits(sources, out) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me" and not (out / "splits.csv").exists()
    assert run_splits(sources, out, "--overwrite") == 0
    assert not (out / "precious.txt").exists() and (out / "splits.csv").is_file()


def test_identical_images_merge_their_groups(tmp_path: Path):
    imgs = [{"stem": f"g{i}", "group": f"g{i}", "label": 0, "seed": 500 + i} for i in range(40)]
    imgs[7]["seed"] = imgs[3]["seed"]  # g3 and g7: byte-identical images under two ids
    imgs[9]["seed"] = imgs[3]["seed"]
    src = write_source(tmp_path / "in" / "dups", "dups", imgs)
    out = tmp_path / "out"
    assert run_splits([src], out) == 0
    rows = {r["source_group"]: r for r in read_splits(out)}
    assert rows["dups:g3"]["group"] == rows["dups:g7"]["group"] == rows["dups:g9"]["group"] == "dups:g3"
    assert rows["dups:g3"]["split"] == rows["dups:g7"]["split"] == rows["dups:g9"]["split"]
    info = json.loads((out / "build_info.json").read_text())
    assert info["duplicate_merges"] == [["dups:g3", "dups:g7", "identical"], ["dups:g3", "dups:g9", "identical"]]
    assert info["groups"] == 38


def test_near_identical_images_merge_their_groups(tmp_path: Path):
    imgs = [{"stem": f"g{i:02d}", "group": f"g{i:02d}", "label": 0, "seed": 800 + i} for i in range(30)]
    src = write_source(tmp_path / "in" / "near", "near", imgs)
    # g05 becomes a re-encoded, slightly noisy copy of g01: different bytes, same picture
    base = cv2.imdecode(np.frombuffer((src / "images" / "g01.png").read_bytes(), np.uint8), cv2.IMREAD_GRAYSCALE)
    noisy = np.clip(base.astype(int) + np.random.default_rng(1).integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
    cv2.imwrite(str(src / "images" / "g05.png"), noisy)
    out = tmp_path / "out"
    assert run_splits([src], out) == 0
    rows = {r["source_group"]: r for r in read_splits(out)}
    assert rows["near:g05"]["group"] == rows["near:g01"]["group"] == "near:g01"
    assert rows["near:g05"]["sha256"] != rows["near:g01"]["sha256"]
    info = json.loads((out / "build_info.json").read_text())
    assert [m[:2] for m in info["duplicate_merges"]] == [["near:g01", "near:g05"]] and info["groups"] == 29
    assert run_splits([src], tmp_path / "off", "--near-dup-threshold", "0") == 0  # turned off: kept apart
    assert json.loads((tmp_path / "off" / "build_info.json").read_text())["groups"] == 30


def test_identical_image_positive_and_negative_drops_the_negative(tmp_path: Path, capsys):
    imgs = [{"stem": f"g{i}", "group": f"g{i}", "label": int(i < 5), "seed": 700 + i} for i in range(10)]
    imgs[8]["seed"] = imgs[2]["seed"]  # g2 (positive) and g8 (negative) are the same image
    src = write_source(tmp_path / "in" / "c", "c", imgs)
    assert run_splits([src], tmp_path / "out") == 0
    kept = {r["source_group"] for r in read_splits(tmp_path / "out")}
    assert "c:g2" in kept and "c:g8" not in kept and len(kept) == 9
    assert "labelled both positive and negative: 1" in capsys.readouterr().out
    assert run_splits([src], tmp_path / "err", "--label-conflicts", "error") == 2


def test_check_no_leak_names_the_crossing_group_or_hash():
    rows = [{"group": "g1", "sha256": "a", "split": "train"}, {"group": "g1", "sha256": "b", "split": "test"}]
    with pytest.raises(make_splits.SplitError, match="group g1 is in"):
        make_splits.check_no_leak(rows)
    rows = [{"group": "g1", "sha256": "a", "split": "train"}, {"group": "g2", "sha256": "a", "split": "val"}]
    with pytest.raises(make_splits.SplitError, match="sha256 a is in"):
        make_splits.check_no_leak(rows)
    make_splits.check_no_leak([{"group": "g1", "sha256": "a", "split": "val"}, {"group": "g1", "sha256": "b", "split": "val"}])


def test_writer_refuses_when_a_group_would_cross(sources: list[Path], tmp_path: Path, monkeypatch, capsys):
    original_check = make_splits.check_no_leak

    def check(rows):
        # tamper with one row exactly where a bug would: a copy of r00 in another split
        victim = next(r for r in rows if r["group"] == "srcB:r00_png")
        victim["split"] = "test" if victim["split"] != "test" else "val"
        original_check(rows)

    monkeypatch.setattr(make_splits, "check_no_leak", check)
    out = tmp_path / "out"
    assert run_splits(sources, out) == 2
    err = capsys.readouterr().err
    assert "group srcB:r00_png is in" in err
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_manifest_found_by_stem_after_harmonization(tmp_path: Path):
    imgs = [{"stem": f"s{i}", "group": f"s{i}", "label": i % 2, "seed": 900 + i} for i in range(6)]
    src = write_source(tmp_path / "in" / "h", "h", imgs, image_suffix=".png", manifest_suffix=".jpg")
    (src / "contract.json").write_text(json.dumps({"clahe_clip": 2.0, "max_side": 1024}))
    out = tmp_path / "out"
    assert run_splits([src], out, "--copy") == 0
    rows = read_splits(out)
    assert all(r["path"].endswith(".png") for r in rows) and len(rows) == 6
    assert json.loads((out / "contract.json").read_text())["max_side"] == 1024
    assert not (out / rows[0]["path"]).is_symlink()


def test_label_disagreement_is_an_error(tmp_path: Path, capsys):
    imgs = [{"stem": f"s{i}", "group": f"s{i}", "label": 1, "seed": 950 + i} for i in range(3)]
    src = write_source(tmp_path / "in" / "bad", "bad", imgs)
    (src / "labels" / "s1.txt").write_text("")  # the manifest says positive
    assert run_splits([src], tmp_path / "out") == 2
    assert "disagrees" in capsys.readouterr().err


def test_verify_catches_a_moved_image(sources: list[Path], tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert run_splits(sources, out) == 0
    rows = read_splits(out)
    # move one copy of a 3-copy radiograph to another split, consistently on disk and in the CSV
    victim = next(r for r in rows if r["source"] == "srcB")
    new_split = "test" if victim["split"] != "test" else "val"
    old_path = out / victim["path"]
    victim["path"] = victim["path"].replace(f"images/{victim['split']}/", f"images/{new_split}/")
    (out / "labels" / victim["split"] / (old_path.stem + ".txt")).rename(out / "labels" / new_split / (old_path.stem + ".txt"))
    old_path.rename(out / victim["path"])
    victim["split"] = new_split
    with open(out / "splits.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert make_splits.main(["--verify", str(out)]) == 1
    assert f"group {victim['group']} is in" in capsys.readouterr().err


def test_allocate_ratios():
    assert make_splits.allocate(3, (0.7, 0.15, 0.15)) == (1, 1, 1)
    assert make_splits.allocate(2, (0.7, 0.15, 0.15)) == (2, 0, 0)
    assert make_splits.allocate(100, (0.7, 0.15, 0.15)) == (70, 15, 15)
    assert make_splits.allocate(20, (0.8, 0.2, 0.0)) == (16, 4, 0)


# --------------------------------------------------------------------------- the build driver


def yolo_export(root: Path, n: int = 4) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    (root / "data.yaml").write_text("names: [fracture]\nnc: 1\n")
    for i in range(n):
        (root / "images" / f"im{i}.rf.h{i}.png").write_bytes(tiny_png(4000 + i))
        (root / "labels" / f"im{i}.rf.h{i}.txt").write_text("0 0.5 0.5 0.25 0.25\n" if i % 2 else "")
    return root


def test_build_skips_unlabelled_and_stops_on_unconfigured_labels(tmp_path: Path, capsys):
    data = tmp_path / "data"
    yolo_export(data / "setA")
    (data / "dicoms").mkdir()
    (data / "dicoms" / "x.dcm").write_bytes(b"\0" * 200)
    config = tmp_path / "sources.yaml"
    config.write_text("sources:\n  setA:\n    ingest: yolo\n    classes: all\n    region: hand\n    group: roboflow\n")
    args = ["--data", str(data), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--config", str(config), "--dry-run"]
    assert build_dataset.main(args) == 0
    printed = capsys.readouterr().out
    assert "build   setA" in printed and "skipped dicoms" in printed and "no box labels" in printed
    yolo_export(data / "setB")  # labels, but no entry
    assert build_dataset.main(args) == 2
    err = capsys.readouterr().err
    assert "setB" in err and "add each to configs/sources.yaml" in err
    assert build_dataset.main([*args[:-1], "--out", str(data / "inside")]) == 2  # never writes into DATA
    assert "overlaps the data folder" in capsys.readouterr().err


def test_build_end_to_end(tmp_path: Path, capsys):
    data = tmp_path / "data"
    yolo_export(data / "setA", n=6)
    config = tmp_path / "sources.yaml"
    config.write_text("sources:\n  setA:\n    ingest: yolo\n    classes: [fracture]\n    region: hand\n    group: roboflow\n    empty: negative\n")
    out = tmp_path / "out"
    args = ["--data", str(data), "--out", str(out), "--work", str(tmp_path / "work"), "--config", str(config), "--workers", "1"]
    assert build_dataset.main(args) == 0
    rows = read_splits(out)
    assert len(rows) == 6 and sum(int(r["label"]) for r in rows) == 3
    assert all(r["path"].endswith(".png") for r in rows)
    assert (out / "contract.json").is_file() and (out / "dataset.yaml").is_file()
    info = json.loads((out / "build_info.json").read_text())
    assert info["build"]["built"] == ["setA"] and [s["step"] for s in info["build"]["steps"]] == ["ingest setA", "harmonize setA", "split", "verify"]
    assert build_dataset.main(args) == 2  # OUT is no longer empty
    assert build_dataset.main([*args, "--overwrite"]) == 0


def reoriented(png: bytes, op: str) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    return {"mirror": image[:, ::-1], "rot90": np.rot90(image), "flip-rot270": np.rot90(image[::-1], 3)}[op]


@pytest.mark.parametrize("op", ["mirror", "rot90", "flip-rot270"])
def test_mirrored_or_rotated_copy_joins_its_original_without_moving_anything_else(tmp_path: Path, op: str):
    imgs = [{"stem": f"g{i:02d}", "group": f"g{i:02d}", "label": i % 2, "seed": 900 + i} for i in range(40)]
    src = write_source(tmp_path / "in" / "flip", "flip", imgs)
    plain = tmp_path / "plain"
    assert run_splits([src], plain) == 0  # g33 is an unrelated radiograph here
    before = {r["source_group"]: r["split"] for r in read_splits(plain)}
    # the copy must sit in another split than its original in the plain build, or the test proves nothing
    original = next(g for g in (f"g{i:02d}" for i in range(1, 40, 2)) if before[f"flip:{g}"] != before["flip:g33"])
    cv2.imwrite(str(src / "images" / "g33.png"), reoriented((src / "images" / f"{original}.png").read_bytes(), op))
    out = tmp_path / "out"
    assert run_splits([src], out) == 0
    rows = {r["source_group"]: r for r in read_splits(out)}
    assert rows["flip:g33"]["group"] == rows[f"flip:{original}"]["group"]
    order = ["train", "val", "test"]
    earliest = min(before["flip:g33"], before[f"flip:{original}"], key=order.index)
    assert rows["flip:g33"]["split"] == rows[f"flip:{original}"]["split"] == earliest
    moved = {g for g, r in rows.items() if r["split"] != before[g]}
    assert moved <= {"flip:g33", f"flip:{original}"} and len(moved) == 1  # every other image keeps its split
    info = json.loads((out / "build_info.json").read_text())
    assert info["reoriented_copy_pairs"] == 1 and len(info["moved_by_reoriented_copies"]) == 1
    assert make_splits.main(["--verify", str(out)]) == 0


def test_dihedral_pairs_ignore_look_alikes():
    rng = np.random.default_rng(5)
    base = rng.normal(size=(6, make_splits.THUMB * make_splits.THUMB)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    mirrored = make_splits.dihedral_variants(base[:1])[5]  # one of the 8 orientations of image 0
    prints = np.vstack([base, mirrored])
    assert make_splits.near_duplicate_pairs(prints, 0.96) == []  # as the original check: orientation-blind
    pairs = make_splits.near_duplicate_pairs(prints, 0.96, any_orientation=True)
    assert [(i, j) for i, j, _ in pairs] == [(0, 6)] and pairs[0][2] == pytest.approx(1.0, abs=1e-5)


def test_verify_fingerprints_anew_and_finds_a_mirrored_copy_across_splits(sources: list[Path], tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert run_splits(sources, out) == 0
    rows = read_splits(out)
    train_img = next(r for r in rows if r["split"] == "train" and r["source"] == "srcA")
    victim = next(r for r in rows if r["split"] == "test" and r["source"] == "srcA")
    (out / victim["path"]).unlink()  # a hard link: replace the file, never write through it into the input
    cv2.imwrite(str(out / victim["path"]), reoriented((out / train_img["path"]).read_bytes(), "mirror"))
    victim["sha256"] = make_splits.sha256_file(out / victim["path"])  # splits.csv agrees: only pixels can tell
    with open(out / "splits.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert make_splits.main(["--verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert victim["path"] in err and train_img["path"] in err and "any orientation" in err
