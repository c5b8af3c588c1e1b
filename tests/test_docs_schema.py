"""docs/data/*.json against their JSON schemas; the demo generator; the bundle for pages opened from disk."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from bone_r.card import card_path_for, load_model_card
from bone_r.dataset import GroundTruth, GTImage
from bone_r.detection import ImagePrediction
from bone_r.metrics import box_iou, evaluate_predictions
from bone_r.modes import resolve_threshold
from bone_r.runs import sha256_file
from bone_r.site import site_payload

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "data"
SCHEMAS = {"cases.json": "cases.schema.json", "predictions.json": "predictions.schema.json", "benchmark.json": "benchmark.schema.json",
           "report.json": "report.schema.json"}
# The only radiographs the repository may hold: downscaled copies of CC BY 4.0 test images (scripts/make_site_cases.py).
CASE_SOURCES = {"fracatlas", "proximal-femur", "science-research-2022"}
REGENERATE = "python -m scripts.make_site_cases"


def validator(schema_name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((DATA / schema_name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def errors(schema_name: str, payload) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(schema_name).iter_errors(payload)]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_committed_site_data_matches_its_schema(name):
    path = DATA / name
    assert path.is_file(), f"{path} is missing: python scripts/make_demo_docs.py writes the demo"
    assert errors(SCHEMAS[name], json.loads(path.read_text())) == []


def test_images_the_viewer_names_exist_and_are_small():
    payload = json.loads((DATA / "predictions.json").read_text())
    for image in payload["images"]:
        path = DATA / image["src"]
        if image["src"].startswith("local-"):
            continue  # compare_overlay's copies of real images are git-ignored on purpose
        assert path.is_file(), f"{image['src']} named in predictions.json is not in docs/data"
    committed = [p for p in DATA.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")
                 and not p.name.startswith(("local-", "case-"))]
    assert sum(p.stat().st_size for p in committed) < 400_000


def cases() -> dict:
    return json.loads((DATA / "cases.json").read_text())


def test_the_case_images_are_the_curated_downscaled_credited_set():
    """Every case-*.jpg is named by cases.json (nothing else is there), a grayscale JPEG of at most 1024 px, all <= 6 MB,
    from a CC BY 4.0 source whose credit line goes with it."""
    import cv2

    payload = cases()
    named = {im["src"] for im in payload["images"]}
    on_disk = {p.name for p in DATA.glob("case-*")}
    assert on_disk == named, f"docs/data holds case images cases.json does not name, or lacks some: rerun {REGENERATE}"
    assert 8 <= len(named) <= 16
    total = 0
    for im in payload["images"]:
        data = (DATA / im["src"]).read_bytes()
        total += len(data)
        assert data[:3] == b"\xff\xd8\xff" and len(data) == im["bytes"], im["src"]
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert pixels.ndim == 2 and max(pixels.shape) <= 1024, im["src"]
        assert (pixels.shape[1], pixels.shape[0]) == (im["display_width"], im["display_height"])
        assert im["source"] in CASE_SOURCES and payload["sources"][im["source"]]["licence"] == "CC BY 4.0"
    assert total == payload["images_total_bytes"] <= 6_000_000
    credits = (DATA / "cases-credits.txt").read_text()
    assert all(name in credits for name in named)


def test_the_cases_show_the_bundled_model_with_its_errors():
    """cases.json is the bundled model's output (regenerate it after replacing the model), stratified, with both
    kinds of error in it, and its decisions follow from its own boxes and thresholds."""
    import inference

    payload = cases()
    weights = inference.default_weights()
    assert payload["model"]["sha256"] == sha256_file(weights), (
        f"docs/data/cases.json was made with another model than {weights.name}: rerun {REGENERATE}")
    assert payload["model"]["card_sha256"] == sha256_file(card_path_for(weights)), (
        f"the model card changed (thresholds, box rule) since docs/data/cases.json was made: rerun {REGENERATE}")
    card = load_model_card(weights)
    for mode in payload["modes"]:
        assert payload["modes"][mode]["threshold"] == pytest.approx(resolve_threshold(mode, card)[0], abs=1e-6)
    assert {im["source"] for im in payload["images"]} <= CASE_SOURCES
    assert len({(im["source"], im["region"], im["label"]) for im in payload["images"]}) >= 8
    bal = payload["summary"]["balanced"]
    assert bal["FN"] >= 1 and bal["FP"] >= 1 and bal["TP"] >= 1, "the cases should include misses and false alarms"
    for im in payload["images"]:
        for mode, dec in im["decisions"].items():
            t = payload["modes"][mode]["threshold"]
            shown = [d for d in im["detections"] if d["score"] >= t]
            assert dec["threshold"] == t and dec["boxes"] == len(shown) and dec["flagged"] == bool(shown)
            assert dec["hits"] + dec["false_boxes"] == len(shown) and dec["hits"] == sum(d["match"] is not None for d in shown)
            assert dec["outcome"] == (("TP" if shown else "FN") if im["label"] else ("FP" if shown else "TN"))
            assert dec["truth_found"] == [g["found_score"] is not None and g["found_score"] >= t for g in im["ground_truth"]]
        assert all(d["score"] >= payload["min_score"] for d in im["detections"])


def test_bundle_is_a_copy_of_the_json_files():
    """Pages opened from disk read data/bundle.js; it must hold what data/*.json hold."""
    text = (DATA / "bundle.js").read_text()
    match = re.search(r"window\.BONER_SITE_DATA = (\{.*\});\s*$", text, re.S)
    assert match, "bundle.js does not have the expected form"
    files = json.loads(match.group(1).replace("<\\/", "</"))["files"]
    for name in SCHEMAS:
        assert files.get(name) == json.loads((DATA / name).read_text()), (
            f"docs/data/bundle.js is stale for {name}: run python scripts/make_demo_docs.py --bundle-only")


def test_demo_generator_is_deterministic_and_valid(tmp_path):
    from scripts import make_demo_docs

    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert make_demo_docs.main(["--out", str(out), "--n-boot", "50"]) == 0
    names = sorted(p.name for p in a.iterdir())
    assert names == ["benchmark.json", "bundle.js", "phantom-fractured.png", "phantom-intact.png", "predictions.json", "report.json"]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name, schema in SCHEMAS.items():
        if name == "cases.json":
            continue  # real cases only (scripts/make_site_cases.py): the demo has none
        payload = json.loads((a / name).read_text())
        assert errors(schema, payload) == []
        assert payload["synthetic"] is True
    # the demo's boxes include the phantom's known box, found by the demo models
    pred = json.loads((a / "predictions.json").read_text())
    fractured = pred["images"][0]
    assert fractured["ground_truth"] and all("(synthetic)" in m["name"] for m in pred["models"])
    truth = np.array(fractured["ground_truth"][0]["xyxy"])
    best = max(fractured["detections"], key=lambda d: d["score"])
    assert box_iou(np.array(best["xyxy"]), truth)[0, 0] > 0.7


def test_demo_generator_keeps_real_output(tmp_path, capsys):
    from scripts import make_demo_docs

    real = {"schema": "benchmark.schema.json", "models": []}
    (tmp_path / "benchmark.json").write_text(json.dumps(real))
    assert make_demo_docs.main(["--out", str(tmp_path), "--n-boot", "0"]) == 0
    assert json.loads((tmp_path / "benchmark.json").read_text()) == real
    assert "kept" in capsys.readouterr().out
    assert make_demo_docs.main(["--out", str(tmp_path), "--n-boot", "0", "--force"]) == 0
    assert json.loads((tmp_path / "benchmark.json").read_text())["synthetic"] is True


def test_an_evaluate_report_is_what_the_site_reads():
    """evaluate_predictions' output (the report evaluate.py --out writes) passes report.schema.json."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(12):
        boxes = np.array([[10, 10, 40, 30]], float) if i % 2 == 0 else np.zeros((0, 4))
        images.append(GTImage(Path(f"/x/{i}.png"), f"{i}.png", 100, 80, boxes, int(i % 2 == 0), ["a", "b"][i % 3 % 2],
                                       ["hand", "hip", "leg"][i % 3], str(i)))
    gt = GroundTruth(images, "test", "d.yaml")
    preds = [ImagePrediction(np.array([[12, 11, 41, 31]], float), np.array([rng.uniform(0.3, 1.0) if i % 2 == 0 else rng.uniform(0, 0.6)]))
             for i in range(12)]
    report = evaluate_predictions(gt, preds, {"balanced": 0.5, "screening": 0.2, "specific": 0.8}, n_boot=20)
    assert errors("report.schema.json", json.loads(json.dumps(report))) == []
    assert len(report["box"]["map50_interval"]["ci"]) == 2  # the site shows it beside mAP@0.5
    broken = json.loads(json.dumps(report))
    broken["by_source"]["a"]["box"]["map50_interval"] = {"ci": [0.2]}
    assert errors("report.schema.json", broken)


def test_compare_overlay_output_matches_the_schema():
    payload = site_payload(
        [{"name": "m", "color": "#e69f00", "threshold": 0.3, "threshold_source": "model_card", "mode": "balanced", "description": ""}],
        [{"id": "x", "src": "local-x.png", "width": 10, "height": 10, "caption": "x",
          "detections": [{"xyxy": [1, 1, 5, 5], "score": 0.5, "label": "fracture", "model": "m"}]}],
        generator="test", synthetic=False)
    assert errors("predictions.schema.json", payload) == []


@pytest.mark.parametrize("breakage", [
    ("src", "../case-x.jpg"), ("src", "case-x.png"), ("url", "javascript:alert(1)"), ("url", "http://example.org"),
    ("licence", "CC BY-NC 4.0"), ("synthetic", True), ("total", 7_000_000), ("display_width", 2000),
])
def test_cases_schema_rejects_what_the_site_must_not_get(breakage):
    bad = copy.deepcopy(cases())
    key, value = breakage
    if key in ("src", "display_width"):
        bad["images"][0][key] = value
    elif key in ("url", "licence"):
        next(iter(bad["sources"].values()))[key] = value
    elif key == "total":
        bad["images_total_bytes"] = value
    else:
        bad[key] = value
    assert errors("cases.schema.json", bad) != []


@pytest.mark.parametrize("breakage", [
    ("src", "../../etc/passwd.png"), ("src", "javascript:alert(1)"), ("src", "https://example.org/x.png"),
    ("color", "red; background:url(x)"), ("score", 1.5), ("xyxy", [1, 2, 3]), ("format", "other/1"),
])
def test_schema_rejects_what_the_site_must_not_get(breakage):
    payload = json.loads((DATA / "predictions.json").read_text())
    bad = copy.deepcopy(payload)
    key, value = breakage
    if key == "src":
        bad["images"][0]["src"] = value
    elif key == "color":
        bad["models"][0]["color"] = value
    elif key in ("score", "xyxy"):
        bad["images"][0]["detections"][0][key] = value
    else:
        bad[key] = value
    assert errors("predictions.schema.json", bad) != []
