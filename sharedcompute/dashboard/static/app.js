// The sharedcompute dashboard page: one WebSocket (/api/ws) feeds every panel.
//
// The server sends a "hello" (a snapshot, the last task-stream records, every kept
// error), then an "update" every half second with a fresh snapshot and only the
// records and errors that are new. The stream keeps at most MAX_RECORDS records
// and WINDOW_S seconds, so the page stays light whatever the number of tasks;
// the task list is paged from /api/tasks. Text goes in with textContent, never
// innerHTML: task names and tracebacks are user data.
"use strict";

const WINDOW_S = 30;
const MAX_RECORDS = 50000;
const MAX_ERRORS = 100;
const PAGE = 50;

const stream = [];        // [seq, key, name, worker, node, start, duration, ok]
const errors = [];        // newest first
const lanes = new Map();  // worker id -> lane index
let clockOffset = 0;      // server time - local time (s)
let lastSnapshot = null;
let pageOffset = 0;

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function row(cells, classes) {
  const tr = document.createElement("tr");
  cells.forEach((c, i) => tr.appendChild(el("td", c, classes && classes[i])));
  return tr;
}

function fill(tableId, rows) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren(...rows);
}

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function seconds(s) {
  if (s === null || s === undefined) return "";
  if (s < 0.001) return (s * 1e6).toFixed(0) + " µs";
  if (s < 1) return (s * 1e3).toFixed(1) + " ms";
  return s.toFixed(2) + " s";
}

function colour(name) {
  let h = 0;
  for (let i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) >>> 0;
  return `hsl(${h % 360}, 65%, 50%)`;
}

// -- the WebSocket ------------------------------------------------------------------

function connect() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(scheme + location.host + "/api/ws");
  ws.onopen = () => { $("connection").textContent = "live"; $("connection").className = "badge"; };
  ws.onclose = () => {
    $("connection").textContent = "disconnected";
    $("connection").className = "badge off";
    setTimeout(connect, 1000);
  };
  ws.onmessage = (event) => receive(JSON.parse(event.data));
}

function receive(message) {
  if (message.type === "hello") {
    stream.length = 0;
    errors.length = 0;
  }
  for (const record of message.stream) stream.push(record);
  if (stream.length > MAX_RECORDS) stream.splice(0, stream.length - MAX_RECORDS);
  for (const error of message.errors) errors.unshift(error);
  if (errors.length > MAX_ERRORS) errors.length = MAX_ERRORS;
  if (message.snapshot && message.snapshot.time) {
    lastSnapshot = message.snapshot;
    clockOffset = lastSnapshot.time - Date.now() / 1000;
    render(lastSnapshot);
  }
  if (message.errors.length || message.type === "hello") renderErrors();
  drawStream();
  if (pageOffset === 0 && message.stream.length) loadPage();
}

// -- panels -------------------------------------------------------------------------

function render(snap) {
  $("totals-finished").textContent = snap.totals.finished;
  $("totals-failed").textContent = snap.totals.failed;
  $("totals-workers").textContent = snap.workers.length;
  $("totals-nodes").textContent = snap.nodes.filter((n) => n.alive).length;

  const counts = $("counts");
  counts.replaceChildren(...Object.entries(snap.counts).map(([state, n]) => {
    const box = el("div", null, "count");
    box.id = "count-" + state;
    box.appendChild(el("b", n));
    box.appendChild(el("span", state));
    return box;
  }));

  fill("workers", snap.workers.map((w) => row([
    w.id, w.node, w.pid === null ? "" : w.pid + (w.actor !== null ? ` (actor ${w.actor})` : ""),
    w.cpu === null ? "" : w.cpu.toFixed(0), bytes(w.rss), w.assigned,
    w.tasks.map((t) => t.name).join(", ") + (w.assigned > w.tasks.length ? ", …" : ""),
  ])));
  snap.workers.forEach((w) => { if (!lanes.has(w.id)) lanes.set(w.id, lanes.size); });

  fill("functions", snap.functions.map((f) => row(
    [f.name, f.finished, f.failed, seconds(f.mean_s)], ["", "", f.failed ? "bad" : "", ""])));

  const store = snap.store;
  if (store && store.capacity) {
    $("store-used").style.width = (100 * store.used_bytes / store.capacity).toFixed(1) + "%";
    $("store-text").textContent =
      `${bytes(store.used_bytes)} of ${bytes(store.capacity)} in ${store.num_objects} objects; ` +
      `spilled ${bytes(store.spilled_bytes)} in ${store.spilled_objects} objects`;
  } else {
    $("store-text").textContent = "no store yet";
  }
  fill("nodes", snap.nodes.map((n) => row([
    n.node_id, n.address, n.alive ? "yes" : "no", n.workers,
    `${bytes(n.store_used)} / ${bytes(n.store_capacity)}`,
    `${(n.available || {}).CPU ?? ""} / ${(n.resources || {}).CPU ?? ""}`,
  ])));

  fill("actors", snap.actors.map((a) => row([
    a.id, a.name ? `${a.description} (${a.name})` : a.description,
    a.alive ? "alive" : (a.dead ? "dead" : "starting"),
    a.restarts === null ? "" : `${a.restarts} / ${a.max_restarts}`, a.node,
    a.pid === null ? "" : a.pid,
  ], ["", "", a.dead ? "bad" : "", "", "", ""])));
}

