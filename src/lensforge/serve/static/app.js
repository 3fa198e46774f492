// The lensforge try-it page: pick a model, choose or drop an image, see the result.
// Plain JS, no build step, no external URLs. Talks to GET /ui/models, the native JSON
// route POST /v1/models/{name}/predict and, with the heat-map toggle on, POST /explain/{name}.
"use strict";

// Same palette, same order as lensforge.runtime.draw.PALETTE: a class has one colour everywhere.
const PALETTE = [
  [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
  [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
  [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
  [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128], [128, 128, 128],
];
const PREVIEW_MAX_SIDE = 1024; // canvas pixels: enough for a sharp preview, cheap for 50 MP photos

const $ = (id) => document.getElementById(id);
const models = new Map(); // name -> {name, task, classes, ready}
let currentFile = null;
let heatmapUrl = null; // object URL of the overlay shown, revoked when replaced
const preview = { shown: false, caption: "" }; // what the canvas shows, restored when the heat map goes off

function classColor(i) {
  return PALETTE[((i % PALETTE.length) + PALETTE.length) % PALETTE.length];
}
function rgb(c) {
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}
function textColor(c) {
  return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] >= 140 ? "#000" : "#fff";
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}
function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}
function setStatus(text) {
  $("status").textContent = text;
}

async function loadModels() {
  let body;
  try {
    const resp = await fetch("/ui/models");
    body = await resp.json();
    if (!resp.ok) throw new Error(errorMessage(body) || resp.statusText);
  } catch (err) {
    showError(`Could not list the models: ${err.message}`);
    return;
  }
  const select = $("model");
  select.textContent = "";
  for (const m of body.models) {
    models.set(m.name, m);
    const opt = document.createElement("option");
    opt.value = m.name;
    opt.textContent = `${m.name} (${m.task}, ${m.classes.length} classes)${m.ready ? "" : " — loading"}`;
    opt.selected = Boolean(m.default);
    select.appendChild(opt);
  }
  describeModel();
}

function describeModel() {
  const m = models.get($("model").value);
  $("model-info").textContent = m ? `classes: ${m.classes.join(", ")}` : "";
  // only classifiers whose bundle carries the explain graph answer /explain
  $("heatmap-row").hidden = !(m && m.explain);
}

function heatmapWanted() {
  const m = models.get($("model").value);
  return Boolean(m && m.explain && $("heatmap-toggle").checked);
}

function showCanvas() {
  $("heatmap").hidden = true;
  $("canvas").hidden = !preview.shown;
  $("caption").textContent = preview.caption;
}

async function showHeatmap(file) {
  const name = $("model").value;
  const form = new FormData();
  form.append("file", file, file.name);
  setStatus(`Explaining ${file.name} with ${name}…`);
  let resp;
  try {
    resp = await fetch(`/explain/${encodeURIComponent(name)}?format=png`, { method: "POST", body: form });
  } catch (err) {
    setStatus("");
    showError(`Could not reach the server for the heat map: ${err.message}`);
    return;
  }
  if (file !== currentFile || !heatmapWanted()) return; // a newer image, or the toggle went off meanwhile
  if (!resp.ok) {
    let body;
    try {
      body = await resp.json();
    } catch (err) {
      body = null;
    }
    setStatus("");
    showError(`Heat map: error ${resp.status} for ${file.name}: ${errorMessage(body) || resp.statusText}`);
    return;
  }
  const blob = await resp.blob();
  if (heatmapUrl) URL.revokeObjectURL(heatmapUrl);
  heatmapUrl = URL.createObjectURL(blob);
  const img = $("heatmap");
  img.onload = () => {
    if (file !== currentFile || !heatmapWanted()) return;
    img.alt = `heat map of ${file.name} for ${$("top-label").textContent}`;
    img.style.imageRendering = img.naturalWidth < 280 ? "pixelated" : "auto";
    $("canvas").hidden = true;
    img.hidden = false;
    $("caption").textContent = `heat map: ${img.naturalWidth} × ${img.naturalHeight} px`;
    setStatus(`Done: ${file.name} (heat map)`);
  };
  img.src = heatmapUrl;
}

function errorMessage(body) {
  if (!body || typeof body !== "object") return "";
  if (body.error && typeof body.error === "object") return body.error.message || "";
  return body.error || body.message || "";
}

async function previewBitmap(file) {
  try {
    return await createImageBitmap(file, { imageOrientation: "from-image" });
  } catch (err) {
    return null; // not an image the browser decodes (or not an image): the server will say which
  }
}

async function predict(file) {
  const name = $("model").value;
  if (!file) return;
  if (!name) {
    showError("No model to predict with: the server lists none.");
    return;
  }
  currentFile = file;
  clearError();
  setStatus(`Predicting ${file.name} with ${name}…`);
  $("result").setAttribute("aria-busy", "true");
  const form = new FormData();
  form.append("file", file, file.name);
  const started = performance.now();
  let resp, body;
  try {
    resp = await fetch(`/v1/models/${encodeURIComponent(name)}/predict`, { method: "POST", body: form });
    const text = await resp.text();
    try {
      body = JSON.parse(text);
    } catch (err) {
      body = { error: text.slice(0, 300) };
    }
  } catch (err) {
    setStatus("");
    showError(`Could not reach the server: ${err.message}`);
    $("result").removeAttribute("aria-busy");
    return;
  }
  const roundTrip = performance.now() - started;
  $("result").removeAttribute("aria-busy");
  if (file !== currentFile) return; // a newer image was chosen meanwhile
  if (!resp.ok) {
    setStatus("");
    $("result").hidden = true;
    showError(`Error ${resp.status} for ${file.name}: ${errorMessage(body) || resp.statusText}`);
    return;
  }
  const bitmap = await previewBitmap(file);
  render(file, body, bitmap, roundTrip);
  setStatus(`Done: ${file.name}`);
  if (heatmapWanted()) await showHeatmap(file);
}

function render(file, data, bitmap, roundTrip) {
  $("result").hidden = false;
  const isDetection = Array.isArray(data.detections);
  const model = models.get(data.model);
  const classes = model ? model.classes : Object.keys(data.scores || {});
  drawPreview(bitmap, isDetection ? data : null);
  const list = $("labels");
  list.textContent = "";
  let summary;
  if (isDetection) {
    const dets = data.detections;
    const counts = new Map();
    for (const d of dets) counts.set(d.label, (counts.get(d.label) || 0) + 1);
    summary = dets.length
      ? [...counts].map(([label, n]) => (n > 1 ? `${label} ×${n}` : label)).join(", ")
      : `no object above ${data.threshold.toFixed(2)}`;
    for (const d of dets) list.appendChild(row(d.label, d.score, d.class_id));
  } else {
    summary = data.labels.length ? data.labels.join(", ") : "(no label above its threshold)";
    for (const t of data.top) list.appendChild(row(t.label, t.score, classes.indexOf(t.label)));
  }
  $("top-label").textContent = summary;
  $("answered-by").textContent = model ? `${model.name} (${model.task})` : data.model;
  $("canvas").setAttribute("aria-label", `${file.name}: ${summary}`);
  $("latency").textContent =
    `Latency: ${Number(data.latency_ms).toFixed(1)} ms on the server, ${roundTrip.toFixed(0)} ms round trip`;
}

function row(label, score, classId) {
  const li = document.createElement("li");
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = label;
  const value = document.createElement("span");
  value.className = "score";
  value.textContent = score.toFixed(3);
  const bar = document.createElement("span");
  bar.className = "bar";
  bar.setAttribute("aria-hidden", "true");
  const fill = document.createElement("span");
  fill.style.width = `${Math.max(0, Math.min(1, score)) * 100}%`;
  fill.style.background = rgb(classColor(classId < 0 ? 0 : classId));
  bar.appendChild(fill);
  li.append(name, value, bar);
  return li;
}

function drawPreview(bitmap, detections) {
  const canvas = $("canvas");
  const caption = $("caption");
  $("heatmap").hidden = true; // a new result: the previous heat map no longer applies
  preview.shown = Boolean(bitmap);
  if (!bitmap) {
    canvas.hidden = true;
    caption.textContent = preview.caption = "This browser cannot preview this image format.";
    return;
  }
  canvas.hidden = false;
  const scale = Math.min(1, PREVIEW_MAX_SIDE / Math.max(bitmap.width, bitmap.height));
  const w = Math.max(1, Math.round(bitmap.width * scale));
  const h = Math.max(1, Math.round(bitmap.height * scale));
  canvas.width = w;
  canvas.height = h;
  canvas.style.imageRendering = w < 280 ? "pixelated" : "auto"; // small images are shown enlarged: keep them crisp
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0, w, h);
  caption.textContent = preview.caption = `${bitmap.width} × ${bitmap.height} px`;
  if (!detections) return;
  // boxes are in original-image pixels (xyxy); map them to the canvas
  const [iw, ih] = detections.image_size || [bitmap.width, bitmap.height];
  const sx = w / iw;
  const sy = h / ih;
  const side = Math.sqrt(w * h);
  const line = Math.max(2, Math.round(side * 0.003));
  const fontSize = Math.max(12, Math.round(side * 0.028));
  const pad = Math.max(2, Math.floor(fontSize / 5));
  ctx.font = `${fontSize}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  const ordered = [...detections.detections].sort((a, b) => a.score - b.score); // best drawn last
  for (const d of ordered) {
    const [x1, y1, x2, y2] = d.box;
    ctx.strokeStyle = rgb(classColor(d.class_id));
    ctx.lineWidth = line;
    ctx.strokeRect(x1 * sx + line / 2, y1 * sy + line / 2, Math.max(0, (x2 - x1) * sx - line), Math.max(0, (y2 - y1) * sy - line));
  }
  for (const d of ordered) {
    const color = classColor(d.class_id);
    const text = `${d.label} ${d.score.toFixed(2)}`;
    const tw = ctx.measureText(text).width + 2 * pad;
    const th = fontSize + pad;
    let top = d.box[1] * sy - th >= 0 ? d.box[1] * sy - th : d.box[1] * sy;
    top = Math.max(0, Math.min(top, h - th));
    const left = Math.max(0, Math.min(d.box[0] * sx, w - tw));
    ctx.fillStyle = rgb(color);
    ctx.fillRect(left, top, tw, th);
    ctx.fillStyle = textColor(color);
    ctx.fillText(text, left + pad, top + pad / 2);
  }
}

function setup() {
  const input = $("file");
  const drop = $("drop");
  $("form").addEventListener("submit", (e) => e.preventDefault()); // nothing to submit: a file predicts at once
  input.addEventListener("change", () => predict(input.files[0]));
  $("heatmap-toggle").addEventListener("change", () => {
    if (!currentFile || $("result").hidden) return;
    if (heatmapWanted()) {
      showHeatmap(currentFile);
    } else {
      showCanvas();
      setStatus(`Done: ${currentFile.name}`);
    }
  });
  $("model").addEventListener("change", () => {
    describeModel();
    if (currentFile) predict(currentFile);
  });
  drop.addEventListener("click", (e) => {
    if (e.target !== input && e.target.tagName !== "LABEL") input.click();
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) predict(file);
  });
  loadModels();
}

document.addEventListener("DOMContentLoaded", setup);
