// fedgin's QA page: the case table and a canvas viewer of each case (written for fedgin; no
// external files). Volumes are Z x Y x X uint8 arrays in RAS order (index grows towards the
// patient's superior, anterior, right), zlib data in base64 in <script type="text/plain"> tags.
"use strict";

const DATA = JSON.parse(document.getElementById("qa-data").textContent);
const CT_PRESETS = [["abdomen (W400 L40)", 40, 400], ["liver (W150 L30)", 30, 150],
                    ["bone (W1800 L400)", 400, 1800], ["lung (W1500 L-600)", -600, 1500]];
const MRI_PRESETS = [["1-99th percentile", 1, 99], ["0.5-99.5th percentile", 0.5, 99.5],
                     ["5-95th percentile", 5, 95]];
const qa = { ready: false, loaded: null, loading: null, errors: [], state: null };
window.qa = qa;

const $ = (id) => document.getElementById(id);
const fmt = (v, d) => (v === null || v === undefined || Number.isNaN(v)) ? "-" : Number(v).toFixed(d);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "title") node.title = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function hexRgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

// ---------------------------------------------------------------- the case table
const ORGANS = DATA.organs;
const isEval = DATA.kind === "evaluation";

function flags(c) {
  if (!c.metrics) return { missed: [], fp: [] };
  const missed = ORGANS.filter((o) => c.metrics[o] && c.metrics[o].missed);
  const fp = ORGANS.filter((o) => c.metrics[o] && c.metrics[o].false_positive);
  return { missed, fp };
}

function columns() {
  const cols = [{ key: "case", label: "case", cls: "name", value: (c) => c.case, text: (c) => c.case },
                { key: "modality", label: "mod.", cls: "name", value: (c) => c.modality, text: (c) => c.modality }];
  if (isEval) {
    cols.push({ key: "mean_dice", label: "mean Dice", value: (c) => c.mean_dice, text: (c) => fmt(c.mean_dice, 3),
                bad: (c) => c.mean_dice !== null && c.mean_dice < 0.5 });
    cols.push({ key: "flags", label: "missed / FP", cls: "name",
                value: (c) => { const f = flags(c); return f.missed.length + f.fp.length; },
                text: (c) => { const f = flags(c); return [...f.missed.map((o) => "missed " + o), ...f.fp.map((o) => "FP " + o)].join(", "); },
                bad: (c) => { const f = flags(c); return f.missed.length + f.fp.length > 0; } });
  }
  cols.push({ key: "warnings", label: "warnings", value: (c) => c.warnings.length, text: (c) => c.warnings.length || "",
              title: (c) => c.warnings.join("\n"), warn: (c) => c.warnings.length > 0 });
  for (const o of ORGANS) {
    if (isEval) {
      cols.push({ key: o + ":dice", label: o + " Dice", value: (c) => c.metrics[o] ? c.metrics[o].dice : null,
                  text: (c) => fmt(c.metrics[o] && c.metrics[o].dice, 3),
                  bad: (c) => c.metrics[o] && c.metrics[o].dice !== null && c.metrics[o].dice < 0.5 });
      cols.push({ key: o + ":hd95", label: o + " HD95 mm", value: (c) => c.metrics[o] ? c.metrics[o].hd95 : null,
                  text: (c) => fmt(c.metrics[o] && c.metrics[o].hd95, 1) });
    }
    cols.push({ key: o + ":ml", label: o + " ml", value: (c) => c.organs[o] ? c.organs[o].volume_ml : null,
                text: (c) => fmt(c.organs[o] && c.organs[o].volume_ml, 0),
                warn: (c) => c.warnings.some((w) => w.startsWith(o + " ")) });
  }
  return cols;
}

const COLS = columns();
const sort = isEval ? { key: "mean_dice", dir: 1 } : { key: "warnings", dir: -1 };

