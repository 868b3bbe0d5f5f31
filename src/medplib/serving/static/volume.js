// Volumes on the medplib web page: open a NIfTI file or a zip of a DICOM series, browse its slices
// with the slider, ask, and see the mask volume overlaid slice by slice. Builds on app.js (canvas,
// state, chat helpers). Slices come from the server exactly as the model sees them.
"use strict";

const vol = {
  active: false,
  name: "",
  dataUrl: null,   // the uploaded file, sent again with every question
  axis: 2,
  pngs: [],        // base64 PNG per slice
  images: [],      // loaded HTMLImageElement per slice (lazily)
  maskPngs: null,  // base64 PNG per slice, null where the mask is empty
  tinted: [],      // tinted mask canvas per slice (lazily)
  scores: [],
};

function volumeActive() { return vol.active; }

function setVolumeMode(on) {
  vol.active = on;
  $("volume-bar").hidden = !on;
  // Region prompts on a volume are voxel coordinates (CLI, Python, HTTP); the drawing tools are 2-D.
  for (const b of document.querySelectorAll("[data-tool]")) b.disabled = on && b.dataset.tool !== "none";
}

async function showSlice(k) {
  k = Math.max(0, Math.min(vol.pngs.length - 1, k));
  if (!vol.images[k]) vol.images[k] = await loadImage("data:image/png;base64," + vol.pngs[k]);
  const m = vol.maskPngs ? vol.maskPngs[k] : null;
  if (m && !vol.tinted[k]) vol.tinted[k] = await tint(m, COLORS[0]);
  if (Number($("slice").value) !== k) $("slice").value = k;
  state.image = vol.images[k];
  state.masks = m ? [{ tinted: vol.tinted[k], png: m }] : [];
  canvas.dataset.slice = String(k);
  const score = vol.scores[k];
  $("slice-label").textContent = "slice " + k + " of " + (vol.pngs.length - 1) + " (axis " + vol.axis + ")" +
    (score !== undefined && score !== null ? ", score " + score.toFixed(2) : "");
  redraw();
}

$("slice").addEventListener("input", () => { if (vol.active) showSlice(Number($("slice").value)); });

$("file").addEventListener("change", () => setVolumeMode(false));  // a 2-D image replaces the volume

$("volume-file").addEventListener("change", async () => {
  const file = $("volume-file").files[0];
  if (!file) return;
  setStatus("Reading " + file.name + " ...");
  try {
    const dataUrl = await readAsDataURL(file);
    const resp = await fetch("/v1/volume/preview", { method: "POST", headers: headers(), body: JSON.stringify({ volume: dataUrl, axis: vol.axis }) });
    if (!resp.ok) throw new Error(await errorText(resp));
    const out = await resp.json();
    Object.assign(vol, { name: file.name, dataUrl, pngs: out.slice_pngs, images: [], maskPngs: null, tinted: [], scores: [] });
    canvas.width = out.width; canvas.height = out.height;
    fitCanvas();
    newConversation();
    setVolumeMode(true);
    $("slice").max = String(out.n - 1);
    $("download-volume").classList.add("disabled"); $("download-volume").removeAttribute("href");
    await showSlice(Math.floor(out.n / 2));
    $("ask").disabled = false;
    setStatus(file.name + ": " + out.n + " slices of " + out.width + " x " + out.height + " pixels (" +
      out.shape.join(" x ") + " voxels, " + out.orientation + "). Ask, e.g. Please segment the liver.");
  } catch (e) {
    setStatus(e.message, true);
  }
});

async function askVolume() {
  const question = $("question").value.trim();
  if (!question || state.busy) return;
  state.busy = true; $("ask").disabled = true;
  $("question").value = "";
  addBubble("user", question, "volume, " + vol.pngs.length + " slices");
  const bubble = addBubble("assistant", "");
  setStatus("Asking every slice ...");
  try {
    const resp = await fetch("/v1/volume/segment", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ model: $("model").dataset.id || null, volume: vol.dataUrl, axis: vol.axis, question, return_slices: true }),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const out = await resp.json();
    Object.assign(vol, { maskPngs: out.mask_pngs, tinted: [], scores: out.scores });
    bubble.textContent = out.text;
    const masked = out.mask_pngs.map((m, k) => (m ? k : -1)).filter((k) => k >= 0);
    const s = document.createElement("small");
    s.textContent = out.voxels + " voxels (" + out.volume_ml.toFixed(1) + " ml) on " + masked.length + " of " +
      out.slices.length + " slices asked, " + out.timings.total_s.toFixed(2) + " s";
    bubble.append(s);
    const dl = $("download-volume");
    dl.href = "data:application/gzip;base64," + out.mask_nifti_base64; dl.classList.remove("disabled");
    // show the answer's own slice when it has a mask, else the first slice that has one
    await showSlice(out.mask_pngs[out.reference] || !masked.length ? out.reference : masked[0]);
    setStatus(masked.length ? "Done: move the slider to see the mask on every slice." : "Done.");
  } catch (e) {
    bubble.classList.add("error"); bubble.textContent = e.message;
    setStatus(e.message, true);
  } finally {
    state.busy = false; $("ask").disabled = false;
  }
}
