// deepdigits drawing page: strokes -> PNG -> /api/predict (or /api/read-number), live while drawing.
"use strict";
const el = (id) => document.getElementById(id);
const pad = el("pad"), overlay = el("overlay"), drop = el("drop"), brush = el("brush");
const ctx = pad.getContext("2d");
const octx = overlay.getContext("2d");
let mode = "digit";
let strokes = [];        // each stroke: {w: line width, pts: [[x, y], ...]} in canvas pixels
let current = null;
let tap = null;          // a press on a digit's box (number mode) that selects it unless it turns into a stroke
let photo = null;        // {file, img, s, dx, dy}: an uploaded file, sent as is instead of the canvas
let reading = null;      // the last number read, for the boxes and the chosen digit
let chosen = null;       // index of the digit whose probabilities the bars show
let epoch = 0;           // bumped when the input is replaced: answers to older inputs are dropped
let maxBytes = 8 * 1024 * 1024;
let pending = null, inflight = false, again = false, lastSent = 0;

// Brush: a percentage of the canvas height (7.5%: 42 px of a digit's 560, 30 px of a number's 400).
function lineWidth() { return Math.max(2, Math.round(pad.height * Number(brush.value) / 100)); }
function showBrush() {
  const v = Number(brush.value), lo = Number(brush.min), hi = Number(brush.max);
  el("brush-dot").style.setProperty("--d", (6 + 20 * (v - lo) / (hi - lo)).toFixed(1) + "px");
  brush.setAttribute("aria-valuetext", `${lineWidth()} pixels of the ${pad.height}-pixel pad`);
}
brush.addEventListener("input", showBrush);

function redraw() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  if (photo && photo.img) ctx.drawImage(photo.img, photo.dx, photo.dy, photo.img.width * photo.s, photo.img.height * photo.s);
  ctx.strokeStyle = "#111";
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  for (const { w, pts } of strokes) {
    ctx.lineWidth = w;
    ctx.beginPath();
    ctx.moveTo(pts[0][0], pts[0][1]);
    for (const [x, y] of pts.slice(1)) ctx.lineTo(x, y);
    if (pts.length === 1) ctx.lineTo(pts[0][0] + 0.1, pts[0][1]);
    ctx.stroke();
  }
  el("hint").hidden = Boolean(strokes.length || photo);
}

function point(event) {
  const r = pad.getBoundingClientRect();
  return [(event.clientX - r.left) * pad.width / r.width, (event.clientY - r.top) * pad.height / r.height];
}

function startStroke(p) {
  if (photo) { photo = null; strokes = []; replaced(); reset(); }  // drawing replaces a photo and its answer
  current = { w: lineWidth(), pts: [p] };
  strokes.push(current);
  redraw();
}

pad.addEventListener("pointerdown", (e) => {
  e.preventDefault();
  pad.setPointerCapture(e.pointerId);
  const p = point(e), hit = boxAt(p);
  if (hit >= 0) tap = { p, index: hit, x: e.clientX, y: e.clientY };
  else startStroke(p);
});
pad.addEventListener("pointermove", (e) => {
  if (tap && Math.hypot(e.clientX - tap.x, e.clientY - tap.y) > 6) { startStroke(tap.p); tap = null; }
  if (!current) return;
  for (const ev of (e.getCoalescedEvents ? e.getCoalescedEvents() : [e])) current.pts.push(point(ev));
  redraw();
  schedule(false);
});
const finish = () => {
  if (tap) { choose(tap.index); tap = null; }
  if (current) { current = null; schedule(true); }
};
pad.addEventListener("pointerup", finish);
pad.addEventListener("pointercancel", finish);

el("clear").onclick = () => { strokes = []; photo = null; replaced(); redraw(); reset(); };
el("undo").onclick = () => {
  if (!strokes.length) return;
  strokes.pop(); redraw();
  if (strokes.length || photo) schedule(true); else { replaced(); reset(); }
};
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape") el("clear").onclick();
  if ((e.ctrlKey || e.metaKey) && e.key === "z") { e.preventDefault(); el("undo").onclick(); }
});

