// pagedlm's page: a chat over /v1/chat/completions and a live view of the engine's KV blocks
// and queues from /v1/engine/state/stream. Plain browser JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "pagedlm.apiKey";
const STATE_INTERVAL_MS = 250; // four view updates a second
const HISTORY = 240; // plot points kept: one minute at the update rate
const COLORS = { free: "#e5e7eb", cached: "#93c5fd", used: "#22c55e" };

// What the tests and the benchmark read: the newest snapshot, the time to draw the grid and to
// render a whole update (counts, grid, queues, plots), in ms.
const view = window.pagedlmView = { state: null, updates: 0, drawMs: [], updateMs: [], connected: false, grid: null };

// ---- the API key and requests ------------------------------------------------------------
function apiKey() { return $("api-key").value.trim(); }

function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  if (apiKey()) h.Authorization = "Bearer " + apiKey();
  return h;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return "HTTP " + resp.status + ": " + body.error.message;
  } catch (e) { /* not JSON */ }
  return "HTTP " + resp.status;
}

// Server-sent events from a fetch body (EventSource cannot send the Authorization header).
async function readEvents(resp, onData) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) onData(line.slice(6));
      }
    }
  }
}

async function checkServer() {
  try {
    const r = await fetch("/v1/models", { headers: authHeaders() });
    if (r.status === 401) {
      $("server-status").textContent = "API key needed";
      $("api-key").classList.add("bad");
      return;
    }
    $("api-key").classList.remove("bad");
    if (!r.ok) { $("server-status").textContent = await errorText(r); return; }
    const models = await r.json();
    const m = models.data[0];
    $("model-name").textContent = m.id + " · context " + m.max_model_len;
    $("server-status").textContent = "";
  } catch (e) {
    $("server-status").textContent = "server unreachable";
  }
}

// ---- chat --------------------------------------------------------------------------------
const chat = { messages: [], controller: null };

function numberParam(id, integer) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const v = Number(raw);
  // A value that is not a number is sent as written, so the server names it in a 400.
  if (!Number.isFinite(v) || (integer && !Number.isInteger(v))) return raw;
  return v;
}

function requestBody() {
  const body = { messages: [], stream: true, stream_options: { include_usage: true } };
  const system = $("p-system").value.trim();
  if (system) body.messages.push({ role: "system", content: system });
  body.messages.push(...chat.messages.map((m) => ({ role: m.role, content: m.content })));
  for (const [name, integer] of [["temperature", false], ["top_p", false], ["max_tokens", true], ["seed", true]]) {
    const v = numberParam("p-" + name, integer);
    if (v !== undefined) body[name] = v;
  }
  if ($("p-ignore_eos").checked) body.ignore_eos = true;
  return body;
}

function addBubble(role) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  el.innerHTML = '<div class="content"></div><div class="meta"></div>';
  $("messages").appendChild(el);
  return el;
}

function scrollChat() { const m = $("messages"); m.scrollTop = m.scrollHeight; }

function fmt(x, digits) { return x == null || !Number.isFinite(x) ? "–" : x.toFixed(digits); }

function showTimings(msg) {
  const t = msg.timings || {};
  const u = msg.usage || {};
  const ttft = t.ttft_ms != null ? t.ttft_ms : msg.clientTtft;
  const tps = t.predicted_per_second != null ? t.predicted_per_second : msg.clientTps();
  const completion = u.completion_tokens != null ? u.completion_tokens : msg.chunks;
  const parts = ["TTFT " + fmt(ttft, 0) + " ms", fmt(tps, 1) + " tok/s"];
  if (u.prompt_tokens != null) {
    const cached = u.prompt_tokens_details ? u.prompt_tokens_details.cached_tokens : 0;
    parts.push(u.prompt_tokens + " prompt (" + cached + " cached) + " + completion + " completion tokens");
  } else {
    parts.push(completion + " completion tokens");
  }
  if (msg.finish) parts.push(msg.finish);
  const meta = msg.el.querySelector(".meta");
  meta.textContent = parts.join(" · ");
  meta.dataset.ttftMs = fmt(ttft, 1);
  meta.dataset.tokPerS = fmt(tps, 2);
  meta.dataset.completionTokens = String(completion);
  meta.dataset.finish = msg.finish || "";
}

