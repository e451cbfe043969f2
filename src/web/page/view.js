"use strict";
// The live view: a feed of server-sent events (hello, pose, stats, watch, event) drawn as a 3D
// skeleton, small charts and lists; questions go to api/ask.

const token = new URLSearchParams(location.search).get("token");
const withToken = (path) => (token ? `${path}?token=${encodeURIComponent(token)}` : path);
const $ = (id) => document.getElementById(id);

const state = {
  parents: [],
  watches: new Map(), // id -> {question, kind, state}
  live: null,         // the newest pose message
  answerPoses: [],    // joints of the poses in the last answer
  yaw: 0.6, pitch: 0.25, distance: 4.0,
  series: { fps: [], latency: [], confidence: [] },
  poseTimes: [],
};

// ---- 3D view ---------------------------------------------------------------------------

const view = $("view");
const ctx = view.getContext("2d");

// World (SMPL axes: y up, metres) to screen, for the current orbit.
function project(p) {
  const [x, y, z] = p;
  const cy = Math.cos(state.yaw), sy = Math.sin(state.yaw);
  const cp = Math.cos(state.pitch), sp = Math.sin(state.pitch);
  const x1 = cy * x + sy * z, z1 = -sy * x + cy * z;
  const y2 = cp * y - sp * z1, z2 = sp * y + cp * z1;
  const depth = state.distance - z2;
  const f = 0.9 * Math.min(view.width, view.height);
  return { x: view.width / 2 + (f * x1) / depth, y: view.height * 0.45 - (f * y2) / depth, depth };
}

function line(a, b, style, width) {
  const p = project(a), q = project(b);
  if (p.depth <= 0.1 || q.depth <= 0.1) return;
  ctx.strokeStyle = style;
  ctx.lineWidth = width;
  ctx.beginPath();
  ctx.moveTo(p.x, p.y);
  ctx.lineTo(q.x, q.y);
  ctx.stroke();
}

const FLOOR_Y = -1.1;

function drawFloor() {
  for (let i = -4; i <= 4; i++) {
    const v = i * 0.5;
    const style = i === 0 ? "#3a4250" : "#242a33";
    line([v, FLOOR_Y, -2], [v, FLOOR_Y, 2], style, 1);
    line([-2, FLOOR_Y, v], [2, FLOOR_Y, v], style, 1);
  }
}

// A skeleton: bones from each joint to its parent, far bones first; `offset` moves it along x.
function drawSkeleton(joints, colour, alpha, offset) {
  if (!joints || joints.length !== state.parents.length) return;
  const at = (j) => [joints[j][0] + offset, joints[j][1], joints[j][2]];
  const bones = [];
  state.parents.forEach((parent, j) => {
    if (parent >= 0) bones.push([at(parent), at(j)]);
  });
  bones.sort((a, b) => project(b[0]).depth + project(b[1]).depth - project(a[0]).depth - project(a[1]).depth);
  ctx.globalAlpha = alpha;
  for (const [a, b] of bones) line(a, b, colour, 4);
  ctx.fillStyle = colour;
  for (let j = 0; j < joints.length; j++) {
    const p = project(at(j));
    if (p.depth <= 0.1) continue;
    ctx.beginPath();
    ctx.arc(p.x, p.y, Math.max(2, 12 / p.depth), 0, 2 * Math.PI);
    ctx.fill();
  }
  ctx.globalAlpha = 1;
}

// Red (unsure) to green (sure) by the pose token's probability.
function confidenceColour(c) {
  return `hsl(${Math.round(120 * Math.max(0, Math.min(1, c)))}, 75%, 55%)`;
}

// Canvases draw at the size they are shown, so lines stay sharp.
function fit(canvas, aspect) {
  const w = canvas.clientWidth;
  if (w > 0 && canvas.width !== w) {
    canvas.width = w;
    canvas.height = Math.round(aspect ? w * aspect : canvas.clientHeight);
  }
}

function drawScene() {
  fit(view, 0.75);
  ctx.fillStyle = "#0d0f12";
  ctx.fillRect(0, 0, view.width, view.height);
  drawFloor();
  const live = state.live;
  if (live) {
    const smoothed = $("smoothed").checked && live.joints_smoothed;
    const joints = smoothed ? live.joints_smoothed : live.joints;
    drawSkeleton(joints, confidenceColour(live.confidence), 0.4 + 0.6 * live.confidence, 0);
  } else {
    ctx.fillStyle = "#778";
    ctx.font = "16px system-ui, sans-serif";
    ctx.fillText("waiting for the first pose…", 20, 30);
  }
  state.answerPoses.forEach((joints, i) => drawSkeleton(joints, "#8ab4f8", 0.9, 1.2 * (i + 1)));
}