function setMode(m) {
  mode = m;
  for (const name of ["digit", "number"]) {
    el("mode-" + name).classList.toggle("active", m === name);
    el("mode-" + name).setAttribute("aria-selected", m === name);
  }
  drop.classList.toggle("number", m === "number");
  el("answer").classList.toggle("number", m === "number");
  el("hint-what").textContent = m === "number" ? "Write a number here" : "Draw a digit here";
  pad.width = overlay.width = m === "number" ? 1200 : 560;
  pad.height = overlay.height = m === "number" ? 400 : 560;
  strokes = []; photo = null; replaced(); redraw(); reset(); showBrush();
}
el("mode-digit").onclick = () => setMode("digit");
el("mode-number").onclick = () => setMode("number");

function showPhoto(file) {
  strokes = []; photo = { file }; replaced(); reset(); redraw();
  if (file.size > maxBytes) { failed(413, `${file.name}: ${file.size.toLocaleString()} bytes`, true); return; }
  const img = new Image();
  img.onload = () => {
    URL.revokeObjectURL(img.src);
    if (!photo || photo.file !== file) return;
    const s = Math.min(pad.width / img.width, pad.height / img.height);
    Object.assign(photo, { img, s, dx: (pad.width - img.width * s) / 2, dy: (pad.height - img.height * s) / 2 });
    redraw();
    schedule(true);
  };
  img.onerror = () => {  // the browser cannot show it; the server may still read it (TIFF), or say why not
    URL.revokeObjectURL(img.src);
    if (photo && photo.file === file) { status("Reading the file…"); schedule(true); }
  };
  img.src = URL.createObjectURL(file);
}
el("file").onchange = (e) => { if (e.target.files[0]) showPhoto(e.target.files[0]); e.target.value = ""; };
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("dragging"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("dragging"); }));
drop.addEventListener("drop", (e) => { const f = e.dataTransfer.files[0]; if (f) showPhoto(f); });

// Live recognition: at most one request in flight, at most ~6 a second while drawing.
// aria-busy on the answer: a reading is on its way (pending or in flight).
function busy(on) { el("answer").setAttribute("aria-busy", String(on)); }
function replaced() { epoch++; clearTimeout(pending); pending = null; if (!inflight) busy(false); }
function schedule(now) {
  clearTimeout(pending);
  busy(true);
  const wait = now ? 0 : Math.max(0, 160 - (Date.now() - lastSent));
  pending = setTimeout(() => { pending = null; send(); }, wait);
}

async function send() {
  if (!strokes.length && !photo) { if (!inflight) busy(false); return; }
  if (inflight) { again = true; return; }
  inflight = true; lastSent = Date.now();
  const sent = epoch, upload = Boolean(photo);
  try {
    const blob = photo ? photo.file : await new Promise((resolve) => pad.toBlob(resolve, "image/png"));
    const url = mode === "number" ? "/api/read-number" : "/api/predict";
    const response = await fetch(url, { method: "POST", headers: { "Content-Type": blob.type || "image/png" }, body: blob });
    const data = await response.json().catch(() => ({}));
    if (sent !== epoch) return;  // the drawing was cleared or replaced meanwhile
    if (!response.ok) failed(response.status, data.detail || response.statusText, upload);
    else if (mode === "number") showNumber(data);
    else showDigit(data);
  } catch (err) {
    if (sent === epoch) failed(0, err.message, upload);
  } finally {
    inflight = false;
    if (again) { again = false; schedule(true); } else if (!pending) busy(false);
  }
}

function status(text) { el("status").textContent = text; }

// A probability as a percentage that never rounds to a certainty it is not: ">99.9%", "<0.1%".
function pct(p) {
  if (p > 0.999 && p < 1) return ">99.9%";
  if (p > 0 && p < 0.0005) return "<0.1%";
  return (p * 100).toFixed(1) + "%";
}

function state(name) {  // empty | read | none (not a digit) | failed
  const answer = el("answer");
  for (const s of ["empty", "read", "none", "failed"]) answer.classList.toggle(s, s === name);
}

function reset() {
  state("empty");
  reading = null; chosen = null;
  const d = el("digit");
  d.textContent = "–"; d.className = "digit"; d.style.fontSize = "";
  el("confidence").textContent = mode === "number" ? "Write a number on the pad, or upload a photo"
    : "Draw a digit on the pad, or upload a photo";
  status("The answer, and how sure the network is, will appear here.");
  detail("");
  showBars(null);
  el("seen").removeAttribute("src"); el("seen-box").hidden = true;
  octx.clearRect(0, 0, overlay.width, overlay.height);
}

