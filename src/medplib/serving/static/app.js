// The medplib web page: open an image, draw regions (point, box, free-form pen), ask, and see the
// answer stream in with the mask overlaid. Talks only to this server's own /v1 API.
"use strict";

const COLORS = [[255, 64, 64], [64, 200, 255], [255, 200, 0], [120, 255, 120]];
const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");

const state = {
  image: null,        // HTMLImageElement of the PNG the model sees
  imageUrl: null,     // its data URL, sent with every question
  tool: "none",
  pending: [],        // regions drawn for the next question
  asked: [],          // regions of the last question, drawn until the next one
  drag: null,         // the region being drawn
  turns: [],          // [{role, text, regions}] of this conversation
  masks: [],          // [{tinted: canvas, png: base64}] of the last answer
  examples: [],       // [{image, mask, name}] in-context example pairs (data URLs), sent with every question
  exampleDraft: {},   // the example image and mask chosen but not added yet
  busy: false,
};

// ---------------------------------------------------------------- helpers
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function errorText(resp) {
  try { return (await resp.json()).error.message; } catch (e) { return resp.status + " " + resp.statusText; }
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot show this image"));
    img.src = src;
  });
}

// A 0/255 mask PNG -> a canvas of the mask's colour, transparent elsewhere.
async function tint(pngBase64, color) {
  const img = await loadImage("data:image/png;base64," + pngBase64);
  const c = document.createElement("canvas");
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext("2d");
  g.drawImage(img, 0, 0);
  const px = g.getImageData(0, 0, c.width, c.height);
  for (let i = 0; i < px.data.length; i += 4) {
    const on = px.data[i] > 127;
    px.data[i] = color[0]; px.data[i + 1] = color[1]; px.data[i + 2] = color[2];
    px.data[i + 3] = on ? 255 : 0;
  }
  g.putImageData(px, 0, 0);
  return c;
}

// ---------------------------------------------------------------- drawing
function drawRegion(r, style) {
  ctx.save();
  ctx.strokeStyle = style; ctx.fillStyle = style;
  ctx.lineWidth = Math.max(2, canvas.width / 300);
  if (r.kind === "point") {
    ctx.beginPath(); ctx.arc(r.point[0], r.point[1], ctx.lineWidth * 3, 0, 2 * Math.PI); ctx.fill();
  } else if (r.kind === "box") {
    ctx.strokeRect(r.box[0], r.box[1], r.box[2] - r.box[0], r.box[3] - r.box[1]);
  } else if (r.kind === "polygon" && r.polygon.length) {
    ctx.beginPath(); ctx.moveTo(...r.polygon[0]);
    for (const p of r.polygon.slice(1)) ctx.lineTo(...p);
    ctx.closePath(); ctx.stroke();
  }
  ctx.restore();
}

function redraw() {
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!state.image) return;
  ctx.drawImage(state.image, 0, 0);
  const shown = $("show-overlay").checked && state.masks.length > 0;
  if (shown) {
    ctx.save();
    ctx.globalAlpha = parseFloat($("opacity").value);
    for (const m of state.masks) ctx.drawImage(m.tinted, 0, 0);
    ctx.restore();
  }
  canvas.dataset.overlay = shown ? "shown" : "hidden";
  for (const r of state.asked) drawRegion(r, "#ffffff");
  for (const r of state.pending) drawRegion(r, "#ffd400");
  if (state.drag) drawRegion(state.drag, "#ffd400");
}

// ---------------------------------------------------------------- region tools
function toImage(ev) {
  const rect = canvas.getBoundingClientRect();
  const x = (ev.clientX - rect.left) * canvas.width / rect.width;
  const y = (ev.clientY - rect.top) * canvas.height / rect.height;
  return [Math.min(Math.max(x, 0), canvas.width), Math.min(Math.max(y, 0), canvas.height)].map((v) => Math.round(v * 10) / 10);
}

canvas.addEventListener("pointerdown", (ev) => {
  if (!state.image || state.tool === "none") return;
  const p = toImage(ev);
  if (state.tool === "point") { state.pending.push({ kind: "point", point: p }); redraw(); return; }
  canvas.setPointerCapture(ev.pointerId);
  state.drag = state.tool === "box" ? { kind: "box", box: [...p, ...p], start: p } : { kind: "polygon", polygon: [p] };
});