function renderMessage(msg) {
  msg.el.querySelector(".content").innerHTML = window.renderMarkdown(msg.content);
}

async function send(text) {
  chat.messages.push({ role: "user", content: text });
  const userEl = addBubble("user");
  userEl.querySelector(".content").textContent = text;
  const msg = {
    role: "assistant", content: "", el: addBubble("assistant"), start: performance.now(), first: null, last: null,
    chunks: 0, requestId: null, timings: null, usage: null, finish: null, clientTtft: null,
    clientTps() { return this.chunks > 1 ? (this.chunks - 1) / ((this.last - this.first) / 1000) : null; },
  };
  msg.el.classList.add("streaming");
  chat.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  let pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; renderMessage(msg); showTimings(msg); scrollChat(); });
  };
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(requestBody()), signal: chat.controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    await readEvents(resp, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.id && !msg.requestId) { msg.requestId = chunk.id; msg.el.dataset.requestId = chunk.id; }
      if (chunk.usage) msg.usage = chunk.usage;
      if (chunk.timings) msg.timings = chunk.timings;
      for (const c of chunk.choices || []) {
        if (c.delta && c.delta.content) {
          const now = performance.now();
          if (msg.first === null) { msg.first = now; msg.clientTtft = now - msg.start; }
          msg.last = now;
          msg.chunks += 1;
          msg.content += c.delta.content;
        }
        if (c.finish_reason) msg.finish = c.finish_reason;
      }
      redraw();
    });
  } catch (e) {
    if (e.name === "AbortError") {
      msg.finish = "stopped";
    } else {
      msg.finish = "error";
      msg.el.classList.add("error");
      msg.content += (msg.content ? "\n\n" : "") + e.message;
    }
  } finally {
    chat.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    msg.el.classList.remove("streaming");
    msg.el.dataset.done = "1";
    renderMessage(msg);
    showTimings(msg);
    scrollChat();
    if (msg.finish !== "error" && msg.content) chat.messages.push({ role: "assistant", content: msg.content });
  }
}

// ---- engine view: the block grid ---------------------------------------------------------
const grid = view.grid = { cell: 8, cols: 1, owners: new Map(), hover: -1, detailTimer: null, details: new Map() };

function sharedColor(ref) {
  // Darker orange for more sharers: ref 2 light, 8+ darkest.
  const k = Math.min(1, (ref - 2) / 6);
  return "rgb(" + Math.round(251 - 71 * k) + "," + Math.round(191 - 108 * k) + "," + Math.round(36 - 27 * k) + ")";
}

function blockState(ref, cached) {
  if (ref === 0) return cached ? "cached" : "free";
  return ref === 1 ? "used" : "shared";
}

function layoutGrid(n) {
  const canvas = $("blocks");
  const width = canvas.parentElement.clientWidth || 600;
  const maxHeight = Math.max(160, Math.min(420, window.innerHeight * 0.45));
  // The largest square cell (3..24 px) that fits every block in width x maxHeight.
  let cell = Math.floor(Math.sqrt((width * maxHeight) / Math.max(1, n)));
  cell = Math.max(3, Math.min(24, cell));
  while (cell > 3 && Math.ceil(n / Math.floor(width / cell)) * cell > maxHeight) cell--;
  grid.cell = cell;
  grid.cols = Math.max(1, Math.floor(width / cell));
  const height = Math.ceil(n / grid.cols) * cell;
  const dpr = window.devicePixelRatio || 1;
  if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
    canvas.style.width = width + "px";
    canvas.style.height = height + "px";
  }
  return dpr;
}

