// The page of `pipeline serve`: a form over POST /api/generate, progress from its server-sent
// events, a result grid, and the session's history. Everything is keyboard-reachable; Enter
// generates and Escape cancels.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, fields: [], job: null, history: [], uploads: {} };

/** Shows a slider's value next to its label. */
function mirror(input, output) {
  const show = () => { output.textContent = input.value; };
  input.addEventListener("input", show);
  show();
  return show;
}
const showCfg = mirror($("cfg"), $("cfg-out"));
const showSteps = mirror($("steps"), $("steps-out"));
const showRescale = mirror($("guidance_rescale"), $("guidance_rescale-out"));
mirror($("strength"), $("strength-out"));

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

function option(value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  return o;
}

/** Fills the form from GET /api/model. */
async function loadModel() {
  const res = await fetch("/api/model");
  const m = await res.json();
  state.model = m;
  state.fields = m.fields;
  const [c, h, w] = m.image_shape;
  $("model-line").textContent =
    `${m.model} · ${m.conditioning === "class" ? m.classes.length + " classes" : "unconditional"}` +
    ` · ${w}×${h}×${c} · T = ${m.timesteps} · ${m.device}`;
  for (const name of m.classes) $("class").append(option(name, name));
  $("class").disabled = m.conditioning !== "class";
  for (const name of m.samplers) $("sampler").append(option(name, name));
  $("sampler").value = m.default_sampler.kind;
  for (const name of m.spacings) $("spacing").append(option(name, name));
  $("spacing").value = m.default_sampler.spacing;
  $("steps").max = String(Math.min(m.timesteps, 1000));
  $("steps").value = String(m.default_sampler.steps);
  showSteps();
  $("cfg").value = String(m.default_cfg);
  showCfg();
  $("guidance_rescale").value = String(m.default_sampler.guidance_rescale || 0);
  showRescale();
  $("n").max = String(m.limits.max_images);
  $("n").value = String(Math.min(4, m.limits.max_images));
  const has = (f) => state.fields.includes(f);
  $("guidance_rescale").disabled = !has("guidance_rescale");
  $("trajectory").disabled = !has("trajectory");
  $("negative_prompt").disabled = !has("negative_prompt");
  if (!has("negative_prompt")) $("negative_prompt").placeholder = "not supported by this build";
  const img2img = has("init_image");
  $("img2img").disabled = !img2img;
  $("mask").disabled = !has("mask");
  $("img2img-note").textContent = img2img
    ? `Any image; the page scales it to the model's ${w}×${h}.`
    : "Not supported by this build of the server.";
}

/** The request body from the form; uploads travel base64-encoded. */
function request() {
  const body = {};
  const text = (id) => { const v = $(id).value.trim(); if (v) body[id] = v; };
  text("prompt");
  if (!$("negative_prompt").disabled) text("negative_prompt");
  if (!$("class").disabled) text("class");
  body.cfg = Number($("cfg").value);
  if (!$("guidance_rescale").disabled) body.guidance_rescale = Number($("guidance_rescale").value);
  body.steps = Number($("steps").value);
  body.sampler = $("sampler").value;
  body.spacing = $("spacing").value;
  body.n = Number($("n").value);
  if ($("trajectory").checked && !$("trajectory").disabled) body.trajectory = true;
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  if (!$("img2img").disabled) {
    if (state.uploads.init_image) {
      body.init_image = state.uploads.init_image;
      body.strength = Number($("strength").value);
    }
    if (state.uploads.mask) body.mask = state.uploads.mask;
  }
  return body;
}

/** Reads a chosen image, scales it to the model's size on a canvas (cropping to fill), and
 * keeps it as base64 PNG without the data: prefix. A mask is scaled without smoothing. */
function watchUpload(id) {
  $(id).addEventListener("change", () => {
    const file = $(id).files[0];
    delete state.uploads[id];
    if (!file) return;
    const [, h, w] = state.model.image_shape;
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.onload = () => {
      const canvas = document.createElement("canvas");
      canvas.width = w;
      canvas.height = h;
      const ctx = canvas.getContext("2d");
      ctx.imageSmoothingEnabled = id !== "mask";
      const scale = Math.max(w / img.naturalWidth, h / img.naturalHeight);
      const [sw, sh] = [w / scale, h / scale];
      ctx.drawImage(img, (img.naturalWidth - sw) / 2, (img.naturalHeight - sh) / 2, sw, sh, 0, 0, w, h);
      state.uploads[id] = canvas.toDataURL("image/png").split(",", 2)[1];
      URL.revokeObjectURL(url);
    };
    img.onerror = () => {
      setStatus(`${id}: not an image this browser can read`, true);
      URL.revokeObjectURL(url);
    };
    img.src = url;
  });
}
watchUpload("init_image");
watchUpload("mask");

function clearInvalid() {
  for (const el of document.querySelectorAll("[aria-invalid=true]")) el.removeAttribute("aria-invalid");
}

/** Marks the field an error names, and moves the focus there. */
function showError(err) {
  setStatus(err.error || "error", true);
  const el = err.field && $(err.field);
  if (el) {
    el.setAttribute("aria-invalid", "true");
    el.focus();
  }
}

function busy(on) {
  $("generate").disabled = on;
  $("cancel").disabled = !on;
}

/** Splits a text/event-stream body into {event, data} messages. */
async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