canvas.addEventListener("pointermove", (ev) => {
  if (!state.drag) return;
  const p = toImage(ev);
  if (state.drag.kind === "box") {
    const s = state.drag.start;
    state.drag.box = [Math.min(s[0], p[0]), Math.min(s[1], p[1]), Math.max(s[0], p[0]), Math.max(s[1], p[1])];
  } else {
    const last = state.drag.polygon[state.drag.polygon.length - 1];
    if (Math.hypot(p[0] - last[0], p[1] - last[1]) >= canvas.width / 200) state.drag.polygon.push(p);
  }
  redraw();
});

canvas.addEventListener("pointerup", () => {
  const d = state.drag;
  state.drag = null;
  if (!d) return;
  if (d.kind === "box" && d.box[2] - d.box[0] >= 2 && d.box[3] - d.box[1] >= 2) state.pending.push({ kind: "box", box: d.box });
  if (d.kind === "polygon" && d.polygon.length >= 3) state.pending.push({ kind: "polygon", polygon: d.polygon });
  redraw();
});

for (const b of document.querySelectorAll("[data-tool]")) {
  b.addEventListener("click", () => {
    state.tool = b.dataset.tool;
    for (const o of document.querySelectorAll("[data-tool]")) o.classList.toggle("active", o === b);
  });
}
$("clear-regions").addEventListener("click", () => { state.pending = []; redraw(); });
$("show-overlay").addEventListener("change", redraw);
$("opacity").addEventListener("input", redraw);

// ---------------------------------------------------------------- image
// Show the image as large as the stage allows (small images are scaled up, pixels stay exact).
function fitCanvas() {
  const stage = canvas.parentElement;
  const scale = Math.min(stage.clientWidth / canvas.width, 0.7 * window.innerHeight / canvas.height);
  canvas.style.width = Math.floor(canvas.width * scale) + "px";
  canvas.style.height = Math.floor(canvas.height * scale) + "px";
}
window.addEventListener("resize", () => { if (state.image) fitCanvas(); });

function newConversation() {
  state.turns = []; state.pending = []; state.asked = []; state.masks = [];
  $("history").replaceChildren();
  $("download").classList.add("disabled"); $("download").removeAttribute("href");
  redraw();
}

$("file").addEventListener("change", async () => {
  const file = $("file").files[0];
  if (!file) return;
  setStatus("Reading " + file.name + " ...");
  try {
    // The server renders every format (DICOM too) the way the model sees it.
    const resp = await fetch("/v1/preview", { method: "POST", headers: headers(), body: JSON.stringify({ image: await readAsDataURL(file) }) });
    if (!resp.ok) throw new Error(await errorText(resp));
    const out = await resp.json();
    state.imageUrl = "data:image/png;base64," + out.png_base64;
    state.image = await loadImage(state.imageUrl);
    canvas.width = out.width; canvas.height = out.height;
    fitCanvas();
    newConversation();
    $("ask").disabled = false;
    setStatus(file.name + ": " + out.width + " x " + out.height + " pixels. Pick a tool to draw a region, or just ask.");
  } catch (e) {
    setStatus(e.message, true);
  }
});

// ---------------------------------------------------------------- in-context examples
// The server checks every pair (mask size = image size, a non-empty mask, at most the model's number of
// examples) and answers a bad one with a 400 that names it; the page only collects the files.
function showExamples() {
  const list = $("examples");
  list.replaceChildren(...state.examples.map((e, i) => {
    const li = document.createElement("li");
    li.textContent = e.name + " ";
    const rm = document.createElement("button");
    rm.textContent = "Remove"; rm.className = "link";
    rm.addEventListener("click", () => { state.examples.splice(i, 1); showExamples(); });
    li.append(rm);
    return li;
  }));
  const n = state.examples.length;
  $("examples-count").textContent = n ? "(" + n + ")" : "(none)";
  const d = state.exampleDraft;
  $("example-pending").textContent = d.image || d.mask
    ? "Chosen: " + (d.imageName || "no image yet") + " + " + (d.maskName || "no mask yet") : "";
  $("add-example").disabled = !(d.image && d.mask);
}