function drawGrid(state) {
  const t0 = performance.now();
  const canvas = $("blocks");
  const ctx = canvas.getContext("2d");
  const n = state.num_blocks;
  const dpr = layoutGrid(n);
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const { ref, cached } = state.blocks;
  const c = grid.cell;
  const gap = c >= 6 ? 1 : 0;
  let fill = null;
  for (let i = 0; i < n; i++) {
    const r = ref[i];
    const color = r >= 2 ? sharedColor(r) : COLORS[blockState(r, cached[i])];
    if (color !== fill) { ctx.fillStyle = color; fill = color; }
    ctx.fillRect((i % grid.cols) * c, Math.floor(i / grid.cols) * c, c - gap, c - gap);
  }
  if (c >= 14) { // room for the sharer count in each shared block
    ctx.fillStyle = "#111";
    ctx.font = Math.floor(c * 0.6) + "px sans-serif";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    for (let i = 0; i < n; i++) {
      if (ref[i] >= 2) ctx.fillText(String(ref[i]), (i % grid.cols) * c + c / 2, Math.floor(i / grid.cols) * c + c / 2);
    }
  }
  if (grid.hover >= 0 && grid.hover < n) {
    ctx.strokeStyle = "#111";
    ctx.lineWidth = 2;
    ctx.strokeRect((grid.hover % grid.cols) * c + 1, Math.floor(grid.hover / grid.cols) * c + 1, c - 2, c - 2);
  }
  const ms = performance.now() - t0;
  view.drawMs.push(ms);
  if (view.drawMs.length > 400) view.drawMs.shift();
}

function indexOwners(state) {
  const owners = new Map();
  for (const s of state.sequences) {
    s.blocks.forEach((b, pos) => {
      if (!owners.has(b)) owners.set(b, []);
      owners.get(b).push({ request_id: s.request_id, index: s.index, position: pos });
    });
  }
  grid.owners = owners;
}

function blockAt(ev) {
  const rect = $("blocks").getBoundingClientRect();
  const col = Math.floor((ev.clientX - rect.left) / grid.cell);
  const row = Math.floor((ev.clientY - rect.top) / grid.cell);
  if (col < 0 || col >= grid.cols || row < 0) return -1;
  const i = row * grid.cols + col;
  return view.state && i < view.state.num_blocks ? i : -1;
}

function tooltipHtml(i) {
  const st = view.state;
  const ref = st.blocks.ref[i];
  const esc = window.escapeHtml;
  let html = "<b>block " + i + "</b> · " + blockState(ref, st.blocks.cached[i]) + (ref >= 2 ? " ×" + ref : "");
  const owners = grid.owners.get(i) || [];
  if (owners.length) {
    html += "<br>" + owners.slice(0, 8).map((o) => esc(o.request_id) + (o.index ? "#" + o.index : "") +
      " · its block " + o.position).join("<br>");
    if (owners.length > 8) html += "<br>… and " + (owners.length - 8) + " more";
  }
  const d = grid.details.get(i);
  if (d && d.text != null) html += '<pre class="tokens">' + esc(d.text) + "</pre>";
  else if (ref > 0 || st.blocks.cached[i]) html += '<div class="muted">loading tokens…</div>';
  return html;
}

function showTooltip(ev, i) {
  const tip = $("tooltip");
  if (i < 0) { tip.hidden = true; return; }
  tip.innerHTML = tooltipHtml(i);
  tip.hidden = false;
  const wrap = $("grid-wrap").getBoundingClientRect();
  tip.style.left = Math.min(ev.clientX - wrap.left + 12, wrap.width - 260) + "px";
  tip.style.top = (ev.clientY - wrap.top + 14) + "px";
}

async function fetchDetail(i, ev) {
  try {
    const r = await fetch("/v1/engine/blocks/" + i, { headers: authHeaders() });
    if (!r.ok) return;
    grid.details.set(i, await r.json());
    if (grid.hover === i) showTooltip(ev, i);
  } catch (e) { /* the next hover retries */ }
}

function onGridMove(ev) {
  const i = blockAt(ev);
  if (i !== grid.hover) {
    grid.hover = i;
    grid.details.delete(i); // block contents change: fetch afresh on each new hover
    clearTimeout(grid.detailTimer);
    if (i >= 0) grid.detailTimer = setTimeout(() => fetchDetail(i, ev), 120);
    if (view.state) drawGrid(view.state);
  }
  showTooltip(ev, i);
}

