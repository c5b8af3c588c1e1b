// Bone-R upload form: when this page is served by the Bone-R service (make serve), POST the file to
// /detect and show the returned boxes in the viewer. Every text from the server goes in as text, never as HTML.
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  if (!form) return;
  const statusEl = document.getElementById("status");
  const serviceEl = document.getElementById("service-status");
  const button = document.getElementById("upload-button");
  const overlayImg = document.getElementById("overlay-img");
  const resultEl = document.getElementById("result");
  // ?api=http://127.0.0.1:8000 lets a page served elsewhere talk to a service (its CORS settings must allow it).
  const apiBase = (new URLSearchParams(location.search).get("api") || "").replace(/\/+$/, "");
  const COLORS = ["#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7"];
  let uploads = 0;

  function setStatus(text, isError) {
    statusEl.textContent = text;
    statusEl.className = isError ? "error" : "";
  }

  function el(tag, text) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // The service answers GET /health; the page asks for "health" relative to itself, so that under the
  // service (docs mounted at /) it reaches the API, and on a static host it reads docs/health, a file that
  // says {"status": "static"} (no 404 in the console). From disk (file://) there is nothing to ask.
  async function findService() {
    if (location.protocol === "file:" && !apiBase) return null;
    try {
      const response = await fetch(apiBase ? apiBase + "/health" : "health", { cache: "no-store" });
      if (!response.ok) return null;
      const body = await response.json();
      return body && (body.status === "ok" || body.status === "unavailable") ? body : null;
    } catch (err) {
      return null;
    }
  }

  function showResult(body) {
    resultEl.replaceChildren();
    const verdict = body.fracture_detected ? "Possible fracture flagged" : "No finding above the threshold";
    resultEl.append(el("h3", verdict + " (mode " + body.mode + ", threshold " + Number(body.threshold).toFixed(2) + ")"));
    if (body.consult && body.consult.text) resultEl.append(el("p", body.consult.text));
    const dets = Array.isArray(body.detections) ? body.detections : [];
    if (dets.length) {
      const table = el("table");
      const head = el("tr");
      ["#", "score", "box (x1, y1, x2, y2)", "type (best guess)", "severity (best guess)"].forEach(function (h) { head.append(el("th", h)); });
      table.append(head);
      dets.forEach(function (det, i) {
        const row = el("tr");
        const hints = det.hints || {};
        [i + 1, Number(det.score).toFixed(3), det.xyxy.map(function (v) { return Math.round(v); }).join(", "),
          hints.type || "", hints.severity || ""].forEach(function (v) { row.append(el("td", v)); });
        table.append(row);
      });
      resultEl.append(table);
    }
    const clinics = body.nearby_clinics;
    if (clinics && clinics.available && Array.isArray(clinics.results) && clinics.results.length) {
      const list = el("ul");
      clinics.results.forEach(function (c) {
        const item = el("li");
        const link = el("a", c.name);
        if (/^https:\/\//.test(String(c.maps_url))) link.href = c.maps_url;
        link.rel = "noopener noreferrer";
        link.target = "_blank";
        item.append(link, document.createTextNode(" - " + c.address));
        list.append(item);
      });
      resultEl.append(el("h4", "Nearby orthopedic clinics"), list);
      if (clinics.attribution) resultEl.append(el("p", clinics.attribution));
    }
    resultEl.append(el("p", body.disclaimer));
  }

  function toScene(body, bitmap, filename) {
    const names = [];
    (body.detections || []).forEach(function (d) { if (names.indexOf(d.model) < 0) names.push(d.model); });
    uploads += 1;
    return {
      id: "upload-" + uploads,
      caption: "uploaded " + filename + " (mode " + body.mode + ", boxes at or above " + Number(body.threshold).toFixed(2) + ")",
      width: body.image_size[0],
      height: body.image_size[1],
      source: { kind: "bitmap", bitmap: bitmap },
      models: names.map(function (n, i) {
        return { name: n, color: COLORS[i % COLORS.length], threshold: body.threshold, source: body.threshold_source, description: "" };
      }),
      detections: (body.detections || []).map(function (d) {
        return { xyxy: d.xyxy.slice(), score: d.score, label: d.label, model: d.model, hints: d.hints || null };
      }),
      truth: [],
      synthetic: false,
      note: "Boxes returned by this server's /detect (" + ((body.model && body.model.detector) || "model") + "), at or above the " +
        body.mode + " threshold. " + (body.disclaimer || ""),
    };
  }

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    const file = document.getElementById("file").files[0];
    if (!file) { setStatus("Choose a file first.", true); return; }
    const mode = document.getElementById("mode").value;
    // Browsers cannot decode DICOM or TIFF: then the server draws the overlay (the same drawing code as visualize.py).
    let bitmap = null;
    try { bitmap = await createImageBitmap(file, { imageOrientation: "none" }); } catch (err) { bitmap = null; }
    const params = new URLSearchParams({ mode: mode, overlay: bitmap ? "false" : "true" });
    const data = new FormData();
    data.append("file", file, file.name);
    setStatus("Analysing " + file.name + " ...", false);
    button.disabled = true;
    let response;
    try {
      response = await fetch(apiBase + "/detect?" + params.toString(), { method: "POST", body: data });
    } catch (err) {
      setStatus("The /detect service is not reachable from this page. Start it with make serve and open http://127.0.0.1:8000/.", true);
      button.disabled = false;
      return;
    }
    button.disabled = false;
    let body = null;
    try { body = await response.json(); } catch (err) { body = null; }
    if (!response.ok || !body) {
      setStatus("Error " + response.status + ": " + (body && body.message ? body.message : response.statusText), true);
      return;
    }
    const total = body.timings_ms && body.timings_ms.total_ms;
    setStatus("Done" + (total ? " in " + Math.round(total) + " ms" : "") + ": " + (body.detections || []).length + " box(es).", false);
    if (bitmap && window.BoneR && window.BoneR.addRawScene) {
      overlayImg.hidden = true;
      window.BoneR.addRawScene(toScene(body, bitmap, file.name), true);
      setStatus(statusEl.textContent + " Shown in the overlay viewer above.", false);
    } else if (body.overlay_png_base64) {
      overlayImg.src = "data:image/png;base64," + body.overlay_png_base64;
      overlayImg.hidden = false;
    }
    showResult(body);
  });

  findService().then(function (health) {
    if (!health) {
      serviceEl.textContent = "The upload form needs the Bone-R service: run make serve and open http://127.0.0.1:8000/. " +
        "This copy of the page is static, so nothing is uploaded anywhere.";
      button.disabled = true;
      return;
    }
    if (health.status !== "ok") {
      serviceEl.textContent = "The Bone-R service is running but its model is unavailable: " + (health.reason || "no reason given") + ".";
      button.disabled = true;
      return;
    }
    serviceEl.textContent = "Connected to the Bone-R service (" + (health.detector || health.backend || "model") +
      "). Your file is sent to this server's /detect endpoint only.";
    button.disabled = false;
  });
})();
