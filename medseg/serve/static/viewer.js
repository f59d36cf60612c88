// medseg viewer: upload a scan to /predict, then scroll its slices with the predicted overlay.
// /results/<id>/view.json gives slices (image uint8, labels uint8 or uint16 as labels_dtype says) as base64,
// shape [slices, rows, columns].
// ?demo=<result id> (or ?result=) opens a kept result without uploading.
"use strict";

const PALETTE = [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
  [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40], [128, 0, 0]];
const $ = (id) => document.getElementById(id);
const state = { view: null, image: null, labels: null, slice: 0, opacity: 0.5, shown: new Set() };

// labels 1-12: the palette; above: hues a golden angle apart (never the same colour twice), alternating lightness
function colour(label) {
  if (label >= 1 && label <= PALETTE.length) return PALETTE[label - 1];
  const hue = (label * 137.50776) % 360, light = label % 2 ? 0.45 : 0.62;
  const k = (n) => (n + hue / 30) % 12, a = 0.85 * Math.min(light, 1 - light);
  const f = (n) => light - a * Math.max(-1, Math.min(k(n) - 3, 9 - k(n), 1));
  return [f(0), f(8), f(4)].map((v) => Math.round(255 * v));
}

function decode(b64, dtype = "uint8") {
  const text = atob(b64);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  if (dtype !== "uint16") return bytes;
  const view = new DataView(bytes.buffer), values = new Uint16Array(bytes.length / 2);
  for (let i = 0; i < values.length; i++) values[i] = view.getUint16(2 * i, true);  // little-endian
  return values;
}

// the JSON of a response, or, when the server (or a proxy) answered something else, an error with its status
async function readJson(response) {
  const text = await response.text();
  let data = null;
  try { data = JSON.parse(text); } catch (err) { data = null; }
  if (!response.ok) {
    const why = data && data.detail ? `${data.error}: ${data.detail}` : (response.statusText || text.slice(0, 200));
    throw new Error(`${response.status} ${why}`.trim());
  }
  if (data === null) throw new Error(`${response.status}: the server's answer is not JSON`);
  return data;
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(digits);
  if (Array.isArray(value)) return value.map((v) => fmt(v, digits)).join(" × ");
  return String(value);
}

function draw() {
  const view = state.view;
  if (!view) return;
  const [, rows, cols] = view.shape;
  const canvas = $("canvas");
  const plane = rows * cols, offset = state.slice * plane;
  const buffer = document.createElement("canvas");
  buffer.width = cols; buffer.height = rows;
  const ctx = buffer.getContext("2d");
  const pixels = ctx.createImageData(cols, rows);
  const a = state.opacity;
  for (let i = 0; i < plane; i++) {
    const grey = state.image[offset + i], label = state.labels[offset + i];
    let r = grey, g = grey, b = grey;
    if (label > 0 && state.shown.has(label)) {
      const c = colour(label);
      r = (1 - a) * grey + a * c[0]; g = (1 - a) * grey + a * c[1]; b = (1 - a) * grey + a * c[2];
    }
    pixels.data[4 * i] = r; pixels.data[4 * i + 1] = g; pixels.data[4 * i + 2] = b; pixels.data[4 * i + 3] = 255;
  }
  ctx.putImageData(pixels, 0, 0);
  // physical aspect ratio (row and column spacing), fitted into 512 x 512
  const width = cols * view.spacing_mm[2], height = rows * view.spacing_mm[1];
  const scale = 512 / Math.max(width, height);
  canvas.width = Math.round(width * scale); canvas.height = Math.round(height * scale);
  const out = canvas.getContext("2d");
  out.imageSmoothingEnabled = false;
  out.drawImage(buffer, 0, 0, canvas.width, canvas.height);
  $("slice-label").textContent = `${state.slice + 1} / ${view.shape[0]}`;
  $("opacity-label").textContent = `${Math.round(a * 100)}%`;
}

function busiestSlice(labels, shape) {
  const [slices, rows, cols] = shape, plane = rows * cols;
  let best = Math.floor(slices / 2), most = 0;
  for (let k = 0; k < slices; k++) {
    let n = 0;
    for (let i = k * plane; i < (k + 1) * plane; i++) if (labels[i] > 0) n++;
    if (n > most) { most = n; best = k; }
  }
  return best;
}

function showClasses(view) {
  const box = $("classes");
  box.replaceChildren();
  const present = new Set(state.labels);
  view.label_names.forEach((name, label) => {
    if (label === 0) return;
    const row = document.createElement("label");
    const check = document.createElement("input");
    check.type = "checkbox"; check.checked = true; check.dataset.label = label;
    check.addEventListener("change", () => {
      if (check.checked) state.shown.add(label); else state.shown.delete(label);
      draw();
    });
    const swatch = document.createElement("span");
    swatch.className = "swatch"; swatch.style.background = `rgb(${colour(label).join(",")})`;
    row.append(check, " ", swatch, `${name} (${label})${present.has(label) ? "" : " — none"}`);
    box.append(row);
    state.shown.add(label);
  });
}

