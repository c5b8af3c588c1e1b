"""scripts/bench_train.py: the training-step benchmark times each backbone interleaved and reports its parameters."""

from __future__ import annotations

import json

import pytest

from scripts import bench_train


@pytest.fixture(autouse=True)
def _torch_threads(torch_threads):
    yield


def test_reports_each_backbone_against_the_first(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench_train.main(["--backbones", "effnet_lite0_fpn", "effnet_lite2_fpn", "--imgsz", "128", "--batch", "1",
                             "--warmup", "0", "--repeats", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["arch"] == "fasterrcnn" and report["batch"] == 1 and list(report["rows"]) == ["effnet_lite0_fpn",
                                                                                                 "effnet_lite2_fpn"]
    lite0, lite2 = report["rows"]["effnet_lite0_fpn"], report["rows"]["effnet_lite2_fpn"]
    assert lite0["vs_effnet_lite0_fpn"] == 1.0 and lite2["vs_effnet_lite0_fpn"] > 0
    assert all(len(row["step_seconds"]) == 2 and row["s_per_image_median"] > 0 for row in (lite0, lite2))
    # the same heads: Lite2 adds its bigger body and the FPN's 1x1 lateral weights (128 out) for its wider taps
    extra = lite2["parameters"]["total"] - lite0["parameters"]["total"]
    body = lite2["parameters"]["backbone_body"] - lite0["parameters"]["backbone_body"]
    assert body > 1_000_000 and extra == body + 128 * ((48 - 40) + (120 - 112) + (352 - 320))
    # the stem and the stride <= 4 blocks do not train
    assert all(0 < row["parameters"]["trainable"] < row["parameters"]["total"] for row in (lite0, lite2))
    assert bench_train.main(["--imgsz", "100"]) == 2
