"""scripts/bench_scale.py: the throughput, decoder and reduced-decoding benchmarks run and report what they measured."""

from __future__ import annotations

import json

from bone_r.synthetic import encode, make_dicom, make_phantom, to_8bit
from fakes import write_fake_model
from scripts import bench_scale


def test_predict_reports_each_backend_and_worker_count(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(encode(make_phantom(120, 100, seed=i).pixels, ".png"))
    weights = write_fake_model(tmp_path / "m", [[0.5, 0.5, 0.2, 0.2, 0.9]])
    assert bench_scale.main(["predict", "--images", str(folder), "--weights", str(weights), "--n", "3", "--repeats", "2",
                             "--workers", "0,2", "--process-workers", "", "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n"] == 3 and set(report["rows"]) == {"weights thread workers=0", "weights thread workers=2"}
    assert all(len(r["runs"]) == 2 and r["images_per_s_median"] > 0 for r in report["rows"].values())


def test_decoders_and_reduced_on_synthetic_files(tmp_path, capsys):
    folder = tmp_path / "dcm"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(make_dicom(make_phantom(1100, 900, seed=1).pixels, compress="jpeg2000"))
    (folder / "b.jpg").write_bytes(encode(to_8bit(make_phantom(1100, 900, seed=2).pixels), ".jpg"))
    assert bench_scale.main(["decoders", "--dicom", str(folder), "--repeats", "1", "--out", str(tmp_path / "d.json")]) == 0
    row = json.loads((tmp_path / "d.json").read_text())["rows"][0]
    assert row["decoders"]["pylibjpeg"]["identical"] is True and row["fastest_identical"] in row["decoders"]
    assert bench_scale.main(["reduced", "--dicom", str(folder), "--jpegs", str(folder), "--side", "256", "--repeats", "1",
                             "--out", str(tmp_path / "r.json")]) == 0
    groups = json.loads((tmp_path / "r.json").read_text())["groups"]
    assert groups["dicom"]["reduced_files"] == 1 and groups["jpeg"]["per_file"][0]["reduced"] == 4
    assert bench_scale.main(["reduced", "--jpegs", str(tmp_path / "missing")]) == 2


def test_shards_report_exact_cover(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i in range(10):
        (folder / ("sub" if i % 3 else ".") / f"{i}.png").write_bytes(b"x")
    (folder / "dangling.png").symlink_to(tmp_path / "missing.png")  # unreadable entries are sharded too
    assert bench_scale.main(["shards", "--images", str(folder), "--counts", "1", "3", "4", "--out", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["shards"]
    assert all(r["in_shards"] == r["distinct"] == 11 and r["equals_folder"] for r in rows.values())
    assert (rows["4"]["smallest"], rows["4"]["largest"]) == (2, 3)
    assert bench_scale.main(["shards", "--images", str(folder), "--counts", "0"]) == 2