/** Runs one generation: POST with Accept: text/event-stream, then follow its events. */
async function generate() {
  if (state.job !== null) return;
  clearInvalid();
  busy(true);
  state.job = 0;
  $("progress").value = 0;
  setStatus("Sending…");
  try {
    const response = await fetch("/api/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(request()),
    });
    if (!response.ok) {
      showError(await response.json());
      return;
    }
    for await (const { event, data } of readEvents(response)) {
      state.job = data.id;
      if (event === "queued") setStatus(data.ahead ? `Queued behind ${data.ahead} jobs.` : "Starting…");
      else if (event === "progress") {
        $("progress").max = data.total;
        $("progress").value = data.step;
        setStatus(`Step ${data.step} of ${data.total}.`);
      } else if (event === "done") {
        $("progress").value = $("progress").max;
        show(data, true);
        setStatus(`Done: ${data.images.length} images, seed ${data.settings.seed}.`);
      } else if (event === "cancelled") setStatus(`Cancelled after ${data.step} steps.`);
      else if (event === "error") showError(data);
    }
  } catch (e) {
    setStatus(`The request failed: ${e}`, true);
  } finally {
    state.job = null;
    busy(false);
  }
}

async function cancel() {
  if (!state.job) return;
  setStatus("Cancelling…");
  await fetch(`/api/jobs/${state.job}/cancel`, { method: "POST" });
}

function summary(s) {
  const what = s.prompt ? `"${s.prompt}"` : s.class ? `class ${s.class}` : "unconditional";
  const from = s.img2img ? ` · from an image at strength ${s.img2img.strength}${s.img2img.mask_sha256 ? " with a mask" : ""}` : "";
  const rescale = s.sampler.guidance_rescale ? ` (rescale ${s.sampler.guidance_rescale})` : "";
  const karras = s.sampler.spacing === "karras" ? " (karras)" : "";
  return `${what} · cfg ${s.cfg}${rescale} · ${s.sampler.kind} ${s.sampler.steps} steps${karras} · seed ${s.seed} · ${s.n} images${from}`;
}

function pngUrl(b64) { return `data:image/png;base64,${b64}`; }

/** Puts a result in the grid (and, when new, at the top of the history). */
function show(result, fresh) {
  const s = result.settings;
  $("results-line").textContent = summary(s);
  const grid = $("grid");
  grid.replaceChildren();
  result.images.forEach((b64, i) => {
    const fig = document.createElement("figure");
    const enlarge = document.createElement("button");
    enlarge.type = "button";
    enlarge.className = "enlarge";
    enlarge.title = "Enlarge";
    const img = document.createElement("img");
    img.src = pngUrl(b64);
    img.alt = `image ${i + 1}: ${summary(s)}`;
    enlarge.append(img);
    enlarge.addEventListener("click", () => {
      $("viewer-img").src = img.src;
      $("viewer-img").alt = img.alt;
      $("viewer-caption").textContent = `${summary(s)} · image ${i + 1}`;
      $("viewer").showModal();
    });
    const caption = document.createElement("figcaption");
    const download = document.createElement("a");
    download.href = img.src;
    download.download = `ldm-seed${s.seed}-${String(i).padStart(3, "0")}.png`;
    download.textContent = "Download";
    download.title = "The PNG carries its settings in a 'parameters' text chunk";
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.textContent = "Reuse settings";
    reuse.addEventListener("click", () => reuseSettings(s));
    caption.append(download, reuse);
    fig.append(enlarge, caption);
    grid.append(fig);
  });
  const t = s.trajectory;
  $("trajectory-figure").hidden = !(result.trajectory && t);
  if (result.trajectory && t) {
    $("trajectory-img").src = pngUrl(result.trajectory);
    $("trajectory-img").alt = `how the first ${t.rows} images formed`;
    $("trajectory-caption").textContent =
      `How they formed: one row per image, the clean-image estimate after steps ` +
      `${t.steps.join(", ")} of ${t.sampler_steps}.`;
  }
  if (fresh) addHistory(result);
}

function addHistory(result) {
  state.history.unshift(result);
  const li = document.createElement("li");
  for (const b64 of result.images.slice(0, 8)) {
    const img = document.createElement("img");
    img.src = pngUrl(b64);
    img.alt = "";
    li.append(img);
  }
  const text = document.createElement("span");
  text.className = "summary";
  text.textContent = summary(result.settings);
  const again = document.createElement("button");
  again.type = "button";
  again.textContent = "Show";
  again.addEventListener("click", () => show(result, false));
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.textContent = "Reuse settings";
  reuse.addEventListener("click", () => reuseSettings(result.settings));
  li.append(text, again, reuse);
  $("history").prepend(li);
}

/** Sends a result's settings back to the form. */
function reuseSettings(s) {
  $("prompt").value = s.prompt || "";
  if ("negative_prompt" in s) $("negative_prompt").value = s.negative_prompt || "";
  $("class").value = s.prompt ? "" : (s.class || "");
  $("cfg").value = String(s.cfg);
  showCfg();
  $("guidance_rescale").value = String(s.sampler.guidance_rescale || 0);
  showRescale();
  $("sampler").value = s.sampler.kind;
  $("spacing").value = s.sampler.spacing;
  $("trajectory").checked = Boolean(s.trajectory);
  $("steps").value = String(s.sampler.steps);
  showSteps();
  $("seed").value = String(s.seed);
  $("n").value = String(s.n);
  setStatus("Settings restored; Enter generates.");
  $("prompt").focus();
}

$("random-seed").addEventListener("click", () => {
  $("seed").value = String(Math.floor(Math.random() * 2 ** 32));
});
$("form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
$("cancel").addEventListener("click", cancel);
// Enter generates from any control but a button or a file picker (they keep their own Enter);
// Escape cancels a running job.
$("form").addEventListener("keydown", (e) => {
  const t = e.target;
  if (e.key === "Enter" && !e.isComposing && t.tagName !== "BUTTON" && t.type !== "file") {
    e.preventDefault();
    generate();
  } else if (e.key === "Escape" && state.job) {
    cancel();
  }
});

loadModel().catch((e) => setStatus(`Could not read /api/model: ${e}`, true));
