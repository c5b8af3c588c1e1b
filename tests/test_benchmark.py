"""benchmark.py: accuracy table through evaluate.py's functions (schema-checked JSON), speed mode, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_evaluate import write_oracle, write_tree

import benchmark as bm
import inference
from bone_r.contract import Contract
from bone_r.image import DEFAULT_MAX_PIXELS
from bone_r.runs import display_path
from fakes import write_fake_model

SCHEMA = Path(__file__).resolve().parents[1] / "docs" / "data" / "benchmark.schema.json"
TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def schema_errors(value, schema, root, path="$") -> list[str]:
    """The subset of JSON Schema that benchmark.schema.json uses (type, required, properties, items, $ref, const, enum, ranges)."""
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return schema_errors(value, target, root, path)
    errors = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]

        def ok(t):
            if t == "integer":
                return isinstance(value, int) and not isinstance(value, bool)
            if t == "number":
                return isinstance(value, (int, float)) and not isinstance(value, bool)
            return isinstance(value, TYPES[t])

        if not any(ok(t) for t in types):
            return [f"{path}: {value!r} is not {types}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: {value!r} != {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} < {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} > {schema['maximum']}")
    if isinstance(value, dict):
        errors += [f"{path}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        for k, sub in schema.get("properties", {}).items():
            if k in value:
                errors += schema_errors(value[k], sub, root, f"{path}.{k}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 1 << 30):
            errors.append(f"{path}: {len(value)} items")
        for i, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), root, f"{path}[{i}]")
    return errors


@pytest.fixture
def oracle_backend(monkeypatch):
    import models

    monkeypatch.setitem(models._REGISTRY, "oracle", "test_evaluate:OracleDetector")


def test_schema_checker_catches_problems():
    schema = json.loads(SCHEMA.read_text())
    assert schema_errors({"schema": "benchmark.schema.json"}, schema, schema)  # required keys missing
    bad = {"schema": "benchmark.schema.json", "generated": "t", "commit": None, "data": "d", "split": "test", "n_images": 1,
           "n_positive": 0, "models": [{"name": "m", "weights": "w", "backend": "b", "map50": 1.5, "map50_95": None,
                                        "balanced": {"threshold": 0.5, "sensitivity": None, "specificity": None},
                                        "ms_per_image": {"median": 1.0, "p90": 2.0}, "params": None, "size_mb": 1.0}]}
    assert any("map50" in e for e in schema_errors(bad, schema, schema))


def test_parse_model_spec():
    assert inference.parse_model_spec("a=weights/x.pt") == inference.ModelSpec("a", Path("weights/x.pt"), None)
    assert inference.parse_model_spec("b=/m/x.bin:fake") == inference.ModelSpec("b", Path("/m/x.bin"), "fake")
    assert inference.parse_model_spec("/m/best.pt") == inference.ModelSpec("best", Path("/m/best.pt"), None)
    assert inference.parse_model_spec("c=/m/odd:name.pt").backend is None  # a colon that names no backend stays in the path
    with pytest.raises(inference.ModelSpecError):
        inference.parse_model_spec("=x.pt")


def test_benchmark_accuracy_two_models(tmp_path, capsys, oracle_backend):
    root = tmp_path / "ds"
    phantoms = write_tree(root)
    oracle = write_oracle(tmp_path / "o", root, phantoms, Contract(), {"backend": "oracle"})  # no thresholds: chosen on val
    # the shared fake backend: one box (in the image centre) with score 0.5 on every image, thresholds frozen in its card
    fake = write_fake_model(tmp_path / "f", [[0.5, 0.5, 0.2, 0.2, 0.5]], thresholds={"balanced": 0.3, "screening": 0.1})
    yml = tmp_path / "models.yaml"
    yml.write_text(json.dumps([{"name": "fake", "weights": str(fake), "backend": "fake"}]))
    out = tmp_path / "bench.json"
    rc = bm.main(["--data", str(root / "dataset.yaml"), "--models", f"oracle={oracle}", "--models-yaml", str(yml),
                  "--n-boot", "100", "--out", str(out), "--quiet"])
    stdout = capsys.readouterr().out
    assert rc == 0
    payload = json.loads(out.read_text())
    schema = json.loads(SCHEMA.read_text())
    assert schema_errors(payload, schema, schema) == []
    rows = {r["name"]: r for r in payload["models"]}
    assert rows["oracle"]["map50"] == pytest.approx((34 + 33 * 0.4) / 101, abs=1e-5)  # the same answer as test_evaluate's
    assert rows["oracle"]["balanced"]["threshold"] == 0.6 and rows["oracle"]["thresholds_source"] == "val"
    assert rows["fake"]["balanced"]["threshold"] == 0.3 and rows["fake"]["thresholds_source"] == "model_card"
    assert rows["fake"]["balanced"]["sensitivity"]["value"] == 1.0 and rows["fake"]["balanced"]["specificity"]["value"] == 0.0
    assert rows["oracle"]["ms_per_image"]["median"] > 0 and rows["oracle"]["ms_per_image"]["n"] == 12
    assert (payload["split"], payload["n_images"], payload["n_positive"]) == ("test", 6, 3)
    assert "oracle" in stdout and "fake" in stdout and "mAP50" in stdout


def test_speed_mode_with_fake_backend(tmp_path, capsys):
    fake = write_fake_model(tmp_path / "f", [[0.5, 0.5, 0.2, 0.2, 0.9]])
    mirrored = write_fake_model(tmp_path / "g", [[0.5, 0.5, 0.2, 0.2, 0.9]])
    card = mirrored.with_name("fake.json")
    card.write_text(json.dumps(json.loads(card.read_text()) | {"tta": "hflip"}))
    out = tmp_path / "speed.json"
    rc = bm.main(["--speed", "--models", f"f={fake}:fake", f"g={mirrored}:fake", "--n", "2", "--size", "64x80", "--warmup",
                  "1", "--threads", "1", "--json", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0
    payload = json.loads(out.read_text())
    assert payload["images"]["n"] == 2 and payload["images"]["sizes_wh"] == [[64, 80]]
    row = payload["models"][0]
    for stage in ("decode", "harmonize", "model", "post", "end_to_end"):
        assert set(row["stages_ms"][stage]) == {"median", "p90"} and row["stages_ms"][stage]["median"] >= 0
    assert row["stages_ms"]["n"] == 2 and "plain_ultralytics_ms" not in row and payload["baseline"] is None
    assert [r["backend"] for r in payload["models"]] == ["fake", "fake + mirror"]  # the card's tta, named
    assert "end-to-end" in stdout


class TimedPredictor:
    """Stands in for inference.Predictor in time_pipeline: reports known stage timings, model_ms 7, 3, 10, 1, ... in turn."""

    max_pixels = DEFAULT_MAX_PIXELS
    MODEL_MS = [7.0, 3.0, 10.0, 1.0, 9.0, 2.0, 8.0, 4.0, 6.0, 5.0]

    def __init__(self):
        self.calls = 0

    def predict(self, path):  # the warm-up: not timed
        pass

    def predict_loaded(self, loaded, image):
        model_ms = self.MODEL_MS[self.calls]
        self.calls += 1
        return SimpleNamespace(timings_ms={"harmonize_ms": 10 * model_ms, "model_ms": model_ms, "post_ms": 0.25})


def test_speed_median_and_p90_on_known_timings(tmp_path):
    images = bm.write_phantoms(tmp_path, 2, 32, 40)
    stages = bm.time_pipeline(TimedPredictor(), images, warmup=1, repeats=5)
    # 1..10 ms: median (5 + 6) / 2; p90 the sorted value at index round(0.9 * 9) = 8, i.e. 9 (numpy's linear p90 is 9.1)
    assert stages["model"] == {"median": 5.5, "p90": 9.0}
    assert stages["harmonize"] == {"median": 55.0, "p90": 90.0} and stages["post"] == {"median": 0.25, "p90": 0.25}
    assert stages["n"] == 10 and stages["end_to_end"]["median"] > 0
    assert bm._stats([4.0, 2.0, 3.0, 100.0, 1.0]) == {"median": 3.0, "p90": 100.0}  # round(0.9 * 4) = 4: the largest
    assert bm._stats([]) == {"median": None, "p90": None}


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert bm.main(["--data", "x.yaml"]) == 2
    assert "no models" in capsys.readouterr().err
    assert bm.main(["--data", "x.yaml", "--models", f"a={tmp_path / 'none.pt'}"]) == 2
    err = capsys.readouterr().err
    assert "weights not found" in err and err.count("\n") == 1
    fake = write_fake_model(tmp_path / "f", [[0.5, 0.5, 0.2, 0.2, 0.9]])
    assert bm.main(["--models", f"a={fake}:fake"]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert bm.main(["--models", f"a={fake}:fake", f"a={fake}:fake", "--speed"]) == 2
    assert "unique" in capsys.readouterr().err
    assert bm.main(["--data", str(tmp_path / "missing.yaml"), "--models", f"a={fake}:fake"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_speed_mode_plain_ultralytics_baseline(tmp_path):
    import glob

    import yaml
    from ultralytics import YOLO
    from ultralytics.utils import ROOT as UL_ROOT

    cfg = yaml.safe_load(Path(glob.glob(str(UL_ROOT / "cfg/models/v8/yolov8.yaml"))[0]).read_text())
    cfg["nc"], cfg["scales"] = 1, {"n": cfg["scales"]["n"]}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    YOLO(str(tmp_path / "tiny.yaml"), task="detect").save(str(tmp_path / "tiny.pt"))  # untrained, no download
    (tmp_path / "tiny.json").write_text(json.dumps({"backend": "yolo", "imgsz": 128}))
    images = bm.write_phantoms(tmp_path / "img", 2, 96, 120)
    payload = bm.speed([inference.ModelSpec("pt", tmp_path / "tiny.pt")], images, warmup=1, threads=1)
    row = payload["models"][0]
    assert row["backend"] == "yolo:tiny"
    assert row["plain_ultralytics_ms"]["imgsz"] == 128 and row["plain_ultralytics_ms"]["end_to_end"]["median"] > 0
    assert row["speedup_vs_plain_pytorch"] > 0 and payload["baseline"]["model"] == "pt"


def test_benchmark_from_cards_uses_evaluates_numbers_and_checks_the_dataset(tmp_path, capsys, oracle_backend):
    import evaluate

    root = tmp_path / "ds"
    phantoms = write_tree(root)
    oracle = write_oracle(tmp_path / "o", root, phantoms, Contract(), {"backend": "oracle"})
    out = tmp_path / "bench.json"
    args = ["--data", str(root / "dataset.yaml"), "--models", f"oracle={oracle}", "--out", str(out), "--quiet", "--from-cards"]
    assert bm.main(args) == 2  # no metrics in the card yet
    assert "evaluate.py --weights" in capsys.readouterr().err
    assert evaluate.main(["--weights", str(oracle), "--data", str(root / "dataset.yaml"), "--write-card", "--n-boot", "50",
                          "--no-plots", "--quiet", "--out", str(tmp_path / "report.json")]) == 0
    assert bm.main(args) == 0
    payload = json.loads(out.read_text())
    schema = json.loads(SCHEMA.read_text())
    assert schema_errors(payload, schema, schema) == []
    row = payload["models"][0]
    assert row["map50"] == pytest.approx((34 + 33 * 0.4) / 101, abs=1e-5)  # evaluate's number, carried over
    assert row["thresholds_source"] == "model_card" and row["ms_per_image"]["median"] is None
    assert payload["bootstrap"]["n_boot"] == 50 and (payload["n_images"], payload["n_positive"]) == (6, 3)
    # ms/image from a speed run of the same weights file; a speed run of other weights is an error
    stage = {"median": 12.5, "p90": 14.0}
    speed = {"commit": "abc", "machine": {"threads": 2}, "images": {"n": 4, "sizes_wh": [[200, 250]]},
             "models": [{"name": "x", "weights": display_path(oracle), "stages_ms": {"end_to_end": stage, "n": 4}}]}
    (tmp_path / "speed.json").write_text(json.dumps(speed))
    assert bm.main([*args, "--speed-json", str(tmp_path / "speed.json")]) == 0
    ms = json.loads(out.read_text())["models"][0]["ms_per_image"]
    assert (ms["median"], ms["p90"], ms["n"]) == (12.5, 14.0, 4) and "2 thread(s)" in ms["what"]
    speed["models"][0]["weights"] = "elsewhere.onnx"
    (tmp_path / "speed.json").write_text(json.dumps(speed))
    assert bm.main([*args, "--speed-json", str(tmp_path / "speed.json")]) == 2
    assert "times none of these weights" in capsys.readouterr().err
    # another dataset (a changed splits.csv) is refused, not mixed in
    with open(root / "splits.csv", "a") as fh:
        fh.write("\n")
    assert bm.main(args) == 2
    assert "not 'test' of this one" in capsys.readouterr().err
