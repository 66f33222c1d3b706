// catnet serve front end: no framework, just fetch + DOM.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function fmtTime(s) { return `${s.toFixed(1)} s`; }

async function loadInfo() {
  info = await (await fetch("/api/info")).json();
  const s = info.settings;
  $("model").textContent = `${info.model} — ${s.clips} clips × ${s.crops} crop(s) of ${s.frames} frames` +
    (info.attention ? "" : " (baseline: no attention)");
  if (info.window) $("model").textContent += ` · label timeline: ${info.window.seconds} s windows`;
  $("limits").textContent = `up to ${(info.max_bytes / 2 ** 20).toFixed(0)} MB; ${info.extensions.join(" ")}`;
  for (const name of info.samples) {
    const opt = document.createElement("option");
    opt.value = opt.textContent = name;
    $("sample").appendChild(opt);
  }
}

let playerUrl = null;  // an object URL of the uploaded file, revoked when the next one replaces it

function setPlayer(src) {
  if (playerUrl) URL.revokeObjectURL(playerUrl);
  playerUrl = src && src.startsWith("blob:") ? src : null;
  const player = $("player");
  player.classList.toggle("empty", !src);
  if (src) player.src = src; else player.removeAttribute("src");
}

async function predict(url, options, label) {
  status(`predicting ${label}…`);
  $("results").hidden = true;
  for (const b of document.querySelectorAll("button")) b.disabled = true;
  try {
    const resp = await fetch(url, options);
    const body = await resp.json();
    if (!resp.ok) throw new Error(body.error || `HTTP ${resp.status}`);
    render(body);
    status(`done in ${body.seconds.toFixed(2)} s`);
  } catch (err) {
    status(`error: ${err.message}`, true);
  } finally {
    for (const b of document.querySelectorAll("button")) b.disabled = false;
  }
}

// One colour per label, stable across answers (a hash of the name).
function labelColour(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) % 360;
  return `hsl(${h}, 65%, 55%)`;
}

function renderLabelTimeline(r) {
  const card = $("label-card");
  card.hidden = !(r.timeline && r.timeline.length);
  if (card.hidden) return;
  const strip = $("label-timeline");
  strip.replaceChildren();
  const t0 = r.timeline[0].start, t1 = r.timeline[r.timeline.length - 1].end;
  for (const seg of r.timeline) {
    const div = document.createElement("div");
    div.className = "segment";
    div.style.flex = `${Math.max(seg.end - seg.start, 1e-3)}`;
    div.style.background = labelColour(seg.label);
    div.title = `${fmtTime(seg.start)}–${fmtTime(seg.end)}: ${seg.label} (${(100 * seg.score).toFixed(1)}%)`;
    div.addEventListener("click", () => { $("player").currentTime = seg.start; });
    strip.appendChild(div);
  }
  $("label-note").textContent = `top-1 of each of ${r.windows.length} windows, equal labels merged; ` +
    "click a segment to play it";
  const axis = $("label-axis");
  axis.replaceChildren(...[t0, t1].map((t) => Object.assign(document.createElement("span"),
    { textContent: fmtTime(t) })));
  const legend = $("label-legend");
  legend.replaceChildren();
  for (const name of [...new Set(r.timeline.map((s) => s.label))]) {
    const li = document.createElement("li");
    const sw = Object.assign(document.createElement("span"), { className: "swatch" });
    sw.style.background = labelColour(name);
    li.append(sw, document.createTextNode(name));
    legend.appendChild(li);
  }
}