function detail(text) {
  el("detail").textContent = text ? "Details: " + text : "";
  el("detail").title = text;
}

// What went wrong, said to a person; the server's technical line stays below, small.
function friendly(code, text) {
  const t = String(text || "").toLowerCase(), what = mode === "number" ? "number" : "digit";
  if (code === 0) return "The server did not answer — check that it is still running, then try again.";
  if (code === 413) return `That image is too large (over ${Math.round(maxBytes / 1048576)} MB) — try a smaller photo, or crop it.`;
  if (code === 429 || code === 503) return "The server is busy — try again in a moment.";
  if (code >= 500) return "Something went wrong on the server — try again in a moment.";
  if (t.includes("no ink") || t.includes("blank")) return `There is no writing to read in that image — try a photo with darker ink, closer to the ${what}.`;
  if (t.includes("pixel")) return "That image has too many pixels — try a smaller photo.";
  if (t.includes("damaged") || t.includes("truncated")) return "That image looks damaged or cut short — try saving it again, or another photo.";
  if (code === 415 || t.includes("not an image") || t.includes("empty file")) return `That file isn't an image we can read — try a PNG or JPEG photo of a ${what}.`;
  return "The server could not read that — try another image.";
}

function failed(code, text, upload) {
  if (upload) { photo = null; strokes = []; replaced(); redraw(); }  // nothing of the failed file stays on the pad
  reset();
  state("failed");
  el("digit").textContent = "?"; el("digit").classList.add("unsure");
  el("confidence").textContent = friendly(code, text);
  status("");
  detail(code ? `${code} — ${text}` : text);
}

function showDigit(d) {
  state(d.not_a_digit ? "none" : "read");
  const digit = el("digit");
  digit.className = "digit"; digit.style.fontSize = "";
  if (d.seen) el("seen").src = d.seen; else el("seen").removeAttribute("src");
  el("seen-box").hidden = !d.seen;
  detail("");
  if (d.not_a_digit) {
    const reason = String(d.reason || "").replace(/^not a digit[\s:—-]*/i, "");
    digit.textContent = "✕";
    el("confidence").textContent = "Not a digit" + (reason ? " — " + reason : "");
    status(/number/i.test(reason) ? "" : photo ? "Try a photo of one digit, close up." : "Try one digit, drawn large.");
    showBars(null);
    return;
  }
  digit.textContent = String(d.digit);
  digit.classList.toggle("unsure", d.unsure);
  el("confidence").textContent = pct(d.confidence) + " sure" + (d.unsure ? " — unsure" : "");
  status(d.top.slice(1).map((t) => `${t.digit}: ${pct(t.probability)}`).join(" · "));
  showBars(d.probabilities, "Probability of each digit");
}

function showNumber(n) {
  const digits = n.not_a_digit ? [] : n.digits || [];
  reading = { ...n, digits };
  state(digits.length ? "read" : "none");
  detail("");
  el("seen").removeAttribute("src"); el("seen-box").hidden = true;
  const box = el("digit");
  box.className = "digit"; box.style.fontSize = "";
  box.replaceChildren(...digits.map((d, i) => {
    const b = document.createElement("button");
    b.type = "button"; b.className = "pick";
    b.classList.toggle("unsure", Boolean(d.unsure || d.not_a_digit));
    b.textContent = d.digit === null || d.digit === undefined ? "?" : String(d.digit);
    b.title = `Digit ${i + 1} of ${digits.length}: show its probabilities`;
    b.onclick = () => choose(i);
    return b;
  }));
  if (!digits.length || n.not_a_digit) {
    box.textContent = "✕";
    el("confidence").textContent = n.reason ? "Not a number — " + n.reason : "No digits found";
    status("Write the number larger and darker, digits side by side.");
    showBars(null); drawBoxes();
    return;
  }
  const unsure = digits.filter((d) => d.unsure || d.not_a_digit).length;
  el("confidence").textContent = digits.length + (digits.length === 1 ? " digit" : " digits") +
    (unsure ? ` — ${unsure} unsure (red)` : "");
  status("Click or tap a digit, or its box on the pad, to see its probabilities.");
  if (chosen === null || chosen >= digits.length) {
    chosen = Math.max(0, digits.findIndex((d) => d.unsure || d.not_a_digit));
  }
  choose(chosen);
  fit();
}