let dragging = null;
view.addEventListener("pointerdown", (e) => {
  dragging = { x: e.clientX, y: e.clientY };
  view.setPointerCapture(e.pointerId);
});
view.addEventListener("pointerup", () => { dragging = null; });
view.addEventListener("pointermove", (e) => {
  if (!dragging) return;
  state.yaw += (e.clientX - dragging.x) * 0.01;
  state.pitch = Math.max(-1.4, Math.min(1.4, state.pitch + (e.clientY - dragging.y) * 0.01));
  dragging = { x: e.clientX, y: e.clientY };
  drawScene();
});
view.addEventListener("wheel", (e) => {
  e.preventDefault();
  state.distance = Math.max(1.5, Math.min(12, state.distance * Math.exp(e.deltaY * 0.001)));
  drawScene();
}, { passive: false });
$("smoothed").addEventListener("change", drawScene);

// ---- charts ----------------------------------------------------------------------------

const MINUTE_MS = 60000;

function record(name, value) {
  const now = Date.now();
  const s = state.series[name];
  s.push([now, value]);
  while (s.length && s[0][0] < now - MINUTE_MS) s.shift();
}

function drawChart(name, colour) {
  const canvas = $(`chart-${name}`);
  fit(canvas);
  const c = canvas.getContext("2d");
  const s = state.series[name];
  c.clearRect(0, 0, canvas.width, canvas.height);
  if (!s.length) return;
  const now = Date.now();
  const max = Math.max(...s.map((p) => p[1]), 1e-6) * 1.1;
  c.strokeStyle = colour;
  c.lineWidth = 2;
  c.beginPath();
  s.forEach(([t, v], i) => {
    const x = canvas.width * (1 - (now - t) / MINUTE_MS);
    const y = canvas.height - 4 - (canvas.height - 14) * (v / max);
    if (i === 0) c.moveTo(x, y); else c.lineTo(x, y);
  });
  c.stroke();
  c.fillStyle = "#aab";
  c.font = "11px system-ui, sans-serif";
  c.fillText(s[s.length - 1][1].toFixed(name === "confidence" ? 2 : 1), 4, 11);
}

function drawCharts() {
  drawChart("fps", "#8ab4f8");
  drawChart("latency", "#f4b400");
  drawChart("confidence", "#6c6");
}

// ---- feed ------------------------------------------------------------------------------

function onPose(msg) {
  state.live = msg;
  const now = Date.now();
  state.poseTimes.push(now);
  while (state.poseTimes.length && state.poseTimes[0] < now - 1000) state.poseTimes.shift();
  record("fps", state.poseTimes.length);
  record("latency", msg.latency_ms);
  record("confidence", msg.confidence);
  $("pose-info").textContent =
    `pose ${msg.seq} · frame ${msg.frame_seq} · confidence ${msg.confidence.toFixed(2)} · ${msg.latency_ms.toFixed(0)} ms`;
  drawScene();
}

function renderWatches() {
  const list = $("watches");
  list.replaceChildren();
  if (!state.watches.size) {
    list.append(item("none configured", "muted"));
    return;
  }
  for (const [id, w] of state.watches) {
    const li = document.createElement("li");
    li.dataset.watch = id;
    const s = w.state;
    let value = "…";
    let cls = "no";
    if (s && typeof s.value === "boolean") {
      value = `${s.value ? "yes" : "no"} (P(yes) ${s.p_yes.toFixed(2)})`;
      cls = s.value ? "yes" : "no";
    } else if (s) {
      value = s.text;
    }
    const v = document.createElement("span");
    v.className = cls;
    v.textContent = value;
    li.append(`${id}: ${w.question} → `, v);
    list.append(li);
  }
}

function item(text, cls) {
  const li = document.createElement("li");
  li.textContent = text;
  if (cls) li.className = cls;
  return li;
}

function onEvent(e) {
  const list = $("events");
  if (list.firstElementChild && list.firstElementChild.classList.contains("muted")) list.replaceChildren();
  const at = new Date(e.at_ms).toLocaleTimeString();
  list.prepend(item(`${at} ${e.watch} ${e.type} (P(yes) ${e.p_yes.toFixed(2)})`, e.type === "start" ? "yes" : ""));
  while (list.children.length > 20) list.lastElementChild.remove();
}

