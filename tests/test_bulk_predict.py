"""Bulk prediction: `--shard i/N` partitions a folder exactly, `--resume` continues a killed run without
re-predicting or losing an image, `--workers` decodes ahead without changing a result (bone_r.bulk, inference.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import inference
from bone_r.bulk import Shard, ShardSpecError, parse_shard, prefetch
from bone_r.synthetic import encode, make_dicom, make_phantom
from fakes import write_fake_model

TWO_BOXES = [[0.5, 0.5, 0.2, 0.2, 0.9], [0.3, 0.3, 0.1, 0.1, 0.8]]


@pytest.fixture
def folder(tmp_path) -> Path:
    """11 images in two levels (one DICOM without a suffix) and one that fails to decode."""
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for i in range(8):
        (root / f"im{i:02d}.png").write_bytes(encode(make_phantom(120 + 4 * i, 100, seed=i).pixels, ".png"))
    (root / "sub" / "a.png").write_bytes(encode(make_phantom(90, 80, seed=20).pixels, ".png"))
    (root / "sub" / "b").write_bytes(make_dicom(make_phantom(110, 90, seed=21).pixels))
    (root / "sub" / "c.png").write_bytes(encode(make_phantom(100, 70, seed=22).pixels, ".png"))
    (root / "bad.jpg").write_bytes(b"not a jpeg")
    return root


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "timings_ms"} for r in records]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _count_predictions(monkeypatch) -> list[str]:
    seen: list[str] = []
    original = inference.Predictor.predict_loaded

    def counting(self, loaded, image="", *a, **kw):
        seen.append(image)
        return original(self, loaded, image, *a, **kw)

    monkeypatch.setattr(inference.Predictor, "predict_loaded", counting)
    return seen


@pytest.mark.parametrize("spec,expected", [("0/1", Shard(0, 1)), ("2/3", Shard(2, 3)), (" 0 / 4 ", Shard(0, 4))])
def test_parse_shard(spec, expected):
    assert parse_shard(spec) == expected


@pytest.mark.parametrize("spec", ["3/3", "1/0", "-1/2", "a/b", "1", "1/2/3", "", "0.5/2"])
def test_parse_shard_refuses_bad_specs(spec):
    with pytest.raises(ShardSpecError):
        parse_shard(spec)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 13])
def test_shards_cover_every_item_exactly_once_and_balance(n):
    items = [f"p{i:03d}" for i in range(37)][::-1]  # unsorted input: the partition sorts
    parts = [Shard(i, n).select(items) for i in range(n)]
    flat = [x for part in parts for x in part]
    assert sorted(flat) == sorted(items) and len(flat) == len(set(flat))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == [Shard(i, n).select(sorted(items)) for i in range(n)]  # independent of the listing order


def test_cli_shards_concatenate_to_the_whole_folder(tmp_path, folder):
    weights = write_fake_model(tmp_path / "m", TWO_BOXES)
    assert inference.main(["--image", str(folder), "--weights", str(weights), "--json", str(tmp_path / "all.jsonl"),
                           "--csv", str(tmp_path / "all.csv")]) == 1  # bad.jpg fails in whichever shard has it
    whole = _jsonl(tmp_path / "all.jsonl")
    assert len(whole) == 12
    parts, csv_rows = [], []
    for i in range(3):
        inference.main(["--image", str(folder), "--weights", str(weights), "--shard", f"{i}/3",
                        "--json", str(tmp_path / f"s{i}.jsonl"), "--csv", str(tmp_path / f"s{i}.csv")])
        parts.append(_jsonl(tmp_path / f"s{i}.jsonl"))
        csv_rows += list(csv.DictReader(open(tmp_path / f"s{i}.csv")))
    images = [r["image"] for part in parts for r in part]
    assert sorted(images) == sorted(r["image"] for r in whole) and len(images) == len(set(images)) == 12
    assert [len(p) for p in parts] == [4, 4, 4]
    by_image = {r["image"]: r for r in _strip(whole)}
    assert all(by_image[r["image"]] == r for r in _strip([r for p in parts for r in p]))
    assert sorted(map(tuple, (r.values() for r in csv_rows))) == sorted(
        map(tuple, (r.values() for r in csv.DictReader(open(tmp_path / "all.csv")))))


@pytest.mark.parametrize("spec", ["4/4", "x", "1/0"])
def test_cli_bad_shard_is_a_clear_error(tmp_path, folder, capsys, spec):
    weights = write_fake_model(tmp_path / "m", TWO_BOXES)
    assert inference.main(["--image", str(folder), "--weights", str(weights), "--shard", spec]) == 2
    assert "--shard" in capsys.readouterr().err


def test_cli_resume_needs_an_appendable_output(tmp_path, folder, capsys):
    weights = write_fake_model(tmp_path / "m", TWO_BOXES)
    assert inference.main(["--image", str(folder), "--weights", str(weights), "--resume", "--json", str(tmp_path / "r.json")]) == 2
    assert inference.main(["--image", str(folder), "--weights", str(weights), "--resume"]) == 2
    assert inference.main(["--image", str(folder / "im00.png"), "--weights", str(weights), "--shard", "0/2"]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("tear", ["mid_line", "after_first_csv_row_of_an_image", "jsonl_ahead_of_csv"])
def test_resume_after_a_killed_run_predicts_each_image_once(tmp_path, folder, monkeypatch, tear, capsys):
    weights = write_fake_model(tmp_path / "m", TWO_BOXES)
    js, cs = tmp_path / "r.jsonl", tmp_path / "r.csv"
    args = ["--image", str(folder), "--weights", str(weights), "--json", str(js), "--csv", str(cs)]
    inference.main(args)
    clean_json, clean_csv = js.read_text(), cs.read_text()
    # a run killed during image 6 (of 12): images 0-4 complete, image 5 partly written
    lines, rows = clean_json.splitlines(keepends=True), clean_csv.splitlines(keepends=True)
    assert len(rows) == 1 + 11 * 2 + 1  # header, two boxes per image, one row for bad.jpg
    if tear == "mid_line":
        js.write_text("".join(lines[:5]) + lines[5][:40])
        cs.write_text("".join(rows[: 1 + 2 * 5]) + rows[11][:25])
    elif tear == "after_first_csv_row_of_an_image":  # a newline-terminated but partial image
        js.write_text("".join(lines[:5]))
        cs.write_text("".join(rows[: 1 + 2 * 5 + 1]))
    else:  # killed between the two writes of image 5
        js.write_text("".join(lines[:6]))
        cs.write_text("".join(rows[: 1 + 2 * 5]))
    capsys.readouterr()
    seen = _count_predictions(monkeypatch)
    inference.main([*args, "--resume"])
    assert "5 of 12 image(s) of this shard already done" in capsys.readouterr().out
    assert len(seen) == 7  # bad.jpg sorts first: among the 5 done
    assert _strip(_jsonl(js)) == _strip([json.loads(line) for line in clean_json.splitlines()])
    assert cs.read_text() == clean_csv
    seen.clear()
    inference.main([*args, "--resume"])  # finished: nothing left to do, nothing written
    assert seen == [] and cs.read_text() == clean_csv


def test_resume_refuses_a_file_that_is_not_ours(tmp_path, folder, capsys):
    weights = write_fake_model(tmp_path / "m", TWO_BOXES)
    js = tmp_path / "r.jsonl"
    js.write_text('{"image": "x"}\nnot json\n{"image": "y"}\n')
    assert inference.main(["--image", str(folder), "--weights", str(weights), "--json", str(js), "--resume"]) == 2
    assert "line 2" in capsys.readouterr().err
    assert js.read_text() == '{"image": "x"}\nnot json\n{"image": "y"}\n'  # left as it was


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_workers_give_the_same_records(tmp_path, folder, kind):
    weights = write_fake_model(tmp_path / "m", TWO_BOXES)
    for workers in (0, 3):
        inference.main(["--image", str(folder), "--weights", str(weights), "--json", str(tmp_path / f"w{workers}.jsonl"),
                        "--workers", str(workers), "--worker-kind", kind])
    assert _strip(_jsonl(tmp_path / "w0.jsonl")) == _strip(_jsonl(tmp_path / "w3.jsonl"))


def test_prefetch_keeps_order_bounds_lookahead_and_hands_over_errors():
    import threading
    import time

    started, lock = [], threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        if i == 3:
            raise ValueError("three")
        time.sleep(0.01 * (5 - i % 5))
        return i * i

    consumed = []
    for i, result in prefetch(work, range(10), workers=2):
        with lock:
            assert len(started) <= i + 3  # at most workers + 1 ahead of the consumer
        consumed.append((i, result if not isinstance(result, Exception) else str(result)))
    assert consumed == [(i, "three" if i == 3 else i * i) for i in range(10)]


def test_concatenated_shards_are_read_by_evaluate(tmp_path, folder):
    from bone_r.detection import load_records

    weights = write_fake_model(tmp_path / "m", TWO_BOXES)
    for i in range(2):
        inference.main(["--image", str(folder), "--weights", str(weights), "--shard", f"{i}/2", "--json", str(tmp_path / f"s{i}.jsonl")])
    (tmp_path / "all.jsonl").write_text((tmp_path / "s0.jsonl").read_text() + (tmp_path / "s1.jsonl").read_text())
    records = load_records(tmp_path / "all.jsonl")
    assert len(records) == 12 and len({r["image"] for r in records}) == 12