function showSummary(summary, view) {
  const facts = $("facts");
  facts.replaceChildren();
  const rows = [["Case", summary.case], ["Patient", summary.patient], ["Model", `${summary.model} (arm ${summary.arm})`],
    ["Latency", `${fmt(summary.latency_s, 2)} s`], ["Doubt", fmt(summary.doubt, 4)], ["Input", summary.input],
    ["Shape", fmt(summary.shape)], ["Spacing (mm)", fmt(summary.spacing_mm, 2)]];
  if (summary.prediction) rows.splice(3, 0, ["Prediction", summary.prediction]);
  for (const [key, value] of rows) {
    if (value === undefined || value === null || value === "") continue;
    const tr = facts.insertRow();
    const th = document.createElement("th"); th.textContent = key;
    tr.append(th); tr.insertCell().textContent = value;
  }
  const structures = summary.structures || {};
  const is3d = Object.values(structures).some((s) => "volume_ml" in s);
  const table = $("structures");
  table.tHead.innerHTML = `<tr><th>Structure</th><th class="num">Voxels</th><th class="num">${is3d ? "Volume (ml)" : "Area (mm²)"}</th></tr>`;
  const body = table.tBodies[0];
  body.replaceChildren();
  for (const [name, s] of Object.entries(structures)) {
    const tr = body.insertRow();
    const cell = tr.insertCell();
    const label = Array.isArray(s.label) ? s.label[0] : s.label;
    const swatch = document.createElement("span");
    swatch.className = "swatch"; swatch.style.background = `rgb(${colour(label).join(",")})`;
    cell.append(swatch, name);
    const voxels = tr.insertCell(); voxels.className = "num"; voxels.textContent = s.voxels;
    const size = tr.insertCell(); size.className = "num"; size.textContent = fmt(is3d ? s.volume_ml : s.area_mm2, 3);
  }
  const links = $("downloads");
  links.replaceChildren();
  const names = { nifti: "Label map (NIfTI)", dicom_seg: "Segmentation (DICOM SEG)", summary: "Summary (JSON)" };
  for (const [key, name] of Object.entries(names)) {
    const href = (summary.downloads || {})[key];
    if (!href) continue;
    const a = document.createElement("a"); a.href = href; a.textContent = name; a.download = "";
    const li = document.createElement("li"); li.append(a); links.append(li);
  }
  $("results").hidden = false;
}

async function openResult(id) {
  const data = await readJson(await fetch(`/results/${encodeURIComponent(id)}/view.json`));
  state.view = data;
  state.image = decode(data.image); state.labels = decode(data.labels, data.labels_dtype);
  state.slice = busiestSlice(state.labels, data.shape);
  const slider = $("slice");
  slider.max = data.shape[0] - 1; slider.value = state.slice;
  state.shown = new Set();
  showClasses(data); showSummary(data.summary, data);
  $("orientation").textContent = data.shape[0] > 1
    ? "Axial slices, radiological view (patient's right on the left)" + (data.step > 1 ? `, every ${data.step}th pixel` : "")
    : "";
  $("placeholder").hidden = true; $("controls").hidden = false;
  draw();
}

async function upload(event) {
  event.preventDefault();
  const form = new FormData();
  const file = $("file").files[0];
  if (!file) return;
  form.append("file", file);
  for (const key of ["case", "patient"]) if ($(key).value.trim()) form.append(key, $(key).value.trim());
  $("submit").disabled = true;
  $("status").className = "muted"; $("status").textContent = `Uploading ${file.name} …`;
  try {
    const data = await readJson(await fetch("/predict", { method: "POST", body: form }));
    $("status").textContent = `Predicted by ${data.model} in ${fmt(data.latency_s, 2)} s`;
    history.replaceState(null, "", `?result=${data.result}`);
    await openResult(data.result);
  } catch (err) {
    $("status").className = "error"; $("status").textContent = err.message;
  } finally {
    $("submit").disabled = false;
  }
}

function init() {
  $("upload").addEventListener("submit", upload);
  $("slice").addEventListener("input", (e) => { state.slice = Number(e.target.value); draw(); });
  $("opacity").addEventListener("input", (e) => { state.opacity = Number(e.target.value) / 100; draw(); });
  $("canvas").addEventListener("wheel", (e) => {
    if (!state.view) return;
    e.preventDefault();
    const last = state.view.shape[0] - 1;
    state.slice = Math.min(last, Math.max(0, state.slice + (e.deltaY > 0 ? 1 : -1)));
    $("slice").value = state.slice; draw();
  }, { passive: false });
  fetch("/models").then((r) => r.json()).then((m) => {
    $("models").textContent = m.models.map((x) => `${x.name} (${x.task}, ${x.spatial_dims}D${m.models.length > 1 ? `, ${Math.round(x.share * 100)}%` : ""})`).join(" · ");
  }).catch(() => {});
  const params = new URLSearchParams(location.search);
  const id = params.get("demo") || params.get("result");
  if (id) openResult(id).catch((err) => { $("status").className = "error"; $("status").textContent = err.message; });
}

init();
