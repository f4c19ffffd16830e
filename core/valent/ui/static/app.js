// valent ui: dispatch list, live dispatch graph, node panel, timeline, cancel.
// Plain JS, no dependencies: the graph SVG is laid out and drawn by the server; this script
// recolours it from /changes (only the nodes that changed since the last poll).
"use strict";

const body = document.body;
const PAGE = body.dataset.page;
const DID = body.dataset.id;
const READ_ONLY = body.dataset.readonly === "1";
const CSRF = document.querySelector("meta[name=csrf]").content;
const FINAL = new Set(["COMPLETED", "FAILED", "CANCELLED"]);
const STATUSES = ["NEW_OBJECT", "PENDING", "RUNNING", "CANCELLING", "COMPLETED", "FAILED",
  "CANCELLED"];
const BAR_ORDER = ["COMPLETED", "RUNNING", "PENDING", "NEW_OBJECT", "CANCELLED", "FAILED"];
const main = document.getElementById("main");
if (READ_ONLY) document.getElementById("ro").textContent = "read-only";

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;",
    '"': "&quot;", "'": "&#39;" }[c]));
}
function el(html) { const t = document.createElement("template"); t.innerHTML = html.trim();
  return t.content.firstChild; }
async function get(url) {
  const r = await fetch(url, { credentials: "same-origin" });
  if (!r.ok) throw new Error(`${r.status} ${await r.text()}`);
  return r.json();
}
async function post(url, data) {
  const r = await fetch(url, { method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-Valent-CSRF": CSRF },
    body: JSON.stringify(data) });
  const text = await r.text();
  if (!r.ok) throw new Error(text);
  return JSON.parse(text);
}
function secs(s) {
  if (s == null) return "-";
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)}s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m}m${Math.round(s % 60)}s` : `${Math.floor(m / 60)}h${m % 60}m`;
}
function when(t) { return t == null ? "-" : new Date(t * 1000).toLocaleString(); }
function clock(t) { return t == null ? "-" : new Date(t * 1000).toLocaleTimeString(); }
function st(s) { return `<span class="st st-${esc(s)}">${esc(s)}</span>`; }
function oc(o) { return o ? `<span class="oc">${esc(o)}</span>` : ""; }
function progress(done, total) {
  const pct = total ? Math.round((100 * done) / total) : 0;
  return `<span class="progress"><span style="width:${pct}%"></span></span> ${done}/${total}`;
}

// ------------------------------------------------------------------ list

function listPage() {
  main.innerHTML = `<h1>Dispatches</h1><div class="toolbar">
    <input id="q" placeholder="search lattice or id" size="28">
    <select id="status"><option value="">any status</option>
      ${STATUSES.map((s) => `<option>${s}</option>`).join("")}</select>
    <span id="count" class="legend"></span></div>
    <table id="dispatches"><thead><tr><th>ID</th><th>LATTICE</th><th>STATUS</th>
    <th>STARTED</th><th>DURATION</th><th>PROGRESS</th><th>OWNER</th></tr></thead>
    <tbody></tbody></table>`;
  const q = document.getElementById("q"), sel = document.getElementById("status");
  const params = new URLSearchParams(location.search);
  q.value = params.get("q") || ""; sel.value = params.get("status") || "";
  let timer = null;
  async function refresh() {
    clearTimeout(timer);
    try {
      const url = `/api/dispatches?q=${encodeURIComponent(q.value)}&status=${sel.value}`;
      const rows = await get(url);
      const tb = document.querySelector("#dispatches tbody");
      const html = rows.map((d) => `<tr class="row" data-id="${esc(d.id)}">
        <td class="mono">${esc(d.id.slice(0, 8))}</td><td>${d.parent ? "&#8627; " : ""}${esc(d.lattice)}${
          d.subs ? ` <span class="legend subs">+${d.subs} sublattice dispatch${d.subs > 1 ? "es" : ""}</span>` : ""}${
          d.parent ? ` <span class="legend">in ${esc(d.parent.slice(0, 8))}</span>` : ""}</td>
        <td>${st(d.status)}</td><td>${when(d.start || d.created)}</td>
        <td>${secs(d.duration)}</td><td>${progress(d.done, d.total)}</td>
        <td class="${d.owner}">${d.owner === "-" ? "-" : `pid ${d.owner_pid} ${d.owner}`}</td>
        </tr>`).join("") || `<tr><td colspan="7">no dispatches</td></tr>`;
      if (html !== tb.dataset.html) { tb.innerHTML = html; tb.dataset.html = html; }
      document.getElementById("count").textContent = `${rows.length} shown`;
    } catch (e) { console.error(e); }
    timer = setTimeout(refresh, 1500);
  }
  q.addEventListener("input", refresh); sel.addEventListener("change", refresh);
  document.querySelector("#dispatches tbody").addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr.row"); if (tr) location.href = `/d/${tr.dataset.id}`;
  });
  refresh();
}

// ------------------------------------------------------------------ dispatch

const S = { nodes: new Map(), names: new Map(), boxOf: new Map(), groups: {}, version: 0,
  dispatch: null, selected: null, zoom: 1, tab: "graph", params: true, group: true };

function dispatchPage() {
  const qs = new URLSearchParams(location.search);
  S.params = qs.get("params") !== "0"; S.group = qs.get("group") !== "0";
  main.innerHTML = `<div class="summary" id="summary"></div>
    <div class="toolbar"><span class="tabs"><button data-tab="graph" class="on">graph</button>
      <button data-tab="timeline">timeline</button></span>
      <label><input type="checkbox" id="params" ${S.params ? "checked" : ""}> parameters</label>
      <label><input type="checkbox" id="grouping" ${S.group ? "checked" : ""}> group repeated
        tasks</label>
      <button id="zin">+</button><button id="zout">−</button><button id="zfit">fit</button>
      <span class="legend">${["NEW_OBJECT", "PENDING", "RUNNING", "COMPLETED", "FAILED",
        "CANCELLED"].map((s) => `<span><i class="lg-${s}"></i>${s}</span>`).join("")}
      </span><span id="msg"></span></div>
    <div class="layout"><div id="graph"></div><div id="timeline" style="display:none"></div>
    <aside id="panel"></aside></div>`;
  for (const s of ["NEW_OBJECT", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"]) {
    document.querySelector(`.lg-${s}`).style.background = {
      NEW_OBJECT: "#e5e7eb", PENDING: "#dbeafe", RUNNING: "#93c5fd", COMPLETED: "#86efac",
      FAILED: "#fca5a5", CANCELLED: "#fde68a" }[s];
  }
  document.querySelectorAll(".tabs button").forEach((b) => b.addEventListener("click", () => {
    S.tab = b.dataset.tab;
    document.querySelectorAll(".tabs button").forEach((x) => x.classList.toggle("on", x === b));
    document.getElementById("graph").style.display = S.tab === "graph" ? "" : "none";
    document.getElementById("timeline").style.display = S.tab === "timeline" ? "" : "none";
    if (S.tab === "timeline") loadTimeline();
  }));
  document.getElementById("params").addEventListener("change", (e) => {
    S.params = e.target.checked; loadGraph(); });
  document.getElementById("grouping").addEventListener("change", (e) => {
    S.group = e.target.checked; loadGraph(); });
  document.getElementById("zin").onclick = () => { S.zoomed = true; setZoom(S.zoom * 1.25); };
  document.getElementById("zout").onclick = () => { S.zoomed = true; setZoom(S.zoom / 1.25); };
  document.getElementById("zfit").onclick = fit;
  document.getElementById("graph").addEventListener("click", (ev) => {
    const g = ev.target.closest("g.box"); if (g) select(g.dataset.key);
  });
  loadGraph().then(poll);
}

async function loadGraph() {
  const g = await get(`/api/d/${DID}/graph?params=${S.params ? 1 : 0}&group=${S.group ? 1 : 0}`);
  const box = document.getElementById("graph");
  box.innerHTML = g.svg;
  S.svg = box.querySelector("svg");
  S.svgW = +S.svg.getAttribute("width"); S.svgH = +S.svg.getAttribute("height");
  S.groups = g.boxes;
  S.boxOf = new Map();
  for (const [key, members] of Object.entries(g.boxes)) for (const m of members) S.boxOf.set(m, key);
  for (const [id, name, kind, executor] of g.nodes) {
    S.names.set(id, { name, kind, executor });
    if (!S.boxOf.has(id)) S.boxOf.set(id, `n${id}`);
  }
  S.parents = g.parents;
  if (S.selected) { const sel = document.getElementById(`b-${S.selected.key}`);
    if (sel) sel.classList.add("sel"); }
  if (S.nodes.size) for (const key of new Set(S.boxOf.values())) paintBox(key);
  if (!S.zoomed) fit(); else setZoom(S.zoom);
  document.body.dataset.graph = "ready";
}

function setZoom(z) {
  S.zoom = Math.max(0.05, Math.min(z, 4));
  if (!S.svg) return;
  S.svg.setAttribute("width", S.svgW * S.zoom); S.svg.setAttribute("height", S.svgH * S.zoom);
}
function fit() {
  const box = document.getElementById("graph");
  // fit the width (never below 35%: a tall graph scrolls rather than shrinking to dots)
  setZoom(Math.max(0.35, Math.min(1, (box.clientWidth - 10) / S.svgW)));
}

async function poll() {
  let delay = 700;
  try {
    const c = await get(`/api/d/${DID}/changes?since=${S.version}`);
    S.version = c.version;
    S.dispatch = c.dispatch;
    const touched = new Set();
    for (const n of c.nodes) { S.nodes.set(n.id, n); touched.add(S.boxOf.get(n.id)); }
    for (const key of touched) if (key) paintBox(key);
    summary();
    if (!body.dataset.live) {  // first full paint done (the benchmark reads this)
      body.dataset.live = "ready"; window.__firstRender = performance.now();
    }
    if (S.selected && c.nodes.some((n) => inSelected(n.id))) refreshPanel();
    if (S.tab === "timeline" && (c.nodes.length || !FINAL.has(c.dispatch.status))) loadTimeline();
    if (FINAL.has(c.dispatch.status) && ![...S.nodes.values()].some((n) => !FINAL.has(n.status)))
      delay = 4000;
  } catch (e) { console.error(e); delay = 2000; }
  setTimeout(poll, delay);
}

function inSelected(id) {
  if (!S.selected) return false;
  return S.selected.node != null ? S.selected.node === id : S.boxOf.get(id) === S.selected.key;
}

function boxState(key) {
  const members = S.groups[key] || [+key.slice(1)];
  if (!S.groups[key]) { const n = S.nodes.get(members[0]) || {}; return [n.status || "NEW_OBJECT",
    n.outcome || "", null]; }
  const counts = {}, outcomes = {};
  for (const m of members) {
    const n = S.nodes.get(m) || {};
    counts[n.status || "NEW_OBJECT"] = (counts[n.status || "NEW_OBJECT"] || 0) + 1;
    if (n.outcome) outcomes[n.outcome] = (outcomes[n.outcome] || 0) + 1;
  }
  let status = ["RUNNING", "FAILED", "CANCELLED", "PENDING"].find((s) => counts[s]);
  if (!status) status = counts.COMPLETED === members.length ? "COMPLETED" : "NEW_OBJECT";
  let badge = Object.entries(outcomes).sort((a, b) => b[1] - a[1]).slice(0, 2)
    .map(([o, n]) => `${n} ${o}`).join(", ");
  if (!badge) badge = `${(counts.COMPLETED || 0) + (counts.FAILED || 0) + (counts.CANCELLED || 0)}` +
    `/${members.length} done`;
  return [status, badge, counts];
}

function paintBox(key) {
  const g = document.getElementById(`b-${key}`);
  if (!g) return;
  const [status, badge, counts] = boxState(key);
  g.setAttribute("class", g.getAttribute("class").replace(/\bs-\w+/, `s-${status}`));
  g.dataset.status = status;
  const b = g.querySelector("text.badge"); if (b) b.textContent = badge;
  if (counts) {
    const bar = g.querySelector("g.bar"), frame = g.querySelector("rect.frame");
    const x0 = +frame.getAttribute("x") + 6, w = +frame.getAttribute("width") - 12;
    const y = +frame.getAttribute("y") + +frame.getAttribute("height") / 2 + 1;
    const total = S.groups[key].length;
    let x = x0, html = `<rect class="track" x="${x0.toFixed(1)}" y="${y.toFixed(1)}" ` +
      `width="${w.toFixed(1)}" height="5"/>`;
    for (const s of BAR_ORDER) if (counts[s]) {
      const ww = (w * counts[s]) / total;
      html += `<rect class="c-${s}" x="${x.toFixed(1)}" y="${y.toFixed(1)}" width="${ww.toFixed(1)}" height="5"/>`;
      x += ww;
    }
    bar.innerHTML = html;
  }
}

function summary() {
  // the facts are redrawn only when they change; the Cancel button lives apart, so a click on
  // it never lands on an element a poll just replaced
  const d = S.dispatch;
  document.title = `${d.lattice} ${d.status} · valent ui`;
  const box = document.getElementById("summary");
  if (!box.firstChild) box.innerHTML = `<span id="facts" class="summary"></span><span id="actions"></span>`;
  const facts = `<h1>${esc(d.lattice)} <span class="mono">${esc(d.id.slice(0, 8))}</span></h1>
    <span id="dstatus" data-status="${esc(d.status)}">${st(d.status)}</span>
    <span>${progress(d.done, d.total)}</span><span>started ${when(d.start || d.created)}</span>
    <span>duration ${secs(d.duration)}</span>
    <span class="${d.owner}">owner pid ${esc(d.owner_pid)} ${d.owner === "-" ? "" : d.owner}</span>
    ${d.parent ? `<span id="parent">sublattice of <a href="/d/${esc(d.parent)}">${esc(d.parent.slice(0, 8))}</a>
      node ${esc(d.parent_node)}</span>` : ""}
    ${d.redispatch_of ? `<span>redispatch of <a href="/d/${esc(d.redispatch_of)}">${esc(d.redispatch_of.slice(0, 8))}</a></span>` : ""}
    ${d.error ? `<div class="error">${esc(d.error)}</div>` : ""}`;
  const el0 = document.getElementById("facts");
  if (el0.dataset.html !== facts) { el0.innerHTML = facts; el0.dataset.html = facts; }
  const canCancel = !READ_ONLY && !FINAL.has(d.status);
  const actions = document.getElementById("actions");
  if (canCancel && !document.getElementById("cancel-dispatch")) {
    actions.innerHTML = `<button class="danger" id="cancel-dispatch">Cancel dispatch</button>`;
    document.getElementById("cancel-dispatch").onclick = () => cancel(null);
  } else if (!canCancel) actions.innerHTML = "";
}

async function cancel(taskIds) {
  const what = taskIds ? `node ${taskIds.join(", ")} and every node that depends on it`
    : `the whole dispatch ${DID.slice(0, 8)}`;
  if (!confirm(`Cancel ${what}? Running tasks are stopped.`)) return;
  const msg = document.getElementById("msg");
  try {
    const r = await post(`/api/d/${DID}/cancel`, { task_ids: taskIds });
    msg.innerHTML = `<span class="msg">${esc(r.message)}</span>`;
  } catch (e) { msg.innerHTML = `<span class="msg error">${esc(e.message)}</span>`; }
}

// ------------------------------------------------------------------ node panel

function select(key) {
  document.querySelectorAll("g.box.sel").forEach((g) => g.classList.remove("sel"));
  const g = document.getElementById(`b-${key}`); if (g) g.classList.add("sel");
  S.selected = S.groups[key] ? { key } : { key, node: +key.slice(1) };
  S.logs = null;
  refreshPanel();
}

function selectNode(id) { S.selected = { key: S.boxOf.get(id), node: id }; S.logs = null;
  refreshPanel(); }

async function refreshPanel() {
  const panel = document.getElementById("panel");
  panel.classList.add("open");
  if (S.selected.node == null) return groupPanel(panel, S.selected.key);
  const n = await get(`/api/d/${DID}/node/${S.selected.node}`);
  const canCancel = !READ_ONLY && !FINAL.has(n.status) && n.kind === "electron";
  const settings = Object.entries(n.settings || {}).map(([k, v]) => `${esc(k)}=${esc(v)}`)
    .join(", ");
  panel.innerHTML = `<h2>${esc(n.name)}(${n.node_id}) ${st(n.status)}${oc(n.cancel_outcome)}</h2>
    ${canCancel ? `<button class="danger" id="cancel-node">Cancel node + dependents</button>` : ""}
    <dl><dt>kind</dt><dd>${esc(n.kind)}</dd>
    <dt>executor</dt><dd>${esc(n.executor || "-")}</dd>
    ${settings ? `<dt>settings</dt><dd class="mono">${settings}</dd>` : ""}
    <dt>started</dt><dd>${when(n.start_time)}</dd><dt>ended</dt><dd>${when(n.end_time)}</dd>
    <dt>duration</dt><dd>${secs(n.duration)}</dd><dt>attempts</dt><dd>${n.attempts}</dd>
    ${n.cancel_requested_at ? `<dt>cancel requested</dt><dd>${when(n.cancel_requested_at)}</dd>` : ""}
    ${n.cancel_confirmed_at ? `<dt>cancel confirmed</dt><dd>${when(n.cancel_confirmed_at)}</dd>` : ""}
    ${n.cancel_outcome ? `<dt>cancel outcome</dt><dd id="outcome">${esc(n.cancel_outcome)}</dd>` : ""}
    ${n.reason ? `<dt>reason</dt><dd>${esc(n.reason)}</dd>` : ""}</dl>
    ${(n.children || []).length ? `<h3>inner dispatch</h3><table class="members">${n.children.map((c) =>
      `<tr><td><a class="child" href="/d/${esc(c.id)}">${esc(c.lattice)} ${esc(c.id.slice(0, 8))}</a></td>
       <td>${st(c.status)}</td><td>${progress(c.done, c.total)}</td></tr>`).join("")}</table>` : ""}
    <h3>inputs</h3>${n.parents.length ? `<table class="members">${n.parents.map((p) =>
      `<tr><td>${esc(p.name)}(${p.node_id})</td><td>${st(p.status)}</td>
       <td class="mono">${esc(p.value ?? "")}</td></tr>`).join("")}</table>` : "<p>none</p>"}
    ${n.output != null ? `<h3>output</h3><pre id="output">${esc(n.output)}</pre>
      ${n.output_truncated || n.output_file ? `<a target="_blank" href="/api/d/${DID}/node/${n.node_id}/output">whole output</a>` : ""}` : ""}
    ${n.error ? `<h3>error</h3><pre class="err">${esc(n.error)}</pre>` : ""}
    ${n.traceback ? `<h3>traceback</h3><pre class="err">${esc(n.traceback)}</pre>` : ""}
    ${n.kind === "electron" ? `<h3>stdout</h3><pre id="stdout"></pre><h3>stderr</h3>
      <pre id="stderr"></pre>` : ""}`;
  const b = document.getElementById("cancel-node");
  if (b) b.onclick = () => cancel([n.node_id]);
  if (n.kind === "electron") startLogs(n.node_id);
}

function startLogs(id) {
  if (S.logs && S.logs.id === id) { renderLogs(); return; }
  S.logs = { id, stdout: "", stderr: "", offsets: { stdout: 0, stderr: 0 }, done: false };
  const mine = S.logs;
  (async function loop() {
    while (S.logs === mine && !mine.done) {
      try {
        const r = await get(`/api/d/${DID}/node/${id}/logs?stdout=${mine.offsets.stdout}` +
          `&stderr=${mine.offsets.stderr}`);
        if (r.live) { mine.stdout += r.stdout; mine.stderr += r.stderr; mine.offsets = r.offsets; }
        else if (FINAL.has(r.status)) { mine.stdout = r.stdout; mine.stderr = r.stderr;
          mine.done = true; }
        mine.status = r.status; mine.live = r.live;
        if (S.logs === mine) renderLogs();
      } catch (e) { console.error(e); }
      await new Promise((ok) => setTimeout(ok, 400));
    }
  })();
}

function renderLogs() {
  for (const s of ["stdout", "stderr"]) {
    const p = document.getElementById(s);
    if (!p) continue;
    let text = S.logs[s];
    if (!text && S.logs.status === "RUNNING" && !S.logs.live)
      text = "(running: this executor stores the task's output when it ends)";
    else if (!text && S.logs.status && S.logs.status !== "RUNNING") text = "(nothing)";
    if (p.textContent !== text) { p.textContent = text; p.scrollTop = p.scrollHeight; }
  }
}

function groupPanel(panel, key) {
  const members = S.groups[key];
  const first = S.names.get(members[0]) || {};
  const [status, badge, counts] = boxState(key);
  const shown = members.slice(0, 300);
  panel.innerHTML = `<h2>${esc(first.name)} ×${members.length} ${st(status)}</h2>
    <p>${Object.entries(counts).map(([s, n]) => `${n} ${esc(s)}`).join(", ")}
    ${badge ? `; cancel: ${esc(badge)}` : ""}</p>
    <table class="members">${shown.map((m) => { const n = S.nodes.get(m) || {};
      return `<tr class="row" data-node="${m}"><td>${esc(first.name)}(${m})</td>
      <td>${st(n.status || "NEW_OBJECT")}${oc(n.outcome)}</td></tr>`; }).join("")}</table>
    ${members.length > shown.length ? `<p>and ${members.length - shown.length} more</p>` : ""}`;
  panel.querySelector("table").addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr[data-node]"); if (tr) selectNode(+tr.dataset.node);
  });
}

// ------------------------------------------------------------------ timeline

const TL_COLORS = { COMPLETED: "#16a34a", RUNNING: "#2563eb", FAILED: "#dc2626",
  CANCELLED: "#d97706", PENDING: "#93c5fd", NEW_OBJECT: "#d1d5db" };

async function loadTimeline() {
  if (S.tlBusy) return; S.tlBusy = true;
  try {
    const t = await get(`/api/d/${DID}/timeline`);
    const box = document.getElementById("timeline");
    const rows = []; for (const [ex, n] of t.rows) for (let i = 0; i < n; i++) rows.push([ex, i]);
    const rowIndex = new Map(rows.map(([ex, i], k) => [`${ex}/${i}`, k]));
    const left = 130, rh = 24, top = 24;
    const width = Math.max(box.clientWidth - 20, 500), span = t.t1 - t.t0;
    const x = (v) => left + ((v - t.t0) / span) * (width - left - 10);
    let svg = `<svg class="tl" width="${width}" height="${top + rows.length * rh + 10}">`;
    for (let k = 0; k <= 5; k++) {
      const v = t.t0 + (span * k) / 5;
      svg += `<line x1="${x(v)}" x2="${x(v)}" y1="${top - 6}" y2="${top + rows.length * rh}"
        stroke="#e5e7eb"/><text x="${x(v)}" y="14" text-anchor="${k === 5 ? "end" : "middle"}">${secs(v - t.t0)}</text>`;
    }
    rows.forEach(([ex, i], k) => { svg += `<text x="6" y="${top + k * rh + 16}">${esc(ex)} slot ${i}</text>`; });
    for (const b of t.bars) {
      const k = rowIndex.get(`${b.executor}/${b.slot}`);
      const x0 = x(b.start), x1 = x(b.end ?? t.now);
      svg += `<g class="bar" data-node="${b.id}"><rect x="${x0}" y="${top + k * rh + 3}"
        width="${Math.max(2, x1 - x0)}" height="${rh - 6}" rx="3" fill="${TL_COLORS[b.status] || "#999"}">
        </rect><title>${esc(b.name)}(${b.id}) ${esc(b.status)} ${esc(b.outcome || "")}
        ${secs((b.end ?? t.now) - b.start)}</title>
        ${x1 - x0 > 60 ? `<text x="${x0 + 4}" y="${top + k * rh + 16}" fill="#fff"
          style="fill:#fff">${esc(b.name)}(${b.id})</text>` : ""}</g>`;
    }
    svg += "</svg>";
    box.innerHTML = rows.length ? svg : "<p style='padding:10px'>no task has started yet</p>";
    box.querySelectorAll("g.bar").forEach((g) => g.addEventListener("click",
      () => selectNode(+g.dataset.node)));
  } finally { S.tlBusy = false; }
}

// ------------------------------------------------------------------ drawings

async function drawingsPage() {
  // lists what lattice.draw() / result.draw() wrote; a new drawing shows up within 2 s
  main.innerHTML = `<h1>Drawings</h1><p>Written by <code>lattice.draw()</code> and
    <code>result.draw()</code> into the results dir; the newest shows first.</p>
    <div class="toolbar"><select id="which"></select></div>
    <p id="none">none yet</p><iframe class="drawing" id="frame" style="display:none"></iframe>`;
  const sel = document.getElementById("which"), frame = document.getElementById("frame");
  let newest = null, picked = false;
  const show = () => {
    frame.style.display = "";
    const none = document.getElementById("none"); if (none) none.remove();
    frame.src = `/drawings/${encodeURIComponent(sel.value)}`;
  };
  sel.addEventListener("change", () => { picked = true; show(); });
  async function refresh() {
    try {
      const list = await get("/api/drawings");
      if (list.length && list[0].name !== newest) {
        const keep = sel.value;
        sel.innerHTML = list.map((d) => `<option>${esc(d.name)}</option>`).join("");
        newest = list[0].name;
        if (picked && keep) sel.value = keep; else show();
      }
    } catch (e) { console.error(e); }
    setTimeout(refresh, 2000);
  }
  refresh();
}

if (PAGE === "list") listPage();
else if (PAGE === "dispatch") dispatchPage();
else if (PAGE === "drawings") drawingsPage();