function compare(col, a, b) {
  const va = col.value(a), vb = col.value(b);
  const na = va === null || va === undefined, nb = vb === null || vb === undefined;
  if (na || nb) return na === nb ? 0 : (na ? 1 : -1);  // no value: always last
  if (typeof va === "string") return sort.dir * va.localeCompare(vb);
  return sort.dir * (va - vb);
}

function drawTable() {
  const head = el("tr");
  for (const col of COLS) {
    const th = el("th", { class: (col.cls || "") + (sort.key === col.key ? (sort.dir > 0 ? " sorted-asc" : " sorted-desc") : "") }, col.label);
    th.addEventListener("click", () => {
      sort.dir = sort.key === col.key ? -sort.dir : (col.key === "warnings" || col.key === "flags" ? -1 : 1);
      sort.key = col.key;
      drawTable();
    });
    head.append(th);
  }
  $("case-table").tHead.replaceChildren(head);
  const col = COLS.find((c) => c.key === sort.key);
  const order = DATA.cases.map((c, i) => i).sort((i, j) => compare(col, DATA.cases[i], DATA.cases[j]) || (i - j));
  const body = $("case-table").tBodies[0];
  body.replaceChildren();
  for (const i of order) {
    const c = DATA.cases[i];
    const row = el("tr", { "data-index": i });
    if (qa.state && qa.state.index === i) row.classList.add("selected");
    for (const k of COLS) {
      const cls = [k.cls || "", k.bad && k.bad(c) ? "bad" : "", k.warn && k.warn(c) ? "warn" : ""].join(" ").trim();
      row.append(el("td", { class: cls, title: k.title ? k.title(c) : "" }, k.text(c)));
    }
    row.addEventListener("click", () => loadCase(i));
    body.append(row);
  }
  return order;
}