function choose(i) {
  if (!reading || !reading.digits || i >= reading.digits.length) return;
  chosen = i;
  const digits = reading.digits, d = digits[i];
  el("digit").querySelectorAll(".pick").forEach((b, k) => b.setAttribute("aria-pressed", String(k === i)));
  const which = `Digit ${i + 1} of ${digits.length}: `;
  if (d.not_a_digit) showBars(null, which + "not a digit" + (d.reason ? " — " + d.reason : ""));
  else showBars(d.probabilities, which + d.digit + ` — ${pct(d.confidence)} sure`);
  drawBoxes();
}

// Number mode never wraps: the number shrinks until it fits its box.
function fit() {
  const d = el("digit");
  if (mode !== "number") return;
  d.style.fontSize = "";
  for (let k = 0; k < 4 && d.scrollWidth > d.clientWidth; k++) {
    d.style.fontSize = Math.floor(parseFloat(getComputedStyle(d).fontSize) * d.clientWidth / d.scrollWidth) + "px";
  }
}
window.addEventListener("resize", () => { fit(); showBrush(); });

// Where the number's boxes lie on the canvas: the drawing was sent at canvas size, a photo scaled to fit.
function geometry() {
  if (!reading) return null;
  if (photo) return photo.img ? photo : null;
  return { s: pad.width / reading.width, dx: 0, dy: 0 };
}

function boxAt([x, y]) {
  const g = geometry();
  if (mode !== "number" || !g) return -1;
  const slack = 8 / g.s, u = (x - g.dx) / g.s, v = (y - g.dy) / g.s;  // a little slack around small boxes
  return reading.digits.findIndex(({ box: [x0, y0, x1, y1] }) =>
    u >= x0 - slack && u <= x1 + slack && v >= y0 - slack && v <= y1 + slack);
}

function drawBoxes() {
  octx.clearRect(0, 0, overlay.width, overlay.height);
  const g = geometry();
  if (!g) return;
  octx.font = "bold 28px system-ui, sans-serif";
  reading.digits.forEach((d, i) => {
    const [x0, y0, x1, y1] = d.box;
    const x = g.dx + x0 * g.s, y = g.dy + y0 * g.s, w = (x1 - x0) * g.s, h = (y1 - y0) * g.s;
    const colour = d.unsure || d.not_a_digit ? "#dc2626" : "#2563eb";
    if (i === chosen) { octx.fillStyle = colour + "22"; octx.fillRect(x, y, w, h); }
    octx.lineWidth = i === chosen ? 7 : 3;
    octx.strokeStyle = octx.fillStyle = colour;
    octx.strokeRect(x, y, w, h);
    octx.fillText(d.digit === null || d.digit === undefined ? "?" : String(d.digit), x + 4, Math.max(26, y - 8));
  });
}

function showBars(probabilities, label) {
  el("probs").hidden = !label;
  el("bars-label").textContent = label || "";
  const box = el("bars");
  box.hidden = !probabilities;
  if (!box.children.length) {
    for (let i = 0; i < 10; i++) {
      box.insertAdjacentHTML("beforeend", `<div class="row"><span class="label">${i}</span><div class="track">` +
        `<div class="fill" id="bar${i}"></div></div><span class="value" id="val${i}">0%</span></div>`);
    }
  }
  const p = probabilities || new Array(10).fill(0);
  const best = p.indexOf(Math.max(...p));
  p.forEach((v, i) => {
    el("bar" + i).style.width = (v * 100).toFixed(1) + "%";
    el("bar" + i).classList.toggle("best", i === best && v > 0);
    el("val" + i).textContent = pct(v);
  });
}

fetch("/api/model").then((r) => r.json()).then((m) => {
  const acc = m.test_metrics && m.test_metrics.accuracy ? ` — ${(m.test_metrics.accuracy * 100).toFixed(2)}% on the ${m.dataset} test set` : "";
  el("model").textContent = `Model: ${m.name}${m.parameters ? ", " + m.parameters.toLocaleString() + " parameters" : ""}${acc}`;
  if (m.limits && m.limits.max_upload_bytes) maxBytes = m.limits.max_upload_bytes;
}).catch(() => {});
redraw();
reset();
showBrush();