// ---- engine view: queues, counters and plots ---------------------------------------------
function progress(s) {
  if (s.computed_tokens < s.prompt_tokens && s.queue === "running") {
    return { frac: s.computed_tokens / s.prompt_tokens, text: "prefill " + s.computed_tokens + "/" + s.prompt_tokens };
  }
  const max = s.max_tokens || 0;
  return { frac: max ? s.output_tokens / max : 0, text: s.output_tokens + (max ? "/" + max : "") + " tok" };
}

const MAX_ROWS = 64;

function renderQueues(state) {
  const esc = window.escapeHtml;
  const mine = new Set(chat.controller ? [...document.querySelectorAll(".msg.streaming")].map((e) => e.dataset.requestId) : []);
  for (const q of ["running", "waiting", "preempted"]) {
    const seqs = state.sequences.filter((s) => s.queue === q);
    $("queue-" + q + "-count").textContent = String(state.queues[q]);
    let html = "";
    for (const s of seqs.slice(0, MAX_ROWS)) {
      const p = progress(s);
      const own = [...mine].some((id) => id && s.request_id.startsWith(id)) ? " mine" : "";
      html += '<li class="seq' + own + '" data-request-id="' + esc(s.request_id) + '"><span class="rid">' +
        esc(s.request_id.slice(0, 18)) + (s.index ? "#" + s.index : "") + "</span>" +
        '<span class="pbar"><span style="width:' + Math.round(100 * Math.min(1, p.frac)) + '%"></span></span>' +
        '<span class="ptext">' + p.text + " · " + s.blocks.length + " blk" +
        (s.preemptions ? " · preempted ×" + s.preemptions : "") + "</span></li>";
    }
    if (seqs.length > MAX_ROWS) html += '<li class="muted">… and ' + (seqs.length - MAX_ROWS) + " more</li>";
    $("queue-" + q).innerHTML = html;
  }
}

function renderCounts(state) {
  for (const k of ["free", "cached", "used", "shared"]) $("count-" + k).textContent = String(state.counts[k]);
  const m = state.metrics;
  $("pool-info").textContent = state.num_blocks + " blocks × " + state.block_size + " tokens · KV usage " +
    (100 * m.kv_cache_usage).toFixed(1) + "% · prefix caching " + (state.prefix_caching ? "on" : "off") +
    " · max " + state.max_num_seqs + " sequences" + bucketText(state.decode_buckets);
}

// Each decode batch bucket: compiled, compiling (built in the background, eager meanwhile) or eager.
function bucketText(buckets) {
  if (!buckets) return " · decode eager";
  return " · decode buckets " + Object.entries(buckets).map(([b, st]) => b + " " + st).join(", ");
}

const PLOTS = [
  { key: "tokps", label: "generated tokens/s", digits: 0 },
  { key: "kv", label: "KV usage %", max: 100 },
  { key: "hit", label: "prefix hit rate % (last 2 s)", max: 100 },
  { key: "batch", label: "running sequences", digits: 0 },
  { key: "preempt", label: "preemptions / update", digits: 0 },
];
const history = [];

function pushHistory(state) {
  const m = state.metrics;
  const prev = history.length ? history[history.length - 1] : null;
  const back = history.length >= 8 ? history[history.length - 8] : history[0];
  const point = { t: state.time, gen: m.generation_tokens, hits: m.prefix_cache_hits, queries: m.prefix_cache_queries,
    pre: m.num_preemptions, kv: 100 * m.kv_cache_usage, batch: state.queues.running, tokps: null, hit: null, preempt: 0 };
  if (prev && point.t > prev.t) {
    point.tokps = Math.max(0, (point.gen - prev.gen) / (point.t - prev.t));
    point.preempt = Math.max(0, point.pre - prev.pre);
  }
  if (back && point.queries > back.queries) point.hit = 100 * (point.hits - back.hits) / (point.queries - back.queries);
  history.push(point);
  if (history.length > HISTORY) history.shift();
}