// ---------------------------------------------------------------- decoding
function base64Bytes(id) {
  const binary = atob($(id).textContent);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

async function inflate(id) {  // a label map: zlib
  const stream = new Blob([base64Bytes(id)]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

async function decodeScan(id, [nz, ny, nx]) {  // the scan: one WebP picture of its axial slices
  const columns = Number($(id).dataset.columns);
  const picture = await createImageBitmap(new Blob([base64Bytes(id)], { type: "image/webp" }),
    { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = document.createElement("canvas");
  canvas.width = picture.width; canvas.height = picture.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(picture, 0, 0);
  picture.close();
  const rgba = ctx.getImageData(0, 0, canvas.width, canvas.height).data, out = new Uint8Array(nz * ny * nx);
  for (let z = 0; z < nz; z++) {
    const top = Math.floor(z / columns) * ny, left = (z % columns) * nx;
    for (let y = 0; y < ny; y++) {
      let from = ((top + y) * canvas.width + left) * 4;
      const to = (z * ny + y) * nx;
      for (let x = 0; x < nx; x++, from += 4) out[to + x] = Math.round((rgba[from] + rgba[from + 1] + rgba[from + 2]) / 3);
    }
  }
  return out;
}

function codeValues(codes, values) {  // code 0..255 -> intensity (piecewise linear)
  const out = new Float32Array(256);
  for (let c = 0; c < 256; c++) {
    let k = 0;
    while (k < codes.length - 2 && c > codes[k + 1]) k++;
    const t = (c - codes[k]) / Math.max(1, codes[k + 1] - codes[k]);
    out[c] = values[k] + Math.min(1, Math.max(0, t)) * (values[k + 1] - values[k]);
  }
  return out;
}

function percentile(histogram, total, p) {  // the code at percentile p of the voxels counted
  let seen = 0;
  for (let c = 0; c < 256; c++) { seen += histogram[c]; if (seen >= total * p / 100) return c; }
  return 255;
}

// ---------------------------------------------------------------- the viewer
function geometry(v, plane, s) {  // screen (row, col) -> voxel offset: start + r * dr + c * dc
  const [nz, ny, nx] = v.shape, [sz, sy, sx] = v.spacing, slab = ny * nx;
  if (plane === "axial")  // anterior up, the patient's right on the left
    return { w: nx, h: ny, n: nz, pw: sx, ph: sy, start: s * slab + (ny - 1) * nx + nx - 1, dr: -nx, dc: -1 };
  if (plane === "coronal")  // superior up, the patient's right on the left
    return { w: nx, h: nz, n: ny, pw: sx, ph: sz, start: (nz - 1) * slab + s * nx + nx - 1, dr: -slab, dc: -1 };
  return { w: ny, h: nz, n: nx, pw: sy, ph: sz, start: (nz - 1) * slab + (ny - 1) * nx + s, dr: -slab, dc: -nx };
}

function render() {
  const st = qa.state;
  if (!st || !st.vol) return;
  const v = st.vol, g = geometry(v, st.plane, st.slice[st.plane]);
  const off = st.offscreen;
  off.width = g.w; off.height = g.h;
  const octx = off.getContext("2d"), img = octx.createImageData(g.w, g.h), px = img.data;
  const lo = st.level - st.width / 2, scale = 255 / Math.max(1e-6, st.width);
  const grey = new Uint8ClampedArray(256);
  for (let c = 0; c < 256; c++) grey[c] = (v.lut[c] - lo) * scale;
  const fill = st.overlay === "pred" || st.overlay === "both" ? v.pred : (st.overlay === "ref" ? v.ref : null);
  const outline = st.overlay === "both" ? v.ref : null;
  const a = st.opacity, colours = st.colours;
  let p = 0;
  for (let r = 0; r < g.h; r++) {
    for (let c = 0; c < g.w; c++, p += 4) {
      const o = g.start + r * g.dr + c * g.dc;
      let R = grey[v.image[o]], G = R, B = R;
      const l = fill ? fill[o] : 0;
      if (l && colours[l]) { const k = colours[l]; R += (k[0] - R) * a; G += (k[1] - G) * a; B += (k[2] - B) * a; }
      if (outline) {
        const q = outline[o];
        if (q && colours[q] && ((r > 0 && outline[o - g.dr] !== q) || (r < g.h - 1 && outline[o + g.dr] !== q) ||
                                (c > 0 && outline[o - g.dc] !== q) || (c < g.w - 1 && outline[o + g.dc] !== q))) {
          [R, G, B] = colours[q];
        }
      }
      px[p] = R; px[p + 1] = G; px[p + 2] = B; px[p + 3] = 255;
    }
  }
  octx.putImageData(img, 0, 0);
  const canvas = $("view"), fit = 540 / Math.max(g.w * g.pw, g.h * g.ph);
  canvas.width = Math.max(1, Math.round(g.w * g.pw * fit));
  canvas.height = Math.max(1, Math.round(g.h * g.ph * fit));
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, 0, 0, canvas.width, canvas.height);
  st.geometry = g;
  const slider = $("slice");
  slider.max = g.n - 1; slider.value = st.slice[st.plane];
  $("slice-text").textContent = `${st.slice[st.plane] + 1} / ${g.n}`;
}

function busiestSlice(labels, v, plane) {  // the slice of ``plane`` with the most foreground
  const [nz, ny, nx] = v.shape, counts = new Float64Array(plane === "axial" ? nz : plane === "coronal" ? ny : nx);
  for (let z = 0, o = 0; z < nz; z++) for (let y = 0; y < ny; y++) for (let x = 0; x < nx; x++, o++) {
    if (labels[o]) counts[plane === "axial" ? z : plane === "coronal" ? y : x]++;
  }
  let best = Math.floor(counts.length / 2), most = 0;
  counts.forEach((n, i) => { if (n > most) { most = n; best = i; } });
  return best;
}

function setWindow(level, width) {
  qa.state.level = level; qa.state.width = width;
  $("level").value = Number(level.toFixed(1)); $("width").value = Number(width.toFixed(1));
  render();
}

function applyPreset() {
  const st = qa.state, v = st.vol, choice = $("window-preset").value;
  if (!v || choice === "custom") return;
  const preset = (v.modality === "CT" ? CT_PRESETS : MRI_PRESETS)[Number(choice)];
  if (v.modality === "CT") { setWindow(preset[1], preset[2]); return; }
  const lo = v.lut[percentile(v.histogram, v.counted, preset[1])], hi = v.lut[percentile(v.histogram, v.counted, preset[2])];
  setWindow((lo + hi) / 2, Math.max(1e-3, hi - lo));
}

function presetOptions(modality) {
  const presets = modality === "CT" ? CT_PRESETS : MRI_PRESETS;
  $("window-preset").replaceChildren(...presets.map((p, i) => el("option", { value: i }, p[0])),
                                     el("option", { value: "custom" }, "custom"));
}

function caseInfo(c) {
  const head = el("tr", {}, el("th", {}, "organ"));
  const cols = isEval ? ["Dice", "HD95 mm", "pred. ml", "ref. ml"] : ["ml"];
  for (const k of [...cols, "mean \u00b1 sd"]) head.append(el("th", {}, k));
  const table = el("table", {}, head);
  for (const o of ORGANS) {
    const s = c.organs[o] || {}, m = (c.metrics || {})[o] || {};
    const cells = isEval ? [fmt(m.dice, 3), fmt(m.hd95, 1), fmt(s.volume_ml, 1), fmt(s.reference_ml, 1)] : [fmt(s.volume_ml, 1)];
    const intensity = s.mean === null || s.mean === undefined ? "-" : `${fmt(s.mean, 0)} \u00b1 ${fmt(s.sd, 0)}`;
    const note = isEval && !(c.annotated || []).includes(o) ? " (not annotated)" : "";
    table.append(el("tr", {}, el("td", {}, o + note), ...[...cells, intensity].map((t) => el("td", {}, t))));
  }
  const parts = [table, el("div", { class: "hint" }, `intensity: ${c.intensity || "-"}`)];
  if (c.warnings.length) parts.push(el("ul", {}, ...c.warnings.map((w) => el("li", {}, "plausibility: " + w))));
  $("case-info").replaceChildren(...parts);
}

async function loadCase(i) {
  const c = DATA.cases[i];
  qa.loading = c.case;
  qa.state.index = i;
  for (const row of $("case-table").tBodies[0].rows) row.classList.toggle("selected", Number(row.dataset.index) === i);
  $("viewer-title").textContent = `${c.case} (${c.modality}${c.dataset ? ", " + c.dataset : ""})`;
  caseInfo(c);
  if (!c.view) {
    qa.state.vol = null;
    const ctx = $("view").getContext("2d");
    ctx.fillStyle = "#000"; ctx.fillRect(0, 0, $("view").width, $("view").height);
    $("probe").textContent = "no images stored for this case (written with --no-qa, or the scans were not there)";
    qa.loaded = c.case;
    return;
  }
  const v = { ...c.view, modality: c.modality }, id = `qa-v${c.view_index}`;
  v.image = await decodeScan(`${id}-image`, v.shape);
  v.pred = await inflate(`${id}-pred`);
  v.ref = v.has_ref ? await inflate(`${id}-ref`) : null;
  if (qa.loading !== c.case) return;  // another case was clicked meanwhile
  v.lut = codeValues(v.codes, v.values);
  v.histogram = new Float64Array(256);
  for (const code of v.image) v.histogram[code]++;
  v.counted = v.image.length - (c.modality === "CT" ? 0 : v.histogram[0]);  // MRI: leave out the empty background
  if (c.modality !== "CT") v.histogram[0] = 0;
  const labels = v.pred.some((x) => x) || !v.ref ? v.pred : v.ref;
  qa.state.vol = v;
  for (const plane of ["axial", "coronal", "sagittal"]) qa.state.slice[plane] = busiestSlice(labels, v, plane);
  $("overlay").querySelector('option[value="ref"]').disabled = !v.ref;
  $("overlay").querySelector('option[value="both"]').disabled = !v.ref;
  if (!v.ref && qa.state.overlay !== "none") { qa.state.overlay = "pred"; $("overlay").value = "pred"; }
  presetOptions(c.modality);
  $("window-preset").value = "0";
  applyPreset();
  $("probe").innerHTML = "&nbsp;";
  qa.loaded = c.case;
}

function probe(event) {
  const st = qa.state, g = st.geometry;
  if (!st.vol || !g) return;
  const rect = $("view").getBoundingClientRect();
  const c = Math.floor((event.clientX - rect.left) / rect.width * g.w), r = Math.floor((event.clientY - rect.top) / rect.height * g.h);
  if (c < 0 || r < 0 || c >= g.w || r >= g.h) return;
  const o = g.start + r * g.dr + c * g.dc, v = st.vol, name = (l) => l ? ORGANS[l - 1] : "background";
  const unit = v.modality === "CT" ? " HU" : "";
  $("probe").textContent = `intensity ${fmt(v.lut[v.image[o]], 0)}${unit} \u00b7 prediction ${name(v.pred[o])}` +
    (v.ref ? ` \u00b7 reference ${name(v.ref[o])}` : "");
}

function step(delta) {
  const st = qa.state, g = st.geometry;
  if (!st.vol || !g) return;
  st.slice[st.plane] = Math.min(g.n - 1, Math.max(0, st.slice[st.plane] + delta));
  render();
}

function init() {
  const colours = {};
  for (const [organ, hex] of Object.entries(DATA.colours)) colours[DATA.labels[organ]] = hexRgb(hex);
  qa.state = { index: null, vol: null, plane: "axial", slice: {}, overlay: "pred", opacity: 0.45,
               level: 40, width: 400, colours, offscreen: document.createElement("canvas"), geometry: null };
  const n = DATA.cases.length, warned = DATA.cases.filter((c) => c.warnings.length).length;
  $("qa-overview").textContent = `${n} case(s); ${warned} with plausibility warnings; drawn ${DATA.drawn}.`;
  $("legend").replaceChildren(...ORGANS.map((o) => el("span", {}, el("i", { style: `background:${DATA.colours[o]}` }), o)));
  $("provenance-table").replaceChildren(...DATA.provenance.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v))));
  for (const input of document.querySelectorAll('input[name="plane"]')) {
    input.addEventListener("change", () => { qa.state.plane = input.value; render(); });
  }
  $("slice").addEventListener("input", () => { qa.state.slice[qa.state.plane] = Number($("slice").value); render(); });
  $("overlay").addEventListener("change", () => { qa.state.overlay = $("overlay").value; render(); });
  $("opacity").addEventListener("input", () => { qa.state.opacity = Number($("opacity").value) / 100; render(); });
  $("window-preset").addEventListener("change", applyPreset);
  for (const id of ["level", "width"]) {
    $(id).addEventListener("change", () => {
      $("window-preset").value = "custom";
      setWindow(Number($("level").value), Math.max(1e-3, Number($("width").value)));
    });
  }
  const canvas = $("view");
  canvas.addEventListener("mousemove", probe);
  canvas.addEventListener("wheel", (e) => { e.preventDefault(); step(e.deltaY > 0 ? -1 : 1); }, { passive: false });
  canvas.addEventListener("keydown", (e) => {
    if (e.key === "ArrowUp" || e.key === "PageUp") { e.preventDefault(); step(1); }
    if (e.key === "ArrowDown" || e.key === "PageDown") { e.preventDefault(); step(-1); }
  });
  const order = drawTable();
  const first = order.length ? loadCase(order[0]) : Promise.resolve();
  first.then(() => { qa.ready = true; }, (err) => { qa.errors.push(String(err)); console.error(err); });
}

if (typeof DecompressionStream === "undefined") {
  document.body.prepend(el("p", { class: "bad" }, "This browser lacks DecompressionStream: open the page in a current Chrome, Edge, Firefox or Safari."));
}
init();
