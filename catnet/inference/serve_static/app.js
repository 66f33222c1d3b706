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
  $("limits").textContent = `up to ${(info.max_bytes / 2 ** 20).toFixed(0)} MB; ${info.extensions.join(" ")}`;
  for (const name of info.samples) {
    const opt = document.createElement("option");
    opt.value = opt.textContent = name;
    $("sample").appendChild(opt);
  }
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
  predict("/api/predict", {
    method: "POST",
    headers: { "X-Filename": encodeURIComponent(file.name), "Content-Type": "application/octet-stream" },
    body: file,
  }, file.name);
});

$("run-sample").addEventListener("click", () => {
  const name = $("sample").value;
  predict(`/api/predict?sample=${encodeURIComponent(name)}`, { method: "POST" }, name);
});

loadInfo().catch((err) => status(`error: cannot reach the server (${err.message})`, true));