function drawPlot(canvas, { key, label, max: fixedMax, digits }) {
  const width = canvas.clientWidth || 200;
  const height = canvas.clientHeight || 70;
  const dpr = window.devicePixelRatio || 1;
  if (canvas.width !== Math.round(width * dpr)) { canvas.width = Math.round(width * dpr); canvas.height = Math.round(height * dpr); }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const vals = history.map((p) => p[key]);
  const finite = vals.filter((v) => v != null);
  const last = finite.length ? finite[finite.length - 1] : null;
  const max = fixedMax || Math.max(1, ...finite) * 1.1;
  ctx.strokeStyle = "#2563eb";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  let pen = false;
  vals.forEach((v, i) => {
    if (v == null) { pen = false; return; }
    const x = width * (i + HISTORY - vals.length) / (HISTORY - 1);
    const y = height - 4 - (height - 18) * Math.min(1, v / max);
    if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    pen = true;
  });
  ctx.stroke();
  ctx.fillStyle = "#374151";
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "top";
  ctx.fillText(label + ": " + (last == null ? "–" : last.toFixed(digits == null ? 1 : digits)) + "  (max " + max.toFixed(0) + ")", 4, 2);
}

function drawPlots() {
  PLOTS.forEach((p) => drawPlot($("plot-" + p.key), p));
}

function onState(state) {
  view.state = state;
  view.updates += 1;
  indexOwners(state);
  pushHistory(state);
  requestAnimationFrame(() => {
    if (view.state !== state) return; // a newer snapshot came first: draw that one
    const t0 = performance.now();
    renderCounts(state);
    drawGrid(state);
    renderQueues(state);
    drawPlots();
    $("engine").dataset.updates = String(view.updates);
    view.updateMs.push(performance.now() - t0);
    if (view.updateMs.length > 400) view.updateMs.shift();
  });
}

// ---- engine view: the stream -------------------------------------------------------------
const live = { controller: null, retry: null };

function stopLive() {
  clearTimeout(live.retry);
  if (live.controller) live.controller.abort();
  live.controller = null;
  view.connected = false;
}

async function startLive() {
  stopLive();
  if (!$("live").checked) return;
  const controller = live.controller = new AbortController();
  try {
    const r = await fetch("/v1/engine/state/stream?interval_ms=" + STATE_INTERVAL_MS,
      { headers: authHeaders(), signal: controller.signal });
    if (!r.ok) throw new Error(await errorText(r));
    view.connected = true;
    $("engine").classList.remove("offline");
    await readEvents(r, (data) => onState(JSON.parse(data)));
  } catch (e) {
    if (e.name === "AbortError") return;
    $("pool-info").textContent = "engine view: " + e.message;
  }
  if (live.controller === controller) { // ended without being stopped: retry soon
    view.connected = false;
    $("engine").classList.add("offline");
    live.retry = setTimeout(startLive, 2000);
  }
}

// ---- wiring ------------------------------------------------------------------------------
function init() {
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  const applyKey = () => {
    localStorage.setItem(KEY_STORE, apiKey());
    checkServer();
    startLive();
  };
  $("api-key").addEventListener("change", applyKey);
  $("key-form").addEventListener("submit", (ev) => { ev.preventDefault(); applyKey(); });
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || chat.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => { if (chat.controller) chat.controller.abort(); });
  $("clear").addEventListener("click", () => { if (!chat.controller) { chat.messages = []; $("messages").innerHTML = ""; } });
  $("live").addEventListener("change", startLive);
  // A hidden tab draws nothing: close its stream until it is shown again.
  document.addEventListener("visibilitychange", () => { if (document.hidden) stopLive(); else startLive(); });
  $("blocks").addEventListener("mousemove", onGridMove);
  $("blocks").addEventListener("mouseleave", () => { grid.hover = -1; $("tooltip").hidden = true; });
  window.addEventListener("resize", () => { if (view.state) { drawGrid(view.state); drawPlots(); } });
  const plots = $("plots");
  for (const p of PLOTS) {
    const c = document.createElement("canvas");
    c.id = "plot-" + p.key;
    c.className = "plot";
    plots.appendChild(c);
  }
  checkServer();
  startLive();
}

init();
