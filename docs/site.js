// Bone-R site: the overlay viewer, the benchmark table, the evaluation report and its curves.
// Plain JavaScript, no build step, nothing loaded from other sites.
// Every string that comes from JSON goes into the page as text (textContent, createTextNode,
// SVG text nodes) or onto the canvas; never as HTML.
(function () {
  "use strict";

  const BoneR = (window.BoneR = window.BoneR || {});
  const PALETTE = ["#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7"];
  const SAFE_SRC = /^[A-Za-z0-9][A-Za-z0-9._-]*\.(png|jpe?g|webp)$/i;
  const SAFE_COLOR = /^#[0-9a-fA-F]{6}$/;
  const SVG_NS = "http://www.w3.org/2000/svg";

  // --------------------------------------------------------------------------- helpers

  function el(tag, text, attrs) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (attrs) Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }

  function isNum(x) { return typeof x === "number" && isFinite(x); }
  function num(x, digits) { return isNum(x) ? x.toFixed(digits === undefined ? 3 : digits) : "n/a"; }
  function metric(entry) {
    if (!entry || !isNum(entry.value)) return "n/a";
    let s = num(entry.value);
    if (Array.isArray(entry.ci) && entry.ci.length === 2) s += " [" + num(entry.ci[0], 2) + "\u2013" + num(entry.ci[1], 2) + "]";
    else if (typeof entry.note === "string") s += " (" + entry.note + ")";  // e.g. "too few (n=3) for an interval"
    return s;
  }
  // a report's box mAP@0.5 with its group-bootstrap interval when the report has one
  function map50(box) { return metric({ value: (box || {}).map50, ci: ((box || {}).map50_interval || {}).ci }); }
  function str(x, fallback) { return typeof x === "string" ? x : (x === undefined || x === null ? (fallback || "") : String(x)); }

  function table(node, caption, headers, rows) {
    node.replaceChildren();
    if (caption) node.append(el("caption", caption));
    const thead = el("thead");
    const tr = el("tr");
    headers.forEach(function (h) { tr.append(el("th", h, { scope: "col" })); });
    thead.append(tr);
    const tbody = el("tbody");
    rows.forEach(function (row) {
      const r = el("tr");
      row.forEach(function (cell, i) {
        const td = el(i === 0 ? "th" : "td", typeof cell === "object" && cell !== null ? cell.text : cell);
        if (i === 0) td.setAttribute("scope", "row");
        if (typeof cell === "object" && cell !== null && cell.num) td.className = "num";
        if (typeof cell === "object" && cell !== null && cell.title) td.title = cell.title;  // an attribute: text, never HTML
        r.append(td);
      });
      tbody.append(r);
    });
    node.append(thead, tbody);
  }

  // --------------------------------------------------------------------------- data

  let bundlePromise = null;
  function loadBundle() {
    // data/bundle.js is a copy of data/*.json for pages opened from disk, where fetch() is refused.
    if (!bundlePromise) {
      bundlePromise = new Promise(function (resolve) {
        if (window.BONER_SITE_DATA) { resolve(window.BONER_SITE_DATA); return; }
        const script = document.createElement("script");
        script.src = "data/bundle.js";
        script.onload = function () { resolve(window.BONER_SITE_DATA || null); };
        script.onerror = function () { resolve(null); };
        document.head.append(script);
      });
    }
    return bundlePromise;
  }

  const dataSources = {};
  async function loadData(name) {
    if (location.protocol !== "file:") {
      try {
        const response = await fetch("data/" + name, { cache: "no-cache" });
        if (response.ok) { dataSources[name] = "served"; return await response.json(); }
        dataSources[name] = "missing (HTTP " + response.status + ")";
        return null;
      } catch (err) {
        // a static host that refuses fetch: fall back to the bundle below
      }
    }
    const bundle = await loadBundle();
    if (bundle && bundle.files && bundle.files[name]) {
      dataSources[name] = "bundle";
      BoneR.bundleGenerated = str(bundle.generated);
      return bundle.files[name];
    }
    dataSources[name] = "missing";
    return null;
  }

  // --------------------------------------------------------------------------- viewer

  const $ = function (id) { return document.getElementById(id); };
  const canvas = $("overlay-canvas");
  const ctx = canvas.getContext("2d");
  const MODES = ["screening", "balanced", "specific"];
  // Hit/miss markings on the real cases (Okabe-Ito, and every marking is also said in words in the list beside).
  const MARK = { hit: "#009e73", false: "#e69f00", found: "#ffffff", missed: "#cc79a7" };
  const OUTCOME = {
    TP: "fracture flagged (true positive)", FN: "missed fracture (false negative)",
    FP: "false alarm (false positive)", TN: "nothing flagged, none marked (true negative)",
  };
  const state = {
    scenes: [], index: 0, enabled: new Map(), minScore: 0.25, showTruth: true, mode: null, modes: null, cases: null, iou: 0.3,
    selected: null, hover: null, image: null, loadToken: 0, visible: [], tags: [],
  };
  BoneR.state = state;

  function safeUrl(x) { return /^https:\/\/[^\s"'<>]+$/.test(str(x)) ? str(x) : null; }

  function cleanDetections(list, fallbackModel) {
    return (Array.isArray(list) ? list : []).filter(function (d) {
      return d && Array.isArray(d.xyxy) && d.xyxy.length === 4 && d.xyxy.every(isNum) && isNum(d.score);
    }).map(function (d) {
      return {
        xyxy: d.xyxy.slice(), score: d.score, label: str(d.label, "fracture"), model: str(d.model, fallbackModel) || fallbackModel,
        hints: d.hints || null, match: Number.isInteger(d.match) ? d.match : (d.match === null ? null : undefined),
        iou: isNum(d.iou) ? d.iou : null,
      };
    }).sort(function (a, b) { return b.score - a.score; });  // numbered by score, best first
  }

  function cleanTruth(list) {
    return (Array.isArray(list) ? list : []).filter(function (t) {
      return t && Array.isArray(t.xyxy) && t.xyxy.length === 4 && t.xyxy.every(isNum);
    }).map(function (t) { return { xyxy: t.xyxy.slice(), found_score: isNum(t.found_score) ? t.found_score : (t.found_score === null ? null : undefined) }; });
  }

  function sceneFrom(entry, models, synthetic, note) {
    const known = new Map();
    (models || []).forEach(function (m, i) {
      if (!m || typeof m.name !== "string") return;
      known.set(m.name, {
        name: m.name,
        color: SAFE_COLOR.test(str(m.color)) ? m.color : PALETTE[i % PALETTE.length],
        threshold: isNum(m.threshold) ? m.threshold : null,
        source: str(m.threshold_source),
        description: str(m.description),
      });
    });
    const detections = cleanDetections(entry.detections, "model");
    detections.forEach(function (d) {
      if (!known.has(d.model)) {
        known.set(d.model, { name: d.model, color: PALETTE[known.size % PALETTE.length], threshold: null, source: "", description: "" });
      }
    });
    return Object.assign(sceneImage(entry), {
      kind: "predictions",
      models: Array.from(known.values()),
      detections: detections,
      truth: cleanTruth(entry.ground_truth),
      synthetic: !!synthetic,
      note: str(note),
    });
  }

  // What every scene takes from its entry: id, caption, size and a safe image source.
  function sceneImage(entry) {
    const src = str(entry.src);
    return {
      id: str(entry.id, src),
      caption: str(entry.caption),
      width: isNum(entry.width) ? entry.width : 0,
      height: isNum(entry.height) ? entry.height : 0,
      source: SAFE_SRC.test(src) ? { kind: "url", url: "data/" + src } : { kind: "none" },
    };
  }

  // One real test radiograph of cases.json: its boxes already judged against the truth (match, found_score, decisions).
  function sceneFromCase(entry, payload) {
    const model = payload.model || {};
    const name = str(model.name, "model") || "model";
    const modes = payload.modes || {};
    const sources = payload.sources || {};
    const credit = sources[str(entry.source)] || null;
    const decisions = {};
    MODES.forEach(function (m) { if (entry.decisions && entry.decisions[m]) decisions[m] = entry.decisions[m]; });
    return Object.assign(sceneImage(entry), {
      kind: "case",
      models: [{
        name: name, color: SAFE_COLOR.test(str(model.color)) ? model.color : PALETTE[0],
        threshold: isNum((modes.balanced || {}).threshold) ? modes.balanced.threshold : null, source: "model card",
        description: str(model.weights),
      }],
      detections: cleanDetections(entry.detections, name),
      truth: cleanTruth(entry.ground_truth),
      synthetic: false,
      note: "",
      info: {
        source: str(entry.source), region: str(entry.region), label: entry.label === 1 ? 1 : 0, pickedAs: str(entry.picked_as, "draw"),
        original: str(entry.original), decisions: decisions, credit: credit,
      },
    });
  }

  function addScene(scene, select) {
    state.scenes.push(scene);
    scene.models.forEach(function (m) { if (!state.enabled.has(m.name)) state.enabled.set(m.name, true); });
    const text = scene.kind === "case"
      ? scene.id + ": " + scene.info.region + ", " + (scene.info.label ? "fracture marked" : "no fracture marked") + " (" + scene.info.source + ")"
      : (scene.caption ? scene.id + ": " + scene.caption : scene.id);
    const option = el("option", text, { value: String(state.scenes.length - 1) });
    $("image-select").append(option);
    if (select || state.scenes.length === 1) showScene(state.scenes.length - 1);
  }
  BoneR.addScene = function (scene, select) { addScene(sceneFrom(scene, scene.models, false), select); };
  BoneR.addRawScene = function (scene, select) { scene.kind = scene.kind || "upload"; addScene(scene, select); };

  function currentScene() { return state.scenes[state.index] || null; }

  function showScene(index) {
    state.index = index;
    state.selected = null;
    state.hover = null;
    $("image-select").value = String(index);
    const scene = currentScene();
    buildToggles(scene);
    $("image-caption").textContent = scene.caption + (scene.synthetic ? " (synthetic demo)" : "");
    renderCredit(scene);
    if (scene.kind !== "case") $("viewer-note").textContent = scene.note || "";
    else if (!$("selection-rule")) renderSelectionNote(state.cases);  // once: an opened <details> stays open
    $("mode-picker").hidden = !(scene.kind === "case" && state.modes);
    const token = ++state.loadToken;
    state.image = null;
    if (scene.source.kind === "bitmap") {
      state.image = scene.source.bitmap;
      render();
    } else if (scene.source.kind === "url") {
      const img = new Image();
      img.onload = function () { if (token === state.loadToken) { state.image = img; render(); } };
      img.onerror = function () { if (token === state.loadToken) { state.image = "missing"; render(); } };
      img.src = scene.source.url;
      render();
    } else {
      state.image = "missing";
      render();
    }
  }

  function buildToggles(scene) {
    const box = $("model-toggles");
    box.replaceChildren(el("legend", scene.kind === "case" ? "Model boxes" : "Models"));
    scene.models.forEach(function (m, i) {
      const id = "model-toggle-" + i;
      const input = el("input", null, { type: "checkbox", id: id });
      input.checked = state.enabled.get(m.name) !== false;
      input.dataset.model = m.name;
      input.addEventListener("change", function () {
        state.enabled.set(m.name, input.checked);
        if (state.selected && state.selected.model === m.name && !input.checked) state.selected = null;
        render();
      });
      const label = el("label", null, { for: id });
      const swatch = el("span", null, { class: "swatch", "aria-hidden": "true" });
      swatch.style.background = m.color;
      const thr = m.threshold !== null ? " (threshold " + num(m.threshold, 2) + ")" : "";
      label.append(input, swatch, document.createTextNode(scene.kind === "case" ? "Show " + m.name + "'s boxes" : m.name + thr));
      if (m.description) label.title = m.description;
      box.append(label);
    });
  }

  function renderCredit(scene) {
    const node = $("image-credit");
    node.replaceChildren();
    const credit = scene.info && scene.info.credit;
    if (!credit) { node.hidden = true; return; }
    node.hidden = false;
    node.append(document.createTextNode("Image: " + str(credit.credit) + ". "));
    const url = safeUrl(credit.url);
    if (url) {
      const a = el("a", str(credit.title, "source"), { href: url, rel: "noopener noreferrer" });
      node.append(a, document.createTextNode(". "));
    }
    node.append(document.createTextNode("Licence: "));
    const lic = safeUrl(credit.licence_url);
    if (lic) node.append(el("a", str(credit.licence), { href: lic, rel: "noopener noreferrer license" }));
    else node.append(document.createTextNode(str(credit.licence)));
    node.append(document.createTextNode(". Changed: " + str(credit.changes) + "."));
  }

  function visibleDetections(scene) {
    return scene.detections.filter(function (d) {
      return state.enabled.get(d.model) !== false && d.score >= state.minScore - 1e-9;
    });
  }

  function colorOf(scene, model) {
    const m = scene.models.find(function (x) { return x.name === model; });
    return m ? m.color : PALETTE[0];
  }

  // Whether the hit/miss markings apply: a judged case with its truth shown.
  function marking(scene) { return scene.kind === "case" && state.showTruth; }
  function isHit(d) { return d.match !== null && d.match !== undefined; }
  function truthFound(t) { return isNum(t.found_score) && t.found_score >= state.minScore - 1e-9; }

  // ----- label layout: a tag per box, outside its box, never over another tag (as bone_r/draw.py does for overlays)

  function intersects(a, b) { return a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3]; }
  function overlapArea(a, b) { return Math.max(0, Math.min(a[2], b[2]) - Math.max(a[0], b[0])) * Math.max(0, Math.min(a[3], b[3]) - Math.max(a[1], b[1])); }

  function candidates(box, lw, lh, W, H, gap, ring) {
    const [x1, y1, x2, y2] = box;
    const d = gap + ring * (lh + gap);
    const cx = (x1 + x2) / 2, cy = (y1 + y2) / 2;
    const out = [];
    const clamp = function (v, hi) { return Math.min(Math.max(v, 0), Math.max(hi, 0)); };
    const add = function (x, y) {
      x = Math.round(x); y = Math.round(y);
      if (x >= 0 && x <= W - lw && y >= 0 && y <= H - lh) out.push([x, y, x + lw, y + lh]);
    };
    [y1 - d - lh, y2 + d].forEach(function (y) { [x1, x2 - lw, cx - lw / 2].forEach(function (x) { add(clamp(x, W - lw), y); }); });
    [x2 + d, x1 - d - lw].forEach(function (x) { [y1, y2 - lh, cy - lh / 2].forEach(function (y) { add(x, clamp(y, H - lh)); }); });
    return out;
  }

  function placeLabels(boxes, sizes, W, H, gap, avoid, maxRings) {
    const placed = [];
    return boxes.map(function (box, i) {
      const own = [box[0] - gap, box[1] - gap, box[2] + gap, box[3] + gap];
      const others = boxes.filter(function (b, j) { return j !== i; }).concat(avoid);
      let best = null;
      for (let ring = 0; ring < maxRings && !(best && best.covered === 0); ring++) {
        const cands = candidates(box, sizes[i][0], sizes[i][1], W, H, gap, ring);
        for (let k = 0; k < cands.length; k++) {
          const r = cands[k];
          if (intersects(r, own) || placed.some(function (q) { return intersects(r, q); })) continue;
          const covered = others.reduce(function (s, o) { return s + overlapArea(r, o); }, 0);
          if (!best || covered < best.covered) best = { rect: r, ring: ring, covered: covered };
          if (covered === 0) break;
        }
      }
      if (best) placed.push(best.rect);
      return best;
    });
  }

  function dashedRect(r, color, unit, width) {
    ctx.save();
    ctx.setLineDash([6 * unit, 4 * unit]);
    ctx.lineWidth = (width + 1.5) * unit;
    ctx.strokeStyle = "#000";
    ctx.strokeRect(r[0], r[1], r[2] - r[0], r[3] - r[1]);
    ctx.lineWidth = width * unit;
    ctx.strokeStyle = color;
    ctx.strokeRect(r[0], r[1], r[2] - r[0], r[3] - r[1]);
    ctx.restore();
  }

  function render() {
    const scene = currentScene();
    if (!scene) return;
    const img = state.image && state.image !== "missing" ? state.image : null;
    const iw = img ? (img.naturalWidth || img.width) : (scene.width || 320);
    const ih = img ? (img.naturalHeight || img.height) : (scene.height || 400);
    // Small images are drawn larger (crisp lines and text at the size they are shown), large ones as they are.
    const zoom = Math.max(1, 700 / Math.max(iw, ih));
    const w = Math.round(iw * zoom), h = Math.round(ih * zoom);
    if (canvas.width !== w) canvas.width = w;
    if (canvas.height !== h) canvas.height = h;
    const sx = scene.width ? w / scene.width : zoom;
    const sy = scene.height ? h / scene.height : zoom;
    const toCanvas = function (b) { return [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy]; };
    // lines and tags keep their size on screen: one unit is one CSS pixel of the canvas as shown (at least 1)
    const shown = canvas.getBoundingClientRect().width;
    const unit = Math.max(1, shown > 0 ? w / shown : Math.max(w, h) / 800);
    ctx.clearRect(0, 0, w, h);
    if (img) {
      ctx.drawImage(img, 0, 0, w, h);
    } else {
      ctx.fillStyle = "#333";
      ctx.fillRect(0, 0, w, h);
      ctx.fillStyle = "#fff";
      ctx.font = Math.round(14 * unit) + "px sans-serif";
      ctx.fillText(state.image === "missing" ? "image not available" : "loading...", 10 * unit, 24 * unit);
    }
    const marks = marking(scene);
    let missed = 0;
    const truthRects = [];
    if (state.showTruth) {
      scene.truth.forEach(function (t) {
        const lost = marks && !truthFound(t);
        if (lost) missed++;
        truthRects.push({ rect: toCanvas(t.xyxy), lost: lost });
      });
    }
    const visible = visibleDetections(scene);
    state.visible = visible;
    const focus = state.selected || state.hover;
    if (focus && visible.indexOf(focus) < 0) { if (state.selected === focus) state.selected = null; state.hover = null; }
    const boxColor = function (d) { return marks ? (isHit(d) ? MARK.hit : MARK.false) : colorOf(scene, d.model); };
    visible.slice().reverse().forEach(function (d) {  // lowest score first, so the best box is drawn on top
      const r = toCanvas(d.xyxy);
      const active = d === state.selected || d === state.hover;
      ctx.lineWidth = (active ? 4 : 2) * unit;
      ctx.strokeStyle = boxColor(d);
      ctx.strokeRect(r[0], r[1], r[2] - r[0], r[3] - r[1]);
    });
    // the truth on top of the model's boxes, so that a crowd of boxes cannot hide it
    truthRects.forEach(function (t) { dashedRect(t.rect, t.lost ? MARK.missed : MARK.found, unit, t.lost ? 2.5 : 1.5); });
    // tags: the box's number (and its score when few boxes are shown); "missed" on each true box not found
    ctx.font = "bold " + Math.round(12 * unit) + "px sans-serif";
    ctx.textBaseline = "middle";
    const items = visible.map(function (d, i) {
      return { box: toCanvas(d.xyxy), text: String(i + 1) + (visible.length <= 8 ? " \u00b7 " + d.score.toFixed(2) : ""), color: boxColor(d), det: d };
    }).concat(truthRects.filter(function (t) { return t.lost; }).map(function (t) {
      return { box: t.rect, text: "missed", color: MARK.missed, det: null };
    }));
    const th = Math.round(16 * unit), gap = Math.round(3 * unit);
    const sizes = items.map(function (it) { return [Math.ceil(ctx.measureText(it.text).width + 8 * unit), th]; });
    const rounded = items.map(function (it) { return it.box.map(Math.round); });
    const places = placeLabels(rounded, sizes, w, h, gap, truthRects.map(function (t) { return t.rect.map(Math.round); }), 10);
    state.tags = [];
    items.forEach(function (it, i) {  // leader lines first: the tags go over them
      const p = places[i];
      if (it.det) it.det.tagged = !!p;
      if (!p || p.ring === 0) return;
      const [x1, y1, x2, y2] = p.rect;  // moved away from its box: a thin line joins them
      const bx = Math.min(Math.max((x1 + x2) / 2, it.box[0]), it.box[2]), by = Math.min(Math.max((y1 + y2) / 2, it.box[1]), it.box[3]);
      ctx.lineWidth = unit;
      ctx.strokeStyle = it.color;
      ctx.beginPath();
      ctx.moveTo(Math.min(Math.max(bx, x1), x2), Math.min(Math.max(by, y1), y2));
      ctx.lineTo(bx, by);
      ctx.stroke();
    });
    items.forEach(function (it, i) {
      const p = places[i];
      if (!p) return;
      const [x1, y1, x2, y2] = p.rect;
      ctx.fillStyle = "rgba(0,0,0,0.8)";
      ctx.fillRect(x1, y1, x2 - x1, y2 - y1);
      ctx.fillStyle = it.color;
      ctx.fillText(it.text, x1 + 4 * unit, (y1 + y2) / 2 + 0.5);
      state.tags.push(p.rect);
    });
    canvas.dataset.boxes = String(visible.length);
    canvas.dataset.truth = String(truthRects.length);
    canvas.dataset.missed = String(missed);
    canvas.dataset.hits = String(marks ? visible.filter(isHit).length : 0);
    canvas.dataset.falseBoxes = String(marks ? visible.filter(function (d) { return !isHit(d); }).length : 0);
    canvas.setAttribute("aria-label", "Radiograph " + scene.id + " with " + visible.length + " model box(es)" +
      (truthRects.length ? " and " + truthRects.length + " true box(es), " + missed + " missed" : "") + " drawn" +
      (scene.synthetic ? " (synthetic demo)" : ""));
    $("box-count").textContent = visible.length + " of " + scene.detections.length + " box(es) shown (score \u2265 " +
      num(state.minScore, state.mode ? 3 : 2) + ")" + (marks ? ": " + canvas.dataset.hits + " hit a true box, " + canvas.dataset.falseBoxes +
      " false; " + missed + " of " + truthRects.length + " true box(es) missed" : "");
    renderKey(scene, marks);
    renderCase(scene);
    renderList(scene, visible, marks);
    renderDetails(scene);
  }

  function renderKey(scene, marks) {
    const key = $("overlay-key");
    key.replaceChildren();
    const entries = marks ? [[MARK.hit, "solid", "model box that hits a true box (IoU \u2265 " + num(state.iou, 1) + ")"],
      [MARK.false, "solid", "model box on no true box (false)"], [MARK.found, "dashed", "true box, found"],
      [MARK.missed, "dashed", "true box, missed at this threshold"]]
      : (state.showTruth && scene.truth.length ? [[MARK.found, "dashed", "known box (ground truth)"]] : []);
    entries.forEach(function (e) {
      const item = el("li");
      const swatch = el("span", null, { class: "swatch " + e[1], "aria-hidden": "true" });
      swatch.style.borderColor = e[0];
      item.append(swatch, document.createTextNode(e[2]));
      key.append(item);
    });
    key.hidden = !entries.length;
  }

  function renderCase(scene) {
    const box = $("case-info");
    box.replaceChildren();
    if (scene.kind !== "case") { box.hidden = true; return; }
    box.hidden = false;
    const info = scene.info;
    const dl = el("dl");
    [["Source", info.credit ? str(info.credit.title) : info.source], ["Region", info.region],
      ["Ground truth", info.label ? scene.truth.length + " fracture box(es) marked" : "no fracture marked"],
      ["Chosen as", info.pickedAs === "draw" ? "seeded stratified draw" : "the first " + info.pickedAs + " in seeded order (selection rule, step 3)"]]
      .forEach(function (r) { dl.append(el("dt", r[0]), el("dd", r[1])); });
    box.append(el("h3", "This radiograph"), dl);
    const rows = MODES.filter(function (m) { return info.decisions[m]; }).map(function (m) {
      const d = info.decisions[m];
      return { mode: m, threshold: d.threshold, flagged: d.flagged, outcome: d.outcome };
    });
    const t = state.minScore;
    if (!state.mode) {  // the slider's own threshold, decided here as the modes were
      const flagged = scene.detections.some(function (d) { return d.score >= t - 1e-9; });
      rows.push({ mode: "this threshold", threshold: t, flagged: flagged, outcome: info.label ? (flagged ? "TP" : "FN") : (flagged ? "FP" : "TN") });
    }
    const table = el("table", null, { id: "case-decisions" });
    table.append(el("caption", "The model's decision"));
    const head = el("tr");
    ["Mode", "Threshold", "Decision"].forEach(function (x) { head.append(el("th", x, { scope: "col" })); });
    const thead = el("thead");
    thead.append(head);
    table.append(thead);
    const body = el("tbody");
    rows.forEach(function (r) {
      const tr = el("tr");
      const current = r.mode === state.mode || (r.mode === "this threshold" && !state.mode);
      if (current) { tr.className = "current"; tr.setAttribute("aria-current", "true"); }
      tr.dataset.mode = r.mode;
      tr.dataset.outcome = r.outcome;
      tr.append(el("th", r.mode, { scope: "row" }), el("td", num(r.threshold, 3)), el("td", OUTCOME[r.outcome] || r.outcome));
      body.append(tr);
    });
    table.append(body);
    box.append(table);
  }

  function renderList(scene, visible, marks) {
    // Rebuilt only when the set of boxes (or their markings) changes, so keyboard focus survives hovering and choosing.
    const list = $("det-list");
    const key = state.index + "|" + marks + "|" + visible.map(function (d) { return scene.detections.indexOf(d) + (d.tagged ? "" : "u"); }).join(",");
    if (list.dataset.key !== key) {
      list.dataset.key = key;
      list.replaceChildren();
      visible.forEach(function (d) {
        const item = el("li");
        const button = el("button", null, { type: "button" });
        const swatch = el("span", null, { class: "swatch", "aria-hidden": "true" });
        swatch.style.background = marks ? (isHit(d) ? MARK.hit : MARK.false) : colorOf(scene, d.model);
        let words = d.model + ": " + d.label + " " + d.score.toFixed(2);
        if (marks) words += isHit(d) ? ", hits true box " + (d.match + 1) + (isNum(d.iou) ? " (IoU " + d.iou.toFixed(2) + ")" : "") : ", false box";
        if (!d.tagged) words += " (no room for its tag on the image)";
        button.append(swatch, document.createTextNode(words));
        button.addEventListener("click", function () {
          state.selected = state.selected === d ? null : d;
          render();
        });
        button.detection = d;
        item.append(button);
        list.append(item);
      });
      if (!visible.length) list.append(el("li", "No box at or above this score for the models switched on."));
    }
    list.querySelectorAll("button").forEach(function (button) {
      button.setAttribute("aria-pressed", button.detection === state.selected ? "true" : "false");
    });
  }

  function renderDetails(scene) {
    const box = $("det-details");
    box.replaceChildren();
    const d = state.selected || state.hover;
    if (!d) { box.append(el("p", "No box chosen.")); return; }
    const model = scene.models.find(function (m) { return m.name === d.model; }) || {};
    const hints = d.hints || {};
    const rows = [
      ["Model", d.model],
      ["Score", d.score.toFixed(3)],
      ["Label", d.label],
      ["Box (x1, y1, x2, y2)", d.xyxy.map(function (v) { return Math.round(v); }).join(", ") + " px"],
    ];
    if (scene.kind === "case") rows.push(["Against the truth", isHit(d) ? "hits true box " + (d.match + 1) + " (IoU " + num(d.iou, 2) + ")" : "on no true box (IoU < " + num(state.iou, 1) + ")"]);
    else if (isNum(model.threshold)) rows.push(["At this model's threshold", (d.score >= model.threshold ? "yes" : "no") + " (" + num(model.threshold, 2) + ")"]);
    if (hints.type) rows.push(["Type (best guess)", hints.type]);
    if (hints.severity) rows.push(["Severity (best guess)", hints.severity]);
    if (hints.confidence) rows.push(["Confidence words", hints.confidence]);
    const dl = el("dl");
    rows.forEach(function (r) { dl.append(el("dt", r[0]), el("dd", r[1])); });
    box.append(dl);
    box.append(el("p", hints.note || "Best guess from the box alone; not a diagnosis.", { class: "hint" }));
  }

  function boxAt(event) {
    const scene = currentScene();
    if (!scene) return null;
    const rect = canvas.getBoundingClientRect();
    const x = (event.clientX - rect.left) * ((scene.width || canvas.width) / rect.width);
    const y = (event.clientY - rect.top) * ((scene.height || canvas.height) / rect.height);
    let best = null;
    let bestArea = Infinity;
    state.visible.forEach(function (d) {
      const [x1, y1, x2, y2] = d.xyxy;
      const pad = 3 * (scene.width || canvas.width) / rect.width;  // a few screen pixels of slack around thin boxes
      if (x >= x1 - pad && x <= x2 + pad && y >= y1 - pad && y <= y2 + pad) {
        const area = (x2 - x1) * (y2 - y1);
        if (area < bestArea) { best = d; bestArea = area; }
      }
    });
    return best;
  }

  canvas.addEventListener("mousemove", function (event) {
    const hit = boxAt(event);
    if (hit !== state.hover) { state.hover = hit; render(); }
  });
  canvas.addEventListener("mouseleave", function () { if (state.hover) { state.hover = null; render(); } });
  canvas.addEventListener("click", function (event) {
    const hit = boxAt(event);
    state.selected = hit && hit !== state.selected ? hit : null;
    render();
  });
  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && (state.selected || state.hover)) { state.selected = null; state.hover = null; render(); }
  });
  $("image-select").addEventListener("change", function (event) { showScene(Number(event.target.value)); });
  const slider = $("min-score");
  function setMinScore(value, mode) {
    state.minScore = Math.min(1, Math.max(0, value));
    state.mode = mode || null;
    slider.value = String(state.minScore);
    const text = mode ? num(state.minScore, 3) + " (" + mode + ")" : state.minScore.toFixed(2);
    $("min-score-value").textContent = text;
    slider.setAttribute("aria-valuetext", text);
    document.querySelectorAll("#mode-picker input").forEach(function (input) { input.checked = input.value === state.mode; });
  }
  slider.addEventListener("input", function () { setMinScore(Number(slider.value)); render(); });
  $("show-truth").addEventListener("change", function (event) { state.showTruth = event.target.checked; render(); });

  function buildModePicker(modes) {
    const box = $("mode-picker");
    box.replaceChildren(el("legend", "Operating point (from the model card)"));
    MODES.forEach(function (m) {
      if (!modes[m] || !isNum(modes[m].threshold)) return;
      const id = "mode-" + m;
      const input = el("input", null, { type: "radio", name: "viewer-mode", id: id, value: m });
      input.addEventListener("change", function () { if (input.checked) { setMinScore(modes[m].threshold, m); render(); } });
      const label = el("label", null, { for: id });
      label.append(input, document.createTextNode(m + " (threshold " + num(modes[m].threshold, 3) + ")"));
      box.append(label);
    });
  }

  function renderSelectionNote(payload) {
    const note = $("viewer-note");
    const model = payload.model || {};
    const sel = payload.selection || {};
    const data = payload.data || {};
    note.replaceChildren(document.createTextNode(
      payload.images.length + " real radiographs from the " + str(data.split, "test") + " split (never used for training or for " +
      "choosing thresholds), with the boxes of the bundled model " + str(model.name) +
      (model.tta === "hflip" ? " (each radiograph predicted as it is and mirrored, the two views' boxes fused)" : "") +
      " down to its screening threshold " +
      num(payload.min_score, 3) + " and the ground truth. Generated " + str(payload.generated) + " by " +
      str(payload.generator) + "; cases chosen by a seeded rule, not hand-picked: "));
    const details = el("details", null, { id: "selection-rule" });
    details.append(el("summary", "how the cases were chosen"), el("p", str(sel.rule)));
    const summary = payload.summary && payload.summary.balanced;
    if (summary) {
      details.append(el("p", "Balanced mode on these " + payload.images.length + ": " + summary.TP + " fractures flagged, " + summary.FN +
        " missed, " + summary.FP + " false alarms, " + summary.TN + " correctly left alone. A handful of cases says little about the " +
        "model's accuracy: the evaluation report below does."));
    }
    note.append(details);
  }

  function renderCredits(payload) {
    const list = $("credits");
    list.replaceChildren();
    const sources = payload && payload.sources ? payload.sources : {};
    Object.keys(sources).forEach(function (key) {
      const c = sources[key] || {};
      const item = el("li");
      item.append(document.createTextNode(str(c.credit) + ". "));
      const url = safeUrl(c.url);
      if (url) item.append(el("a", url, { href: url, rel: "noopener noreferrer" }), document.createTextNode(". "));
      item.append(document.createTextNode("Licence " + str(c.licence) + ". Changed: " + str(c.changes) + "."));
      list.append(item);
    });
    $("credits-block").hidden = !list.children.length;
  }


  // --------------------------------------------------------------------------- benchmark

  function renderBenchmark(payload) {
    const meta = $("benchmark-meta");
    meta.replaceChildren();
    if (!payload || !Array.isArray(payload.models)) {
      meta.append(el("p", "No benchmark yet: run python benchmark.py --data D --models NAME=WEIGHTS ... (writes docs/data/benchmark.json).", { class: "note" }));
      $("benchmark-table").replaceChildren();
      return;
    }
    const p = el("p");
    p.append(document.createTextNode(str(payload.split) + " split of " + str(payload.data) + ": " + str(payload.n_images) +
      " images, " + str(payload.n_positive) + " with a fracture. Thresholds chosen on " + str(payload.val_split, "val") +
      (payload.commit ? "; commit " + str(payload.commit) : "") + (payload.generated ? "; generated " + str(payload.generated) : "") + "."));
    if (payload.synthetic) p.append(el("span", "synthetic demo", { class: "badge" }));
    meta.append(p);
    (Array.isArray(payload.notes) ? payload.notes : []).forEach(function (n) { meta.append(el("p", n, { class: "note" })); });
    const rows = payload.models.map(function (m) {
      const bal = m.balanced || {};
      const ms = m.ms_per_image || {};
      return [
        str(m.name), str(m.backend), { text: num(m.map50), num: true }, { text: num(m.map50_95), num: true },
        { text: num(m.roc_auc), num: true }, { text: num(bal.threshold, 3), num: true },
        metric(bal.sensitivity), metric(bal.specificity), { text: num(ms.median, 1), num: true, title: str(ms.what, "") },
        { text: isNum(m.params) ? m.params.toLocaleString("en") : "n/a", num: true }, { text: num(m.size_mb, 1), num: true },
      ];
    });
    table($("benchmark-table"), "Every model on the same split (balanced operating point; 95% group-bootstrap intervals)",
      ["Model", "Backend", "mAP@0.5", "mAP@0.5:0.95", "ROC AUC", "Threshold", "Sensitivity [95% CI]", "Specificity [95% CI]",
        "ms / image (median)", "Parameters", "Size (MB)"], rows);
  }

  // --------------------------------------------------------------------------- evaluation report

  function renderReport(report) {
    const summary = $("report-summary");
    summary.replaceChildren();
    if (!report || !report.image_level) {
      summary.append(el("p", "No evaluation report yet: python evaluate.py --weights W --data D --out docs/data/report.json --no-plots", { class: "note" }));
      ["report-modes", "by-source-radiographs", "by-source", "by-region", "by-fracture-size"].forEach(function (id) { $(id).replaceChildren(); });
      return;
    }
    const box = report.box || {};
    const model = report.model || {};
    const p = el("p");
    p.append(document.createTextNode((model.name || model.weights || model.predictions ? "Model " + str(model.name || model.weights || model.predictions) + " on the " : "The ") +
      str(report.split) + " split of " + str(report.data) + ": " + str(report.n_images) + " images, " + str(report.n_positive) +
      " with a fracture, " + str(report.n_groups) + " groups. Box mAP@0.5 " + map50(box) + ", mAP@0.5:0.95 " + num(box.map50_95) +
      " (" + str(box.n_gt_boxes) + " true boxes); image ROC AUC " + num((report.image_auc || {}).roc_auc) + "."));
    if (report.synthetic) p.append(el("span", "synthetic demo", { class: "badge" }));
    summary.append(p);
    (Array.isArray(report.notes) ? report.notes : []).slice(0, 6).forEach(function (n) { summary.append(el("p", n, { class: "note" })); });

    const ops = report.operating_points || {};
    const loc = report.localization || {};
    const modes = Object.keys(report.image_level);
    table($("report-modes"), null,
      ["Mode", "Threshold", "Chosen on", "Sensitivity", "Specificity", "PPV", "NPV", "TP", "FP", "TN", "FN", "Localized sensitivity"],
      modes.map(function (mode) {
        const r = report.image_level[mode] || {};
        const op = ops[mode] || {};
        return [mode, { text: num(op.threshold, 4), num: true }, str(op.source), metric(r.sensitivity), metric(r.specificity),
          metric(r.ppv), metric(r.npv), { text: str(r.tp), num: true }, { text: str(r.fp), num: true },
          { text: str(r.tn), num: true }, { text: str(r.fn), num: true }, metric((loc[mode] || {}).sensitivity)];
      }));
    const ids = { by_source_radiographs: "by-source-radiographs", by_source: "by-source", by_region: "by-region" };
    Object.keys(ids).forEach(function (key) {
      const parts = report[key] || {};
      const node = $(ids[key]);
      const names = Object.keys(parts);
      if (!names.length) { node.replaceChildren(el("caption", "not in this report")); return; }
      const rows = names.map(function (name) {
        const part = parts[name] || {};
        const levels = part.image_level || {};
        const bal = levels.balanced || levels[Object.keys(levels)[0]] || {};
        return [name, { text: str(part.n_images), num: true }, { text: str(part.n_positive), num: true },
          { text: str(part.n_gt_boxes), num: true }, { text: map50(part.box), num: true },
          { text: num(part.image_auc), num: true }, metric(bal.sensitivity), metric(bal.specificity)];
      });
      const mean = key === "by_source_radiographs" ? report.mean_over_sources : null;
      if (mean) {  // the unweighted mean of what each source defines
        rows.push(["mean over sources", "", "", "", { text: num((mean.map50 || {}).value), num: true },
          { text: num((mean.image_auc || {}).value), num: true }, num((mean.sensitivity || {}).value), num((mean.specificity || {}).value)]);
      }
      table(node, key === "by_source_radiographs" ? "Roboflow's augmented copies and near-duplicates of one radiograph count once; " +
        "a source with only positives has no specificity or AUC" : null,
        ["Name", "Images", "Positive", "True boxes", "mAP@0.5 [95% CI]", "ROC AUC", "Sensitivity", "Specificity"], rows);
    });
    renderFractureSize(report.by_fracture_size);
    renderCurves(report);
  }

  // flagged (the image) and found (a box at IoU >= the report's) for the smallest, middle and largest third
  function renderFractureSize(sizes) {
    const node = $("by-fracture-size");
    const bySource = (sizes || {}).by_source || {};
    const rows = [];
    Object.keys(bySource).forEach(function (source) {
      (Array.isArray(bySource[source]) ? bySource[source] : []).forEach(function (part, i) {
        const pct = function (x) { return isNum(x) ? (100 * x).toFixed(2) + "%" : "n/a"; };
        rows.push([i === 0 ? source : "", ["smallest", "middle", "largest"][i] || String(i + 1),
          pct(part.area_min) + "–" + pct(part.area_max), { text: str(part.n), num: true },
          metric(part.flagged), metric(part.found)]);
      });
    });
    if (!rows.length) { node.replaceChildren(el("caption", "not in this report")); return; }
    table(node, "Box area as a share of the image; found: a box at IoU ≥ " + num(sizes.iou, 1) +
      " on the fracture at the balanced threshold " + num(sizes.threshold, 4),
      ["Source", "Third", "Largest box", "Radiographs", "Flagged", "Found"], rows);
  }

  // --------------------------------------------------------------------------- curves (inline SVG)

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, String(attrs[k])); });
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function plot(container, spec) {
    // spec: {title, xlabel, ylabel, xmax, series: [{name, color, points: [[x, y]], markers}], dots: [{x, y, label}]}
    const W = 460, H = 360, L = 56, R = 16, T = 30, B = 48;
    const root = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": spec.title });
    root.append(svg("title", {}, spec.title));
    const xmax = spec.xmax || 1;
    const X = function (x) { return L + (W - L - R) * Math.min(1, Math.max(0, x / xmax)); };
    const Y = function (y) { return H - B - (H - T - B) * Math.min(1, Math.max(0, y)); };
    for (let i = 0; i <= 5; i++) {
      const gx = xmax * i / 5, gy = i / 5;
      root.append(svg("line", { x1: X(gx), y1: T, x2: X(gx), y2: H - B, stroke: "#ddd" }));
      root.append(svg("line", { x1: L, y1: Y(gy), x2: W - R, y2: Y(gy), stroke: "#ddd" }));
      root.append(svg("text", { x: X(gx), y: H - B + 16, "text-anchor": "middle", "font-size": 11, fill: "#333" }, +(gx.toFixed(2))));
      root.append(svg("text", { x: L - 6, y: Y(gy) + 4, "text-anchor": "end", "font-size": 11, fill: "#333" }, gy.toFixed(1)));
    }
    root.append(svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "none", stroke: "#555" }));
    root.append(svg("text", { x: (L + W - R) / 2, y: H - 10, "text-anchor": "middle", "font-size": 12, fill: "#111" }, spec.xlabel));
    root.append(svg("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle", "font-size": 12, fill: "#111",
      transform: "rotate(-90 14 " + (T + H - B) / 2 + ")" }, spec.ylabel));
    root.append(svg("text", { x: L, y: 18, "font-size": 13, "font-weight": 600, fill: "#111" }, spec.title));
    const drawn = spec.series.filter(function (s) { return s.points.length; });
    drawn.forEach(function (s) {
      const d = s.points.map(function (p, i) { return (i ? "L" : "M") + X(p[0]).toFixed(1) + " " + Y(p[1]).toFixed(1); }).join(" ");
      root.append(svg("path", { d: d, fill: "none", stroke: s.color, "stroke-width": 2 }));
      if (s.markers) s.points.forEach(function (p) { root.append(svg("circle", { cx: X(p[0]), cy: Y(p[1]), r: 2.5, fill: s.color })); });
    });
    (spec.dots || []).forEach(function (p) {
      root.append(svg("circle", { cx: X(p.x), cy: Y(p.y), r: 4.5, fill: "#111" }));
      root.append(svg("text", { x: X(p.x) - 6, y: Y(p.y) + 16, "text-anchor": "end", "font-size": 11, fill: "#111" }, p.label));
    });
    if (drawn.length) {  // legend on a white plate in the corner the curves usually leave empty
      const lw = 150, lh = 16 * drawn.length + 8;
      const lx = spec.legend === "lower-right" ? W - R - lw - 6 : L + 6;
      const ly = H - B - lh - 6;
      root.append(svg("rect", { x: lx, y: ly, width: lw, height: lh, fill: "#fff", stroke: "#999" }));
      drawn.forEach(function (s, i) {
        const y = ly + 16 * i + 16;
        root.append(svg("line", { x1: lx + 6, y1: y - 4, x2: lx + 26, y2: y - 4, stroke: s.color, "stroke-width": 3 }));
        root.append(svg("text", { x: lx + 32, y: y, "font-size": 11, fill: "#111" }, s.name));
      });
    }
    if (!drawn.length) root.append(svg("text", { x: (L + W - R) / 2, y: (T + H - B) / 2, "text-anchor": "middle", "font-size": 13, fill: "#333" }, "no points in the report"));
    container.replaceChildren(root);
  }

  function renderCurves(report) {
    const pr = report.pr_curve || {};
    const image = (Array.isArray(pr.image) ? pr.image : []).filter(function (p) { return isNum(p.recall) && isNum(p.precision); });
    const boxes = (Array.isArray(pr.box_iou50) ? pr.box_iou50 : []).filter(function (p) { return isNum(p.recall) && isNum(p.precision); });
    const dots = Object.keys(report.image_level || {}).map(function (mode) {
      const r = report.image_level[mode] || {};
      return { x: (r.sensitivity || {}).value, y: (r.ppv || {}).value, label: mode };
    }).filter(function (p) { return isNum(p.x) && isNum(p.y); });
    plot($("pr-plot"), {
      title: "Precision-recall, " + str(report.split), xlabel: "recall (sensitivity)", ylabel: "precision (PPV)",
      series: [
        { name: "image level", color: "#0072b2", points: image.map(function (p) { return [p.recall, p.precision]; }).sort(function (a, b) { return a[0] - b[0]; }) },
        { name: "boxes, IoU 0.5", color: "#d55e00", points: boxes.map(function (p) { return [p.recall, p.precision]; }) },
      ],
      dots: dots,
    });
    const froc = (Array.isArray(report.froc) ? report.froc : []).filter(function (p) { return isNum(p.fp_per_image) && isNum(p.sensitivity); })
      .map(function (p) { return [p.fp_per_image, p.sensitivity]; }).sort(function (a, b) { return a[0] - b[0]; });
    const maxFp = froc.reduce(function (m, p) { return Math.max(m, p[0]); }, 0);
    const xmax = maxFp <= 1 ? 1 : Math.ceil(maxFp);
    const iou = (report.localization || {}).iou;
    plot($("froc-plot"), {
      title: "FROC (IoU \u2265 " + (isNum(iou) ? iou : "?") + "), " + str(report.split), xlabel: "false-positive boxes per image",
      ylabel: "lesion sensitivity", xmax: xmax,
      series: [{ name: "lesions found", color: "#009e73", points: froc, markers: true }], legend: "lower-right",
    });
  }

  // --------------------------------------------------------------------------- start

  async function start() {
    setMinScore(Number(slider.value));
    const [cases, predictions, benchmark, report] = await Promise.all([
      loadData("cases.json"), loadData("predictions.json"), loadData("benchmark.json"), loadData("report.json"),
    ]);
    const status = $("data-status");
    if (Object.values(dataSources).indexOf("bundle") >= 0) {
      status.textContent = "Opened from disk: showing the copy of data/*.json in data/bundle.js" +
        (BoneR.bundleGenerated ? " (written " + BoneR.bundleGenerated + ")" : "") +
        ". Serve the folder (python -m http.server -d docs) or run make serve for the live files.";
    }
    // The real cases (cases.json) come first; predictions.json adds compare_overlay's images, or, without real
    // cases, the synthetic demo.
    const haveCases = !!(cases && Array.isArray(cases.images) && cases.images.length);
    if (haveCases) {
      state.cases = cases;
      state.modes = cases.modes && typeof cases.modes === "object" ? cases.modes : {};
      state.iou = isNum(cases.iou) ? cases.iou : 0.3;
      buildModePicker(state.modes);
      const mode = MODES.indexOf(cases.default_mode) >= 0 ? cases.default_mode : "balanced";
      if (state.modes[mode] && isNum(state.modes[mode].threshold)) setMinScore(state.modes[mode].threshold, mode);
      renderCredits(cases);
      cases.images.forEach(function (entry) {
        if (entry && typeof entry === "object") addScene(sceneFromCase(entry, cases), false);
      });
    }
    const havePredictions = !!(predictions && Array.isArray(predictions.images) && predictions.images.length);
    if (havePredictions && !(haveCases && predictions.synthetic)) {
      const models = Array.isArray(predictions.models) ? predictions.models : [];
      const thresholds = models.map(function (m) { return m && m.threshold; }).filter(isNum);
      if (thresholds.length && !haveCases) setMinScore(Math.floor(Math.min.apply(null, thresholds) * 100) / 100);
      const note = predictions.synthetic
        ? "Synthetic demo: phantom images and made-up boxes, not radiographs and not a trained model's output."
        : "Generated by " + str(predictions.generator, "compare_overlay.py") + (predictions.generated ? " on " + str(predictions.generated) : "") +
          ". " + (Array.isArray(predictions.notes) ? predictions.notes.join(" ") : "");
      predictions.images.forEach(function (entry) {
        if (entry && typeof entry === "object") addScene(sceneFrom(entry, models, predictions.synthetic, note), false);
      });
    } else if (!haveCases) {
      $("viewer-note").textContent = "No radiographs to show (data/cases.json is " + (dataSources["cases.json"] || "missing") +
        "). Write it with python -m scripts.make_site_cases.";
    }
    renderBenchmark(benchmark);
    renderReport(report);
    document.body.dataset.ready = "true";
  }

  start().catch(function (err) {
    $("data-status").textContent = "The page could not start: " + String(err && err.message ? err.message : err);
    document.body.dataset.ready = "error";
  });
})();
