// deepdigits drawing page: strokes -> PNG -> /api/predict (or /api/read-number), live while drawing.
"use strict";
const pad = document.getElementById("pad");
const overlay = document.getElementById("overlay");
const drop = document.getElementById("drop");
const ctx = pad.getContext("2d");
const octx = overlay.getContext("2d");
const el = (id) => document.getElementById(id);
let mode = "digit";
let strokes = [];        // each stroke: array of [x, y] in canvas pixels
let current = null;
let photo = null;        // an uploaded File, sent as is instead of the canvas
let pending = null, inflight = false, again = false, lastSent = 0;

function lineWidth() { return Math.round(pad.height * 0.075); }

function redraw() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  ctx.strokeStyle = "#111";
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.lineWidth = lineWidth();
  for (const s of strokes) {
    ctx.beginPath();
    ctx.moveTo(s[0][0], s[0][1]);
    for (const [x, y] of s.slice(1)) ctx.lineTo(x, y);
    if (s.length === 1) ctx.lineTo(s[0][0] + 0.1, s[0][1]);
    ctx.stroke();
  }
  el("hint").style.display = strokes.length || photo ? "none" : "flex";
}

function point(event) {
  const r = pad.getBoundingClientRect();
  return [(event.clientX - r.left) * pad.width / r.width, (event.clientY - r.top) * pad.height / r.height];
}

pad.addEventListener("pointerdown", (e) => {
  e.preventDefault();
  if (photo) { photo = null; strokes = []; }
  pad.setPointerCapture(e.pointerId);
  current = [point(e)];
  strokes.push(current);
  redraw();
});
pad.addEventListener("pointermove", (e) => {
  if (!current) return;
  for (const ev of (e.getCoalescedEvents ? e.getCoalescedEvents() : [e])) current.push(point(ev));
  redraw();
  schedule(false);
});
const finish = () => { if (current) { current = null; schedule(true); } };
pad.addEventListener("pointerup", finish);
pad.addEventListener("pointercancel", finish);

el("clear").onclick = () => { strokes = []; photo = null; redraw(); reset(); };
el("undo").onclick = () => { strokes.pop(); redraw(); strokes.length ? schedule(true) : reset(); };
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape") el("clear").onclick();
  if ((e.ctrlKey || e.metaKey) && e.key === "z") { e.preventDefault(); el("undo").onclick(); }
});

function setMode(m) {
  mode = m;
  el("mode-digit").classList.toggle("active", m === "digit");
  el("mode-number").classList.toggle("active", m === "number");
  el("mode-digit").setAttribute("aria-selected", m === "digit");
  el("mode-number").setAttribute("aria-selected", m === "number");
  drop.classList.toggle("number", m === "number");
  pad.width = overlay.width = m === "number" ? 1200 : 560;
  pad.height = overlay.height = m === "number" ? 400 : 560;
  strokes = []; photo = null; redraw(); reset();
}
el("mode-digit").onclick = () => setMode("digit");
el("mode-number").onclick = () => setMode("number");

function showPhoto(file) {
  photo = file;
  strokes = [];
  const img = new Image();
  img.onload = () => {
    redraw();
    const s = Math.min(pad.width / img.width, pad.height / img.height);
    ctx.drawImage(img, (pad.width - img.width * s) / 2, (pad.height - img.height * s) / 2, img.width * s, img.height * s);
    photo.scale = s; photo.dx = (pad.width - img.width * s) / 2; photo.dy = (pad.height - img.height * s) / 2;
    URL.revokeObjectURL(img.src);
    schedule(true);
  };
  img.onerror = () => { status("That file is not an image the browser can show; sending it anyway."); schedule(true); };
  img.src = URL.createObjectURL(file);
}
el("file").onchange = (e) => { if (e.target.files[0]) showPhoto(e.target.files[0]); e.target.value = ""; };
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("dragging"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("dragging"); }));
drop.addEventListener("drop", (e) => { const f = e.dataTransfer.files[0]; if (f) showPhoto(f); });

// Live recognition: at most one request in flight, at most ~6 a second while drawing.
function schedule(now) {
  clearTimeout(pending);
  const wait = now ? 0 : Math.max(0, 160 - (Date.now() - lastSent));
  pending = setTimeout(send, wait);
}