for (const [input, key] of [["example-image", "image"], ["example-mask", "mask"]]) {
  $(input).addEventListener("change", async () => {
    const file = $(input).files[0];
    if (!file) return;
    state.exampleDraft[key] = await readAsDataURL(file);
    state.exampleDraft[key + "Name"] = file.name;
    $(input).value = "";
    showExamples();
  });
}
$("add-example").addEventListener("click", () => {
  const d = state.exampleDraft;
  state.examples.push({ image: d.image, mask: d.mask, name: d.imageName + " + " + d.maskName });
  state.exampleDraft = {};
  showExamples();
});
$("clear-examples").addEventListener("click", () => { state.examples = []; state.exampleDraft = {}; showExamples(); });

// ---------------------------------------------------------------- chat
function addBubble(role, text, note) {
  const li = document.createElement("li");
  li.className = role;
  li.textContent = text;
  if (note) { const s = document.createElement("small"); s.textContent = note; li.append(s); }
  $("history").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function requestMessages() {
  const messages = [];
  const regions = [];
  state.turns.forEach((t, i) => {
    let text = t.text;
    if (t.role === "user" && t.regions.length && !text.includes("<region>")) text += " " + t.regions.map(() => "<region>").join(" ");
    if (t.role === "user") regions.push(...t.regions);
    const content = i === 0 ? [{ type: "text", text }, { type: "image_url", image_url: { url: state.imageUrl } }] : text;
    messages.push({ role: t.role, content });
  });
  return { messages, regions };
}

// Server-sent events from a fetch body: yields each parsed `data:` JSON (stops at [DONE]).
async function* events(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function showMasks(masks) {
  state.masks = await Promise.all(masks.filter((m) => m.png_base64).map(async (m, k) => ({ tinted: await tint(m.png_base64, COLORS[k % COLORS.length]), png: m.png_base64 })));
  const dl = $("download");
  if (state.masks.length) { dl.href = "data:image/png;base64," + state.masks[0].png; dl.classList.remove("disabled"); }
  else { dl.classList.add("disabled"); dl.removeAttribute("href"); }
  redraw();
}

$("ask-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (typeof volumeActive === "function" && volumeActive()) return askVolume();  // volume.js
  const question = $("question").value.trim();
  if (!question || !state.image || state.busy) return;
  state.busy = true; $("ask").disabled = true;
  const regions = state.pending;
  state.turns.push({ role: "user", text: question, regions });
  state.pending = [];
  state.asked = regions;
  $("question").value = "";
  redraw();
  const notes = regions.map((r) => r.kind);
  if (state.examples.length) notes.push(state.examples.length + " example" + (state.examples.length > 1 ? "s" : ""));
  addBubble("user", question, notes.join(", "));
  const bubble = addBubble("assistant", "");
  setStatus("Thinking ...");
  const { messages, regions: all } = requestMessages();
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({
        model: $("model").dataset.id || "", messages, stream: true,
        medplib: { regions: all, examples: state.examples.map((e) => ({ image: e.image, mask: e.mask })) },
      }),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    let text = "";
    let ext = null;
    for await (const e of events(resp)) {
      if (e.error) throw new Error(e.error.message);
      const choice = e.choices && e.choices[0];
      if (choice && choice.delta && choice.delta.content) { text += choice.delta.content; bubble.textContent = text; }
      if (e.medplib) ext = e.medplib;
    }
    state.turns.push({ role: "assistant", text, regions: [] });
    const n = ext ? ext.masks.length : 0;
    if (ext) {
      const s = document.createElement("small");
      s.textContent = (n ? n + " mask" + (n > 1 ? "s" : "") + ", " : "") + ext.timings.total_s.toFixed(2) + " s";
      bubble.append(s);
      await showMasks(ext.masks);
    }
    setStatus(n ? "Done: the mask is drawn on the image." : "Done.");
  } catch (e) {
    state.turns.pop();  // the question was not answered: keep the conversation consistent
    bubble.classList.add("error"); bubble.textContent = e.message;
    setStatus(e.message, true);
  } finally {
    state.busy = false; $("ask").disabled = false;
  }
});

$("question").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("ask-form").requestSubmit(); }
});
$("new-chat").addEventListener("click", newConversation);

fetch("/healthz").then((r) => r.json()).then((h) => {
  $("model").textContent = "model: " + h.model;
  $("model").dataset.id = h.model;
}).catch(() => setStatus("the server does not answer", true));
redraw();
