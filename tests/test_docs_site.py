"""The docs site in headless Chromium (Debian `chromium` driven by Playwright; no browser download).

The page is served from a temporary copy of docs/ whose data/ is the deterministic
synthetic demo (scripts/make_demo_docs.py), so the expected box counts are known:
on the fractured phantom the demo models have 9 boxes, 4 of them >= 0.25 (the
lowest model threshold, where the slider starts): yolo 0.87 and 0.41, wbf 0.765,
fcos 0.66. Screenshots go to tests/.artifacts/ (git-ignored).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from bone_r.modes import MODES

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / ".artifacts"
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
YOLO_ORANGE = (230, 159, 0)

pytestmark = pytest.mark.browser


def browser_required() -> bool:
    """CI (or BONE_R_REQUIRE_BROWSER=1, which .ci/run sets) must run these tests; a developer may skip them."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false") or os.environ.get("BONE_R_REQUIRE_BROWSER") == "1"


def no_browser(reason: str):
    if browser_required():
        pytest.fail(f"{reason} (a browser is required here: CI or BONE_R_REQUIRE_BROWSER=1 is set)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        no_browser("Debian chromium is not installed (/usr/bin/chromium); .ci/run installs it: apt-get install -y chromium")
    try:
        from playwright import sync_api
    except ImportError:
        no_browser("playwright (requirements.txt) is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A copy of docs/ with the synthetic demo data regenerated into it."""
    from scripts import make_demo_docs

    root = tmp_path_factory.mktemp("site")
    for item in (ROOT / "docs").iterdir():
        if item.is_file():
            shutil.copy(item, root / item.name)
    (root / "data").mkdir()
    shutil.copy(ROOT / "docs" / "data" / "benchmark.schema.json", root / "data")
    assert make_demo_docs.main(["--out", str(root / "data"), "--n-boot", "50"]) == 0
    return root


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(site):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


# A site without real cases (the demo) answers 404 for data/cases.json: expected; any other 404 is a problem.
MAY_BE_MISSING = ("/data/cases.json",)


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    problems = []

    def console(m):
        if m.type in ("error", "warning") and not m.text.startswith("Failed to load resource: the server responded with a status of 404"):
            problems.append(f"console {m.type}: {m.text}")

    page.on("console", console)
    page.on("response", lambda r: problems.append(f"HTTP 404: {r.url}") if r.status == 404 and not r.url.endswith(MAY_BE_MISSING) else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(url)
    page.wait_for_selector("body[data-ready='true']", timeout=10_000)
    # the first image is drawn once it has loaded (its caption is set and the canvas counts boxes)
    page.wait_for_function("document.getElementById('overlay-canvas').dataset.boxes !== undefined && "
                           "window.BoneR.state.image && window.BoneR.state.image !== 'missing'", timeout=10_000)
    return page, problems


def drawn(page) -> int:
    return int(page.eval_on_selector("#overlay-canvas", "c => c.dataset.boxes"))


def colour_pixels(page, rgb) -> int:
    """Canvas pixels within 12 levels of `rgb` (what is really drawn, not what the code says it drew)."""
    return page.evaluate("""([r, g, b]) => {
        const c = document.getElementById('overlay-canvas');
        const copy = document.createElement('canvas');  // read from a copy: no readback warning on the page's canvas
        copy.width = c.width;
        copy.height = c.height;
        const cctx = copy.getContext('2d', { willReadFrequently: true });
        cctx.drawImage(c, 0, 0);
        const d = cctx.getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) {
            if (Math.abs(d[i] - r) < 12 && Math.abs(d[i + 1] - g) < 12 && Math.abs(d[i + 2] - b) < 12) n++;
        }
        return n;
    }""", list(rgb))


def test_viewer_toggles_slider_details_and_tables(browser, server):
    page, problems = open_page(browser, f"{server}/index.html")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        assert drawn(page) == 4
        assert page.text_content("#box-count").startswith("4 of 9")
        orange_before = colour_pixels(page, YOLO_ORANGE)
        assert orange_before > 100  # the yolo boxes are on the canvas

        # switch the yolo model off: its two boxes (0.87, 0.41) go, and so does its colour
        page.get_by_label("demo-yolo (synthetic) (threshold 0.30)").uncheck()
        assert drawn(page) == 2
        assert colour_pixels(page, YOLO_ORANGE) < orange_before / 20

        # the slider, by keyboard: 0.25 -> 0.70 leaves only wbf 0.765
        slider = page.locator("#min-score")
        slider.focus()
        for _ in range(45):
            page.keyboard.press("ArrowRight")
        assert page.text_content("#min-score-value") == "0.70"
        assert drawn(page) == 1
        page.get_by_label("demo-yolo (synthetic) (threshold 0.30)").check()
        assert drawn(page) == 2  # + yolo 0.87
        slider.focus()
        page.keyboard.press("Home")
        assert drawn(page) == 9 and page.text_content("#min-score-value") == "0.00"
        page.keyboard.press("End")
        assert drawn(page) == 0

        # back to 0.25, then the details of a box chosen from the list with the keyboard
        slider.fill("0.25")
        assert drawn(page) == 4
        first = page.locator("#det-list button").first
        first.focus()
        page.keyboard.press("Enter")
        details = page.text_content("#det-details")
        assert "demo-yolo (synthetic)" in details and "0.870" in details and "best guess" in details.lower()
        assert first.get_attribute("aria-pressed") == "true"
        page.keyboard.press("Escape")
        assert "No box chosen" in page.text_content("#det-details")

        # hover: the yolo false positive at (200, 60)-(250, 100) of the 320x400 phantom
        box = page.locator("#overlay-canvas").bounding_box()
        page.mouse.move(box["x"] + 225 / 320 * box["width"], box["y"] + 80 / 400 * box["height"])
        assert "0.410" in page.text_content("#det-details")

        # the second image: the intact phantom, 3 of its 7 boxes >= 0.25 (fcos 0.46, wbf 0.40, yolo 0.34)
        page.select_option("#image-select", index=1)
        page.wait_for_function("window.BoneR.state.index === 1 && window.BoneR.state.image && window.BoneR.state.image.complete")
        assert drawn(page) == 3

        # benchmark table, per-source/per-region tables and both curves
        assert page.locator("#benchmark-table tbody tr").count() == 3
        assert "demo-wbf (synthetic)" in page.text_content("#benchmark-table")
        assert page.locator("#by-source tbody tr").count() == 3
        assert page.locator("#by-region tbody tr").count() == 5
        sizes = page.locator("#by-fracture-size tbody tr")  # 3 demo sources x 3 thirds, the source named once
        assert sizes.count() == 9 and sizes.nth(0).locator("th").text_content() == "demo-atlas"
        assert sizes.nth(1).locator("th").text_content() == "" and "smallest" in sizes.nth(0).text_content()
        assert page.locator("#pr-plot svg path").count() == 2 and page.locator("#froc-plot svg path").count() == 1
        # static copy: the upload form stays off and says why
        assert page.locator("#upload-button").is_disabled()
        assert "make serve" in page.text_content("#service-status")

        page.select_option("#image-select", index=0)
        page.wait_for_function("window.BoneR.state.index === 0 && window.BoneR.state.image && window.BoneR.state.image.complete")
        page.locator("#viewer").screenshot(path=str(ARTIFACTS / "docs_viewer.png"))
        page.screenshot(path=str(ARTIFACTS / "docs_site_full.png"), full_page=True)
    finally:
        page.close()
    assert problems == []


def test_page_opened_from_disk_uses_the_bundle(browser, site):
    page, problems = open_page(browser, (site / "index.html").as_uri())
    try:
        assert drawn(page) == 4
        assert "bundle.js" in page.text_content("#data-status")
        assert page.locator("#benchmark-table tbody tr").count() == 3
    finally:
        page.close()
    assert problems == []


def test_json_goes_in_as_text_never_as_html(browser, site, tmp_path):
    evil = tmp_path / "evil"
    shutil.copytree(site, evil)
    payload = json.loads((evil / "data" / "predictions.json").read_text())
    attack = '<img src=x onerror="window.__pwned = 1">'
    payload["images"][0]["caption"] = attack
    payload["models"][0]["name"] = attack
    for det in payload["images"][0]["detections"]:
        if det["model"] == "demo-yolo (synthetic)":
            det["model"] = attack
    (evil / "data" / "predictions.json").write_text(json.dumps(payload))
    (evil / "data" / "bundle.js").unlink()  # served over HTTP: the JSON itself is read
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(evil)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        page, problems = open_page(browser, f"http://127.0.0.1:{httpd.server_address[1]}/index.html")
        try:
            page.wait_for_timeout(200)
            assert page.evaluate("window.__pwned") is None
            assert page.locator("img[src='x']").count() == 0
            assert attack in page.text_content("#image-caption")
            assert attack in page.text_content("#model-toggles")
            assert drawn(page) == 4
        finally:
            page.close()
        assert problems == []
    finally:
        httpd.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def service(site):
    """The real FastAPI app (app/main.py) serving the site copy, with a fake detector."""
    import uvicorn

    import inference
    from app.main import Settings, create_app
    from fakes import FakeDetector

    boxes = [[0.5, 0.4, 0.3, 0.1, 0.9], [0.3, 0.7, 0.2, 0.1, 0.6], [0.7, 0.2, 0.1, 0.1, 0.2]]
    card = {"name": "fake", "classes": ["fracture"], "thresholds": {m: {"threshold": 0.5} for m in MODES}}
    predictor = inference.Predictor(detector=FakeDetector(None, boxes=boxes), card=card)
    app = create_app(Settings(docs_dir=site, warmup=False), predictor=predictor)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "the service did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def test_upload_form_under_the_service_draws_the_returned_boxes(browser, service, tmp_path):
    import cv2

    from bone_r.synthetic import make_phantom

    image = tmp_path / "upload.png"
    cv2.imwrite(str(image), make_phantom(300, 240, seed=2, bits=8).pixels)
    page, problems = open_page(browser, f"{service}/")
    try:
        page.wait_for_function("!document.getElementById('upload-button').disabled", timeout=10_000)
        assert "Connected to the Bone-R service" in page.text_content("#service-status")
        page.set_input_files("#file", str(image))
        page.select_option("#mode", "balanced")
        page.click("#upload-button")
        page.wait_for_function("window.BoneR.state.scenes.length === 3 && window.BoneR.state.index === 2", timeout=10_000)
        # the fake returns 0.9 and 0.6 at the card's balanced threshold 0.5 (0.2 is below it)
        page.locator("#min-score").fill("0")
        assert drawn(page) == 2
        assert "Possible fracture flagged" in page.text_content("#result")
        assert "uploaded upload.png" in page.text_content("#image-caption")
        page.locator("#viewer").screenshot(path=str(ARTIFACTS / "docs_upload.png"))
    finally:
        page.close()
    assert problems == []


# --------------------------------------------------------------------------- the real cases (docs/data/cases.json)


@pytest.fixture(scope="module")
def real_server():
    """docs/ as committed: the real cases (python -m scripts.make_site_cases) and the rest of the site data."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(ROOT / "docs")))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def real_cases() -> dict:
    return json.loads((ROOT / "docs" / "data" / "cases.json").read_text())


def show_case(page, index: int) -> None:
    page.select_option("#image-select", index=index)
    page.wait_for_function(f"window.BoneR.state.index === {index} && window.BoneR.state.image && "
                           "window.BoneR.state.image !== 'missing' && window.BoneR.state.image.complete", timeout=10_000)


def canvas_state(page) -> dict:
    return page.eval_on_selector("#overlay-canvas", "c => Object.assign({}, c.dataset)")


def test_viewer_shows_the_real_cases_and_mode_changes_what_is_drawn(browser, real_server):
    payload = real_cases()
    images = payload["images"]
    page, problems = open_page(browser, f"{real_server}/index.html")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        # the real set, not the synthetic demo: one option per case, each a real JPEG of the size recorded
        assert page.locator("#image-select option").count() == len(images)
        assert page.evaluate("window.BoneR.state.scenes.every(s => s.kind === 'case' && !s.synthetic)")
        assert page.evaluate("window.BoneR.state.image.naturalWidth") == images[0]["display_width"]
        assert "synthetic" not in page.text_content("#viewer-note").lower()
        assert "seeded" in page.text_content("#viewer-note")
        # the bundle predicts with its mirror (its card's tta): the page says so
        assert payload["model"]["tta"] == "hflip" and "predicted as it is and mirrored" in page.text_content("#viewer-note")
        # balanced is the starting mode; the three modes are offered with the card's thresholds
        assert page.is_checked("#mode-balanced") and page.locator("#mode-picker input").count() == 3
        # every case, every mode: what is drawn is what cases.json decided
        for i, im in enumerate(images):
            show_case(page, i)
            credit = payload["sources"][im["source"]]
            assert credit["title"] in page.text_content("#image-credit") and "CC BY 4.0" in page.text_content("#image-credit")
            for mode in ("screening", "balanced", "specific"):
                page.check(f"#mode-{mode}")
                dec = im["decisions"][mode]
                state = canvas_state(page)
                assert int(state["boxes"]) == dec["boxes"], (im["id"], mode)
                assert int(state["hits"]) == dec["hits"] and int(state["falseBoxes"]) == dec["false_boxes"], (im["id"], mode)
                assert int(state["truth"]) == len(im["ground_truth"])
                assert int(state["missed"]) == dec["truth_found"].count(False), (im["id"], mode)
                row = page.locator("#case-decisions tr.current")
                assert row.get_attribute("data-mode") == mode and row.get_attribute("data-outcome") == dec["outcome"]
        # changing mode changes the picture: the case whose box count differs most between screening and specific
        k = max(range(len(images)), key=lambda j: images[j]["decisions"]["screening"]["boxes"] - images[j]["decisions"]["specific"]["boxes"])
        assert images[k]["decisions"]["screening"]["boxes"] > images[k]["decisions"]["specific"]["boxes"]
        show_case(page, k)
        page.check("#mode-screening")
        screening = page.evaluate("document.getElementById('overlay-canvas').toDataURL()")
        page.locator("#viewer").screenshot(path=str(ARTIFACTS / "docs_real_screening.png"))
        page.check("#mode-specific")
        assert page.evaluate("document.getElementById('overlay-canvas').toDataURL()") != screening
        page.locator("#viewer").screenshot(path=str(ARTIFACTS / "docs_real_specific.png"))
        # the slider leaves the modes: its own threshold gets its own row
        page.locator("#min-score").fill("0.5")
        assert not page.is_checked("#mode-specific") and page.locator("#case-decisions tr.current").get_attribute("data-mode") == "this threshold"
        # toggles: the truth (and the markings) off, then the model's boxes off
        page.check("#mode-balanced")
        page.uncheck("#show-truth")
        assert canvas_state(page)["truth"] == "0" and canvas_state(page)["hits"] == "0"
        page.check("#show-truth")
        page.locator("#model-toggles input").uncheck()
        assert canvas_state(page)["boxes"] == "0" and int(canvas_state(page)["truth"]) == len(images[k]["ground_truth"])
        page.locator("#model-toggles input").check()
        # the credits of every source shown, in the footer
        footer = page.text_content("#credits")
        assert all(c["credit"][:40] in footer for c in payload["sources"].values())
        show_case(page, 0)
        page.locator("#viewer").screenshot(path=str(ARTIFACTS / "docs_real_viewer.png"))
        page.screenshot(path=str(ARTIFACTS / "docs_real_full.png"), full_page=True)
    finally:
        page.close()
    assert problems == []


def test_real_cases_opened_from_disk(browser):
    page, problems = open_page(browser, (ROOT / "docs" / "index.html").as_uri())
    try:
        assert "bundle.js" in page.text_content("#data-status")
        assert page.locator("#image-select option").count() == len(real_cases()["images"])
        assert page.evaluate("window.BoneR.state.image.naturalWidth") > 0  # the JPEG beside the page loads from disk too
    finally:
        page.close()
    assert problems == []