function onStats(s) {
  const rows = [
    ["uptime", `${Math.round(s.uptime_s)} s`],
    ["camera", s.source_up ? "up" : "DOWN"],
    ["poses/s", s.pose_fps.toFixed(1)],
    ["latency p50 / p95", `${s.latency_ms_p50.toFixed(0)} / ${s.latency_ms_p95.toFixed(0)} ms`],
    ["answers", `${s.asks_answered} (${s.asks_rejected} refused), p50 ${s.answer_ms_p50.toFixed(0)} ms`],
    ["tokens/s", s.tokens_per_s.toFixed(1)],
    ["watch evaluations", `${s.watch_evaluations} (${s.watch_ms_mean.toFixed(0)} ms mean)`],
    ["frames", `${s.frames_captured} captured, ${s.frames_dropped} replaced`],
  ];
  for (const [zone, c] of Object.entries(s.temperature_c || {})) rows.push([zone, `${c.toFixed(1)} °C`]);
  if (s.gpu_load_percent !== undefined) rows.push(["GPU load", `${s.gpu_load_percent.toFixed(0)} %`]);
  for (const [rail, w] of Object.entries(s.power_w || {})) rows.push([rail, `${w.toFixed(2)} W`]);
  const dl = $("health");
  dl.replaceChildren();
  for (const [k, v] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    dl.append(dt, dd);
  }
  $("headline").textContent = `${s.pose_fps.toFixed(1)} poses/s · p50 ${s.latency_ms_p50.toFixed(0)} ms`;
}

function onHello(h) {
  state.parents = h.parents;
  $("device").textContent = `${h.device} · ${h.model}`;
  $("smoothed").checked = h.smoothing;
  state.watches = new Map(h.watches.map((w) => [w.id, { question: w.question, kind: w.kind, state: null }]));
  renderWatches();
  $("frame").hidden = !h.show_frames;
  if (h.show_frames && !state.frameTimer) {
    state.frameTimer = setInterval(() => {
      $("frame").src = `${withToken("frame.jpg")}${token ? "&" : "?"}t=${Date.now()}`;
    }, 1000);
  }
}

function connect() {
  const feed = new EventSource(withToken("events"));
  const on = (kind, handle) => feed.addEventListener(kind, (m) => handle(JSON.parse(m.data)));
  feed.onopen = () => { $("status").textContent = "live"; $("status").className = "up"; };
  feed.onerror = () => { $("status").textContent = "reconnecting…"; $("status").className = "down"; };
  on("hello", onHello);
  on("pose", onPose);
  on("stats", onStats);
  on("event", onEvent);
  on("watch", (w) => {
    const id = w.watch;
    const known = state.watches.get(id);
    if (known) known.state = w.state;
    renderWatches();
  });
}

// ---- questions -------------------------------------------------------------------------

$("ask-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("question").value.trim();
  if (!text) return;
  const request = { text, answer: $("kind").value };
  if ($("live").checked) request.image = "live";
  const li = document.createElement("li");
  const q = document.createElement("div");
  q.className = "q";
  q.textContent = text;
  const a = document.createElement("div");
  a.className = "a";
  a.textContent = "…";
  li.append(q, a);
  $("answers").prepend(li);
  $("question").value = "";
  try {
    const response = await fetch(withToken("api/ask"), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request),
    });
    showAnswer(li, a, await response.json());
  } catch (err) {
    a.className = "err";
    a.textContent = `no answer: ${err}`;
  }
});

function showAnswer(li, a, reply) {
  li.dataset.id = reply.id || "";
  if (reply.error) {
    a.className = "err";
    a.textContent = `${reply.error.code}: ${reply.error.message}`;
    return;
  }
  a.textContent = reply.p_yes !== undefined ? `${reply.text} (P(yes) ${reply.p_yes.toFixed(2)})` : reply.text;
  const meta = document.createElement("div");
  meta.className = "meta";
  const t = reply.timings;
  const frame = reply.frame_seq !== undefined ? ` · frame ${reply.frame_seq}, ${reply.frame_age_ms.toFixed(0)} ms old` : "";
  meta.textContent = `${t.total_ms.toFixed(0)} ms · ${t.reused_positions}/${t.prompt_positions} positions reused · ${reply.poses.length} pose(s)${frame}`;
  li.append(meta);
  state.answerPoses = reply.poses.map((p) => p.joints);
  drawScene();
}

setInterval(drawCharts, 500);
drawScene();
connect();