async function body() {
  if (photo) return photo;
  return await new Promise((resolve) => pad.toBlob(resolve, "image/png"));
}

async function send() {
  if (!strokes.length && !photo) return;
  if (inflight) { again = true; return; }
  inflight = true; lastSent = Date.now();
  try {
    const blob = await body();
    const url = mode === "number" ? "/api/read-number" : "/api/predict";
    const response = await fetch(url, { method: "POST", headers: { "Content-Type": blob.type || "image/png" }, body: blob });
    const data = await response.json();
    if (!response.ok) { showError(data.detail || response.statusText); return; }
    mode === "number" ? showNumber(data) : showDigit(data);
  } catch (err) {
    showError("The server did not answer (" + err.message + ")");
  } finally {
    inflight = false;
    if (again) { again = false; schedule(true); }
  }
}

function status(text) { el("status").textContent = text; }

function reset() {
  el("digit").textContent = "–"; el("digit").classList.remove("unsure");
  el("confidence").textContent = "Draw something"; status("");
  bars(new Array(10).fill(0)); el("seen").removeAttribute("src");
  octx.clearRect(0, 0, overlay.width, overlay.height);
}

function showError(text) {
  el("digit").textContent = "?"; el("digit").classList.add("unsure");
  el("confidence").textContent = "Could not read that"; status(text);
  octx.clearRect(0, 0, overlay.width, overlay.height);
}

function showDigit(d) {
  el("digit").textContent = String(d.digit);
  el("digit").classList.toggle("unsure", d.unsure);
  el("confidence").textContent = (d.confidence * 100).toFixed(1) + "% sure" + (d.unsure ? " — unsure" : "");
  status(d.top.slice(1).map((t) => `${t.digit}: ${(t.probability * 100).toFixed(1)}%`).join("   "));
  bars(d.probabilities);
  el("seen").src = d.seen;
}

function showNumber(n) {
  el("digit").textContent = n.number;
  el("digit").classList.toggle("unsure", n.unsure);
  el("confidence").textContent = n.digits.length + (n.digits.length === 1 ? " digit" : " digits") + (n.unsure ? " — some unsure" : "");
  status(n.digits.map((d) => `${d.digit}: ${(d.confidence * 100).toFixed(0)}%`).join("   "));
  bars(n.digits.length ? n.digits[n.digits.length - 1].probabilities : new Array(10).fill(0));
  el("seen").removeAttribute("src");
  octx.clearRect(0, 0, overlay.width, overlay.height);
  const s = photo ? photo.scale || 1 : pad.width / n.width;
  const dx = photo ? photo.dx || 0 : 0, dy = photo ? photo.dy || 0 : 0;
  octx.lineWidth = 4; octx.font = "bold 28px system-ui, sans-serif";
  for (const d of n.digits) {
    const [x0, y0, x1, y1] = d.box;
    octx.strokeStyle = octx.fillStyle = d.unsure ? "#dc2626" : "#2563eb";
    octx.strokeRect(dx + x0 * s, dy + y0 * s, (x1 - x0) * s, (y1 - y0) * s);
    octx.fillText(String(d.digit), dx + x0 * s + 4, Math.max(26, dy + y0 * s - 6));
  }
}

function bars(probabilities) {
  const box = el("bars");
  if (!box.children.length) {
    for (let i = 0; i < 10; i++) {
      box.insertAdjacentHTML("beforeend", `<span class="label">${i}</span><div class="track"><div class="fill" id="bar${i}"></div></div><span class="value" id="val${i}">0%</span>`);
    }
  }
  const best = probabilities.indexOf(Math.max(...probabilities));
  probabilities.forEach((p, i) => {
    el("bar" + i).style.width = (p * 100).toFixed(1) + "%";
    el("bar" + i).classList.toggle("best", i === best && p > 0);
    el("val" + i).textContent = (p * 100).toFixed(1) + "%";
  });
}

fetch("/api/model").then((r) => r.json()).then((m) => {
  const acc = m.test_metrics && m.test_metrics.accuracy ? ` — ${(m.test_metrics.accuracy * 100).toFixed(2)}% on the ${m.dataset} test set` : "";
  el("model").textContent = `Model: ${m.name}${m.parameters ? ", " + m.parameters.toLocaleString() + " parameters" : ""}${acc}`;
}).catch(() => {});
redraw();
reset();