function renderExplain(r) {
  const card = $("explain-card");
  const items = r.explain || [];
  card.hidden = items.length === 0;
  const box = $("explain");
  box.replaceChildren();
  for (const e of items) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = e.image;
    img.alt = `Grad-CAM of clip ${e.clip + 1} for ${e.label}`;
    const cap = document.createElement("figcaption");
    cap.className = "muted";
    const att = r.clips[e.clip].attention;
    cap.textContent = `clip ${e.clip + 1}, ${fmtTime(e.start)}–${fmtTime(e.end)} · frame ${e.frame_index}` +
      (att === null ? "" : ` · ${(100 * att).toFixed(1)}%`);
    fig.append(img, cap);
    fig.addEventListener("click", () => { $("player").currentTime = e.start; });
    box.appendChild(fig);
  }
  if (items.length) {
    $("explain-note").textContent = `where the model looked for “${items[0].label}” in the clips that ` +
      "mattered most (outlined above): Grad-CAM on the backbone's last feature map, over each clip's " +
      "middle frame; greyed = outside the crop the model saw";
  }
  const bars = $("timeline").children;
  for (const e of items) if (bars[e.clip]) bars[e.clip].classList.add("explained");
}

function render(r) {
  $("video-name").textContent = r.video;
  const top5 = $("top5");
  top5.replaceChildren();
  for (const p of r.predictions) {
    const li = document.createElement("li");
    li.innerHTML = `<span class="label"></span> <span class="score"></span><span class="bar"></span>`;
    li.querySelector(".label").textContent = p.label;
    li.querySelector(".score").textContent = `${(100 * p.score).toFixed(1)}%`;
    li.querySelector(".bar").style.width = `${Math.round(200 * p.score)}px`;
    top5.appendChild(li);
  }

  const timeline = $("timeline");
  timeline.replaceChildren();
  const weights = r.clips.map((c) => c.attention);
  const hasAttention = weights.length > 0 && weights[0] !== null;
  const peak = hasAttention ? Math.max(...weights) : 1;
  for (const c of r.clips) {
    const bar = document.createElement("div");
    bar.className = hasAttention ? "clip" : "clip flat";
    bar.style.height = hasAttention ? `${Math.max(2, Math.round(100 * c.attention / peak))}%` : "30%";
    bar.title = `${fmtTime(c.start)}–${fmtTime(c.end)}` +
      (hasAttention ? `: attention ${(100 * c.attention).toFixed(1)}%` : "");
    timeline.appendChild(bar);
  }
  $("timeline-note").textContent = hasAttention
    ? "bar height = the clip's share of the local attention (summed over heads)"
    : "this model has no attention: clips shown evenly";
  const axis = $("timeline-axis");
  axis.replaceChildren();
  if (r.clips.length) {
    for (const t of [r.clips[0].start, r.clips[r.clips.length - 1].end]) {
      const span = document.createElement("span");
      span.textContent = fmtTime(t);
      axis.appendChild(span);
    }
  }

  renderExplain(r);
  renderLabelTimeline(r);

  const frames = $("keyframes");
  frames.replaceChildren();
  for (const k of r.keyframes) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = k.image;
    img.alt = `clip ${k.clip + 1}`;
    const cap = document.createElement("figcaption");
    cap.className = "muted";
    cap.textContent = `${fmtTime(k.start)}–${fmtTime(k.end)}` +
      (k.attention === null ? "" : ` · ${(100 * k.attention).toFixed(1)}%`);
    fig.append(img, cap);
    frames.appendChild(fig);
  }
  $("results").hidden = false;
}

$("upload").addEventListener("click", () => {
  const file = $("file").files[0];
  if (!file) return status("choose a video file first", true);
  if (info && file.size > info.max_bytes) {
    return status(`error: ${file.name} is larger than ${(info.max_bytes / 2 ** 20).toFixed(0)} MB`, true);
  }
  setPlayer(URL.createObjectURL(file));
  predict("/api/predict", {
    method: "POST",
    headers: { "X-Filename": encodeURIComponent(file.name), "Content-Type": "application/octet-stream" },
    body: file,
  }, file.name);
});

$("run-sample").addEventListener("click", () => {
  const name = $("sample").value;
  setPlayer(`/samples/${encodeURIComponent(name)}`);
  predict(`/api/predict?sample=${encodeURIComponent(name)}`, { method: "POST" }, name);
});

loadInfo().catch((err) => status(`error: cannot reach the server (${err.message})`, true));