function renderErrors() {
  $("errors-info").textContent = errors.length ? `(${errors.length}, newest first)` : "(none)";
  $("errors").replaceChildren(...errors.map((e) => {
    const item = el("details", null, "error-item");
    const summary = el("summary");
    summary.appendChild(el("span", e.type_name, "type"));
    summary.appendChild(document.createTextNode(
      `: ${e.message} — ${e.name || "task " + e.key} (key ${e.key}, ` +
      `${new Date(e.time * 1000).toLocaleTimeString()})`));
    item.appendChild(summary);
    item.appendChild(el("pre", e.traceback || "(no traceback came with it)", "traceback"));
    return item;
  }));
  const first = $("errors").querySelector("details");
  if (first) first.open = true;
}

// -- the task stream ----------------------------------------------------------------

function drawStream() {
  const canvas = $("stream");
  const now = Date.now() / 1000 + clockOffset;
  const start = now - WINDOW_S;
  while (stream.length && stream[0][5] + stream[0][6] < start - 5) stream.shift();
  for (const r of stream) if (!lanes.has(r[3])) lanes.set(r[3], lanes.size);

  const laneHeight = 18;
  const labelWidth = 70;
  const height = Math.max(60, lanes.size * laneHeight + 20);
  const width = canvas.clientWidth || 1200;
  if (canvas.height !== height) canvas.height = height;
  if (canvas.width !== width) canvas.width = width;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  const scale = (width - labelWidth) / WINDOW_S;

  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6b7280";
  for (const [worker, lane] of lanes) {
    ctx.fillText("worker " + worker, 4, lane * laneHeight + 13);
  }
  for (let s = 0; s <= WINDOW_S; s += 5) {
    const x = labelWidth + (WINDOW_S - s) * scale;
    ctx.fillRect(x, height - 14, 1, 4);
    ctx.fillText(s ? `-${s}s` : "now", Math.min(x - 10, width - 24), height - 2);
  }

  const used = new Map();
  let drawn = 0;
  for (const [, , name, worker, , begin, duration, ok] of stream) {
    const end = begin + duration;
    if (end < start) continue;
    const x = labelWidth + Math.max(0, begin - start) * scale;
    const w = Math.max(1, (end - Math.max(begin, start)) * scale);
    const y = lanes.get(worker) * laneHeight + 2;
    const fill = colour(name);
    used.set(name, fill);
    ctx.fillStyle = fill;
    ctx.fillRect(x, y, w, laneHeight - 4);
    if (!ok) {
      ctx.strokeStyle = "#b00020";
      ctx.lineWidth = 2;
      ctx.strokeRect(x, y, Math.max(w, 3), laneHeight - 4);
    }
    drawn++;
  }
  canvas.dataset.records = String(drawn);
  $("stream-info").textContent = `(last ${WINDOW_S} s: ${drawn} task executions)`;
  const legend = $("legend");
  legend.replaceChildren(...[...used].slice(0, 30).map(([name, fill]) => {
    const item = el("span");
    const swatch = el("i");
    swatch.style.background = fill;
    item.appendChild(swatch);
    item.appendChild(document.createTextNode(name));
    return item;
  }));
}

// -- the paged task list ------------------------------------------------------------

let loading = false;

async function loadPage() {
  if (loading) return;
  loading = true;
  try {
    const params = new URLSearchParams({ offset: pageOffset, limit: PAGE });
    const name = $("page-name").value.trim();
    if (name) params.set("name", name);
    if ($("page-failed").checked) params.set("ok", "false");
    const response = await fetch("/api/tasks?" + params);
    if (!response.ok) return;
    const page = await response.json();
    $("page-info").textContent = page.total
      ? `${page.offset + 1}–${page.offset + page.tasks.length} of ${page.total}` : "none";
    fill("tasks", page.tasks.map((t) => row([
      t.key, t.name, t.worker, t.node, new Date(t.end * 1000).toLocaleTimeString(),
      seconds(t.duration), bytes(t.input_bytes), t.ok ? "yes" : "no",
    ], ["", "", "", "", "", "", "", t.ok ? "" : "bad"])));
  } finally {
    loading = false;
  }
}

$("page-newer").onclick = () => { pageOffset = Math.max(0, pageOffset - PAGE); loadPage(); };
$("page-older").onclick = () => { pageOffset += PAGE; loadPage(); };
$("page-name").onchange = () => { pageOffset = 0; loadPage(); };
$("page-failed").onchange = () => { pageOffset = 0; loadPage(); };

setInterval(drawStream, 250);  // the window slides even when nothing new comes
connect();
loadPage();
