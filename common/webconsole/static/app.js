// telemetry console: reads GET /stats once a second and one topic's Server-Sent Events stream
// (GET /topics/<topic>/stream), through fetch() so that a token, when the server asks for one,
// goes in an Authorization header and never in a URL. Everything it keeps is bounded: the
// chart's history (CHART_POINTS samples per topic the server still has; CHART_TOPICS drawn)
// and the tail (TAIL_KEEP messages shown; the array is trimmed back to that at twice as many).
// Sections the server does not send are hidden, and keys it does not know are shown as JSON
// under "Other state", so the same page serves the broker and the streamer.
"use strict";

const POLL_MS = 1000;
const POLL_TIMEOUT_MS = 4000;
const CHART_POINTS = 300; // 5 minutes at one sample a second
const CHART_TOPICS = 5;
const TAIL_KEEP = 500;
const TOKEN_KEY = "telemetry-console-token";
const KNOWN = new Set(["topics", "workers", "bad_frames", "connections", "uptime_s"]);

const $ = (id) => document.getElementById(id);
const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  waitingForToken: null, // a promise while the token dialog is open
  stats: null,
  series: new Map(), // topic -> {points: [[t, rate]], last: [t, messages]}
  selected: null, // topic shown in the producers/tail sections
  tail: { topic: null, controller: null, lastId: null, retryMs: 2000, entries: [], paused: false, pending: 0, received: 0, filter: "" },
};

// -- numbers for people --------------------------------------------------------------------------

const SI = ["", " k", " M", " G", " T", " P"];
const trim = (s) => (s.includes(".") ? s.replace(/0+$/, "").replace(/\.$/, "") : s);
const fixed = (v) => trim(v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2));
function human(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  let v = Math.abs(n), i = 0;
  while (v >= 999.5 && i < SI.length - 1) { v /= 1000; i++; }
  return (n < 0 ? "-" : "") + (i === 0 && Number.isInteger(v) ? String(v) : fixed(v)) + SI[i];
}
const count = (n) => (n === undefined ? "–" : n < 10000 ? Number(n).toLocaleString("en-US") : human(n));
const rate = (n) => human(n === undefined ? undefined : Math.round(n * 10) / 10) + "/s";
function bytes(n) {
  if (n === undefined || n === null) return "–";
  const units = ["B", "kB", "MB", "GB", "TB", "PB"];
  let v = n, i = 0;
  while (v >= 999.5 && i < units.length - 1) { v /= 1000; i++; }
  return (i === 0 ? String(v) : fixed(v)) + " " + units[i];
}
function duration(s) {
  if (s === undefined) return "–";
  s = Math.floor(s);
  const pad = (n) => String(n).padStart(2, "0");
  if (s < 60) return s + " s";
  if (s < 3600) return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}
function ago(iso) {
  const t = Date.parse(iso);
  if (!iso || Number.isNaN(t)) return "–";
  const s = Math.max(0, (Date.now() - t) / 1000);
  return s < 2 ? "just now" : duration(s) + " ago";
}
const sum = (obj) => Object.values(obj || {}).reduce((a, b) => a + (typeof b === "number" ? b : 0), 0);

// -- DOM helpers ---------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}
// SVG nodes; colours go in `style` (CSS variables work there, not in presentation attributes)
const svg = (tag, attrs = {}, style = {}) => {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  Object.assign(node.style, style);
  return node;
};

// columns: [header, cell(row) -> string | Node, {cls, title(row)}]
function renderTable(table, columns, rows, empty, rowAttrs) {
  const head = el("thead", {}, el("tr", {}, ...columns.map(([h, , o = {}]) => el("th", { scope: "col", class: o.cls, text: h }))));
  const body = el("tbody");
  if (!rows.length) body.append(el("tr", {}, el("td", { class: "empty", colspan: columns.length, text: empty })));
  for (const row of rows) {
    const tr = el("tr", rowAttrs ? rowAttrs(row) : {});
    for (const [, cell, o = {}] of columns) {
      const value = cell(row);
      const td = el("td", { class: o.cls, title: o.title ? o.title(row) : null });
      td.append(value instanceof Node ? value : String(value));
      tr.append(td);
    }
    body.append(tr);
  }
  const caption = table.querySelector("caption");
  table.replaceChildren(...(caption ? [caption] : []), head, body);
}
const warnIf = (n, cls = "warnnum") => (n ? el("span", { class: cls, text: count(n) }) : count(n));

// -- HTTP with an optional token -----------------------------------------------------------------

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", "Bearer " + state.token);
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  if (response.status === 401) {
    await response.body?.cancel();
    throw new Unauthorized();
  }
  return response;
}

// Opens the token dialog once; every caller that got a 401 waits for the same answer.
function askForToken(rejected) {
  if (state.waitingForToken) return state.waitingForToken;
  setStatus("token", "token needed");
  showNothing();
  const dialog = $("token-dialog");
  $("token-error").textContent = rejected ? "That token was refused; try again." : "";
  state.waitingForToken = new Promise((resolve) => {
    const form = $("token-form");
    form.onsubmit = (event) => {
      event.preventDefault();
      const token = $("token-input").value.trim();
      if (!token) return;
      state.token = token;
      sessionStorage.setItem(TOKEN_KEY, token);
      $("token-input").value = "";
      dialog.close();
      state.waitingForToken = null;
      resolve();
    };
  });
  if (!dialog.open) dialog.showModal();
  $("token-input").focus();
  return state.waitingForToken;
}

// Before a token is accepted nothing the server said earlier stays on the page.
function showNothing() {
  state.stats = null;
  for (const id of ["topics-section", "producers-section", "workers-section", "groups-section", "subscribers-section", "tail-section", "other-section"]) $(id).hidden = true;
  $("overview").replaceChildren();
  state.tail.entries = [];
  fresh.length = 0;
  $("tail").replaceChildren();
}

function setStatus(kind, text) {
  const status = $("status");
  status.dataset.state = kind;
  status.textContent = text;
  document.body.dataset.stale = String(kind === "down");
}

// -- polling /stats ------------------------------------------------------------------------------

async function poll() {
  let delay = POLL_MS;
  try {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), POLL_TIMEOUT_MS);
    let response;
    try {
      response = await api("/stats", { signal: controller.signal });
    } finally {
      clearTimeout(timer);
    }
    if (!response.ok) throw new Error("HTTP " + response.status);
    const stats = await response.json();
    noticeRestart(stats);
    state.stats = stats;
    setStatus("live", "live · up " + duration(stats.uptime_s));
    render(stats);
  } catch (error) {
    if (error instanceof Unauthorized) {
      const hadToken = Boolean(state.token);
      state.token = "";
      sessionStorage.removeItem(TOKEN_KEY);
      await askForToken(hadToken);
      delay = 0;
    } else {
      setStatus("down", "no answer from the server · retrying");
      delay = 2000;
    }
  }
  setTimeout(poll, delay);
}

// A server that restarted without persistence numbers its messages from 0 again: the tail's
// Last-Event-ID means nothing there, so the tail goes on live and says what happened. (With
// persistence the offsets continue and the tail resumes after its last message.)
function noticeRestart(stats) {
  const tail = state.tail, previous = state.stats;
  if (!previous || !tail.topic || stats.uptime_s === undefined) return;
  const topic = stats.topics?.[tail.topic], before = previous.topics?.[tail.topic];
  const restarted = stats.uptime_s < previous.uptime_s || (topic && before && topic.next_offset < before.next_offset);
  if (!restarted || (topic && topic.persistence)) return;
  tail.lastId = null;
  addEntry({ notice: "the server restarted without persistence: its offsets start again; messages in between may not be shown" });
  if (tail.controller) tail.controller.abort();
  tail.controller = null;
  startTail(tail.topic);
}

function render(stats) {
  const topics = stats.topics || {};
  const names = Object.keys(topics).sort();
  if (!state.selected || !(state.selected in topics)) state.selected = names.find((n) => n === "telemetry") || names.find((n) => !n.endsWith(".dlq")) || names[0] || null;
  recordRates(topics);
  renderOverview(stats, topics);
  $("topics-section").hidden = names.length === 0;
  if (names.length) {
    renderChart();
    renderTopics(topics, names);
  }
  renderProducers(topics, names);
  renderWorkers(stats.workers);
  renderGroups(topics, names);
  renderSubscribers(topics, names);
  renderOther(stats);
  updateTailTopics(names);
}

function card(label, value, sub, id) {
  return el("div", { class: "card", id }, el("div", { class: "label", text: label }), el("div", { class: "value", text: value }), sub ? el("div", { class: "sub", text: sub }) : null);
}

function renderOverview(stats, topics) {
  const list = Object.values(topics);
  const cards = [];
  if (list.length) {
    cards.push(card("Messages", count(sum(Object.fromEntries(list.map((t) => [t.topic, t.messages])))), list.length + (list.length === 1 ? " topic" : " topics")));
    cards.push(card("Rate", rate(list.reduce((a, t) => a + (t.rate || 0), 0)), "last 10 s"));
    cards.push(card("Bytes", bytes(list.reduce((a, t) => a + (t.bytes || 0), 0)), "of messages"));
    const groups = list.reduce((a, t) => a + Object.keys(t.groups || {}).length, 0);
    const subs = list.reduce((a, t) => a + Object.keys(t.subscribers || {}).length, 0);
    cards.push(card("Readers", count(groups + subs), `${groups} groups · ${subs} subscribers`));
  }
  if (stats.workers) {
    const w = Object.values(stats.workers);
    const running = w.filter((x) => x.running).length;
    cards.push(card("Workers", `${running} / ${w.length}`, `${count(w.reduce((a, x) => a + (x.published || 0), 0))} published`));
  }
  if (stats.connections) cards.push(card("Connections", count(stats.connections.open), `${count(stats.connections.accepted)} accepted`));
  if (stats.uptime_s !== undefined) cards.push(card("Uptime", duration(stats.uptime_s)));
  $("overview").replaceChildren(...cards);
}

// -- the rate chart ------------------------------------------------------------------------------

// One point per poll: messages accepted between two answers over the server's own clock
// (uptime_s), so a late answer does not show as a spike; placed at the browser's time.
function recordRates(topics) {
  const now = Date.now() / 1000;
  for (const [name, t] of Object.entries(topics)) {
    let s = state.series.get(name);
    if (!s) state.series.set(name, (s = { points: [], last: null }));
    const at = t.uptime_s ?? now;
    if (s.last && t.messages >= s.last[1] && at > s.last[0]) s.points.push([now, (t.messages - s.last[1]) / (at - s.last[0])]);
    else if (s.last && at !== s.last[0]) s.points.push([now, null]); // the count went back: the broker restarted
    s.last = [at, t.messages];
    if (s.points.length > CHART_POINTS) s.points.splice(0, s.points.length - CHART_POINTS);
  }
  for (const name of state.series.keys()) if (!(name in topics)) state.series.delete(name);
}

// the chart's top: four gridline steps of 1, 2, 2.5 or 5 times a power of ten
function niceMax(v) {
  if (v <= 0) return 4;
  const step = v / 4, p = Math.pow(10, Math.floor(Math.log10(step)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= step) return 4 * m * p;
  return 40 * p;
}

function renderChart() {
  const chart = $("chart");
  const W = Math.max(300, chart.clientWidth || 800), H = chart.clientHeight || 190;
  const left = 52, right = 8, top = 8, bottom = 22;
  chart.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const now = Date.now() / 1000, span = CHART_POINTS;
  const series = [...state.series.entries()]
    .map(([name, s]) => ({ name, s, latest: (s.points.at(-1) || [0, 0])[1] || 0 }))
    .sort((a, b) => (a.name === state.selected ? -1 : b.name === state.selected ? 1 : b.latest - a.latest))
    .slice(0, CHART_TOPICS);
  const max = niceMax(Math.max(0, ...series.flatMap(({ s }) => s.points.map((p) => p[1] || 0))) * 1.1);
  const x = (t) => left + ((t - (now - span)) / span) * (W - left - right);
  const y = (v) => top + (1 - v / max) * (H - top - bottom);
  const nodes = [chart.querySelector("title")];
  for (let i = 0; i <= 4; i++) {
    const v = (max * i) / 4;
    nodes.push(svg("line", { class: "grid", x1: left, x2: W - right, y1: y(v), y2: y(v) }));
    const label = svg("text", { class: "axis", x: left - 6, y: y(v) + 4, "text-anchor": "end" });
    label.textContent = human(v);
    nodes.push(label);
  }
  for (const [t, text] of [[now - span, "-5 min"], [now - span / 2, "-2.5 min"], [now, "now"]]) {
    const label = svg("text", { class: "axis", x: x(t), y: H - 4, "text-anchor": t === now ? "end" : t === now - span ? "start" : "middle" });
    label.textContent = text;
    nodes.push(label);
  }
  const legend = [];
  series.forEach(({ name, s, latest }, i) => {
    const colour = `var(--c${i + 1})`;
    let d = "", area = "", run = [];
    const flush = () => {
      if (run.length > 1) {
        d += "M" + run.map(([a, b]) => `${a.toFixed(1)},${b.toFixed(1)}`).join("L");
        area += `M${run[0][0].toFixed(1)},${y(0)}L` + run.map(([a, b]) => `${a.toFixed(1)},${b.toFixed(1)}`).join("L") + `L${run.at(-1)[0].toFixed(1)},${y(0)}Z`;
      }
      run = [];
    };
    for (const [t, v] of s.points) {
      if (v === null || t < now - span) flush();
      else run.push([x(t), y(v)]);
    }
    flush();
    if (area) nodes.push(svg("path", { class: "area", d: area }, { fill: colour }));
    if (d) nodes.push(svg("path", { class: "line", d }, { stroke: colour }));
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = colour;
    legend.push(el("span", {}, swatch, `${name} `, el("strong", { class: "num", text: rate(latest) })));
  });
  chart.replaceChildren(...nodes);
  $("chart-title").textContent = "Message rate per topic: " + series.map(({ name, latest }) => `${name} ${rate(latest)}`).join(", ");
  $("chart-legend").replaceChildren(...legend);
}

// -- tables --------------------------------------------------------------------------------------

function selectTopic(name) {
  state.selected = name;
  $("tail-topic").value = name;
  startTail(name);
  if (state.stats) render(state.stats);
}

function renderTopics(topics, names) {
  // the table is rebuilt every second: a keyboard user's focus stays on the same topic's button
  const active = document.activeElement;
  const focused = active && active.classList.contains("pick") ? active.textContent : null;
  renderTable(
    $("topics-table"),
    [
      ["Topic", (t) => el("button", { class: "pick", type: "button", "aria-pressed": String(t.topic === state.selected), onclick: () => selectTopic(t.topic), text: t.topic })],
      ["Messages", (t) => count(t.messages), { title: (t) => Number(t.messages).toLocaleString("en-US") }],
      ["Rate", (t) => rate(t.rate)],
      ["Bytes", (t) => bytes(t.bytes)],
      ["Next offset", (t) => count(t.next_offset), { cls: "opt" }],
      ["Duplicates", (t) => warnIf(t.duplicates), { cls: "opt" }],
      ["Rejected", (t) => warnIf(sum(t.rejected), "badnum"), { cls: "opt" }],
      ["Producers", (t) => count(Object.keys(t.producers || {}).length), { cls: "opt" }],
      ["Log", (t) => (t.persistence ? bytes(t.persistence.bytes) : el("span", { class: "badge", text: "memory" })), { cls: "opt" }],
    ],
    names.map((n) => topics[n]),
    "No topics yet.",
    (t) => ({ class: t.topic === state.selected ? "selected" : null }),
  );
  if (focused !== null) [...$("topics-table").querySelectorAll("button.pick")].find((b) => b.textContent === focused)?.focus();
}

function renderProducers(topics, names) {
  const rows = [];
  for (const n of names) for (const [id, p] of Object.entries(topics[n].producers || {})) rows.push({ topic: n, id, ...p });
  $("producers-section").hidden = names.length === 0;
  renderTable(
    $("producers-table"),
    [
      ["Producer", (p) => p.name || (p.topic.endsWith(".dlq") ? "broker (dead letters)" : "id " + p.id.slice(0, 8) + "…"), { cls: "text", title: (p) => "id " + p.id }],
      ["Topic", (p) => p.topic, { cls: "text opt" }],
      ["Messages", (p) => count(p.messages)],
      ["Bytes", (p) => bytes(p.bytes), { cls: "opt" }],
      ["Duplicates", (p) => warnIf(p.duplicates), { cls: "opt" }],
      ["Next seq", (p) => count(p.next_seq), { cls: "opt" }],
      ["Last seen", (p) => ago(p.last_seen), { title: (p) => p.last_seen }],
    ],
    rows,
    "No producer has published yet.",
  );
  const skipped = {};
  for (const n of names) for (const [reason, c] of Object.entries(topics[n].skipped || {})) skipped[reason] = (skipped[reason] || 0) + c;
  const chips = Object.entries(skipped).map(([reason, c]) => el("span", { class: "chip" }, reason.replaceAll("_", " ") + ": ", el("strong", { text: count(c) })));
  $("skipped").replaceChildren(...(chips.length ? [el("span", { class: "muted", text: "Rows skipped by reason:" }), ...chips] : []));
}

function renderWorkers(workers) {
  $("workers-section").hidden = !workers;
  if (!workers) return;
  const rows = Object.entries(workers).map(([index, w]) => ({ index, ...w }));
  renderTable(
    $("workers-table"),
    [
      ["Worker", (w) => w.index, { cls: "text" }],
      ["State", (w) => el("span", { class: "badge " + (w.running ? "ok" : "bad"), text: w.given_up ? "given up" : w.running ? "running" : "stopped" })],
      ["PID", (w) => w.pid ?? "–", { cls: "opt" }],
      ["Sent", (w) => count(w.sent), { cls: "opt" }],
      ["Published", (w) => count(w.published)],
      ["Unacknowledged", (w) => count(w.unacknowledged), { cls: "opt" }],
      ["Restarts", (w) => warnIf(w.restarts)],
      ["Lost", (w) => warnIf(w.lost_by_broker, "badnum"), { title: () => "messages the broker acknowledged and later no longer had" }],
      ["Skipped", (w) => (sum(w.skipped) ? Object.entries(w.skipped).map(([r, c]) => `${r.replaceAll("_", " ")} ${count(c)}`).join(", ") : "0"), { cls: "text opt" }],
    ],
    rows,
    "No workers.",
  );
}

function renderGroups(topics, names) {
  const rows = [];
  for (const n of names) for (const [group, g] of Object.entries(topics[n].groups || {})) rows.push({ topic: n, group, ...g });
  $("groups-section").hidden = names.length === 0;
  renderTable(
    $("groups-table"),
    [
      ["Group", (g) => g.group, { cls: "text" }],
      ["Topic", (g) => g.topic, { cls: "text opt" }],
      ["Consumers", (g) => count(g.consumers), { cls: "opt" }],
      ["Lag", (g) => warnIf(g.lag)],
      ["Pending", (g) => count(g.in_flight), { title: () => "delivered, not yet acknowledged" }],
      ["Committed", (g) => count(g.committed), { cls: "opt" }],
      ["Delivered", (g) => count(g.delivered), { cls: "opt" }],
      ["Redelivered", (g) => warnIf(g.redelivered)],
      ["Dead-lettered", (g) => warnIf(g.dead_lettered, "badnum")],
    ],
    rows,
    "No consumer groups.",
  );
}

function renderSubscribers(topics, names) {
  const rows = [];
  let peers = 0; // a ZeroMQ subscriber's id is its socket identity (bytes): shown as "peer N"
  for (const n of names) for (const [id, s] of Object.entries(topics[n].subscribers || {})) rows.push({ topic: n, id, label: s.kind === "zmq" ? `peer ${++peers}` : id, ...s });
  $("subscribers-section").hidden = names.length === 0;
  renderTable(
    $("subscribers-table"),
    [
      ["Subscriber", (s) => s.label, { cls: "text", title: (s) => s.id }],
      ["Topic", (s) => s.topic, { cls: "text opt" }],
      ["Kind", (s) => (s.kind === "sse" ? "SSE" : s.kind === "zmq" ? "ZeroMQ" : s.kind || "–"), { cls: "text opt" }],
      ["State", (s) => el("span", { class: "badge " + (s.live ? "ok" : ""), text: s.live ? "live" : "replaying" }), { cls: "opt" }],
      ["Credit", (s) => (s.credit === undefined ? "–" : count(s.credit))],
      ["Delivered", (s) => count(s.delivered)],
      ["Dropped", (s) => warnIf(s.dropped, "badnum")],
    ],
    rows,
    "No live subscribers.",
  );
}

function renderOther(stats) {
  const blocks = [];
  if (stats.bad_frames && sum(stats.bad_frames)) blocks.push(["bad_frames", stats.bad_frames]);
  for (const [key, value] of Object.entries(stats)) if (!KNOWN.has(key)) blocks.push([key, value]);
  $("other-section").hidden = blocks.length === 0;
  $("other").replaceChildren(...blocks.flatMap(([key, value]) => [el("h3", { text: key.replaceAll("_", " ") }), el("pre", {}, highlight(JSON.stringify(value, null, 2)))]));
}

// -- the live tail -------------------------------------------------------------------------------

function updateTailTopics(names) {
  const select = $("tail-topic");
  $("tail-section").hidden = names.length === 0;
  const current = [...select.options].map((o) => o.value);
  if (current.join("\n") !== names.join("\n")) {
    select.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
  }
  if (!state.tail.topic && state.selected) startTail(state.selected);
  if (state.tail.topic) select.value = state.tail.topic;
}

function startTail(topic) {
  const tail = state.tail;
  if (tail.topic === topic && tail.controller) return;
  if (tail.controller) tail.controller.abort();
  if (tail.topic !== topic) {
    tail.entries = [];
    tail.lastId = null; // a different topic's offsets: start live
    tail.received = 0;
    tail.pending = 0;
    $("tail").replaceChildren();
  }
  tail.topic = topic;
  const controller = (tail.controller = new AbortController());
  readStream(topic, controller);
}

// Reads the SSE stream with fetch() and reconnects with Last-Event-ID, as EventSource would.
async function readStream(topic, controller) {
  const tail = state.tail;
  while (!controller.signal.aborted) {
    try {
      const headers = { Accept: "text/event-stream" };
      if (tail.lastId !== null) headers["Last-Event-ID"] = tail.lastId;
      const response = await api(`/topics/${encodeURIComponent(topic)}/stream`, { headers, signal: controller.signal });
      if (!response.ok || !response.body) {
        await response.body?.cancel();
        throw new Error(response.status === 404 ? "no such topic (yet)" : "HTTP " + response.status);
      }
      setTailStatus(`connected to ${topic}`);
      await parseEvents(response.body, (event) => onEvent(event), controller.signal);
      if (!controller.signal.aborted) setTailStatus("stream ended · reconnecting");
    } catch (error) {
      if (controller.signal.aborted) return;
      if (error instanceof Unauthorized) {
        await askForToken(false);
        continue;
      }
      setTailStatus(`disconnected (${error.message || "network error"}) · reconnecting`);
    }
    await new Promise((resolve) => setTimeout(resolve, tail.retryMs));
  }
}

// The event-stream format: lines of field: value, an empty line ends an event (WHATWG HTML 9.2.6).
async function parseEvents(body, dispatch, signal) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  signal.addEventListener("abort", () => reader.cancel().catch(() => {}), { once: true });
  let buffer = "", data = [], type = "", id = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let start = 0, end;
    while ((end = buffer.indexOf("\n", start)) >= 0) {
      let line = buffer.slice(start, end);
      start = end + 1;
      if (line.endsWith("\r")) line = line.slice(0, -1);
      if (line === "") {
        if (data.length) dispatch({ type: type || "message", data: data.join("\n"), id });
        data = []; type = "";
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let val = colon < 0 ? "" : line.slice(colon + 1);
      if (val.startsWith(" ")) val = val.slice(1);
      if (field === "data") data.push(val);
      else if (field === "event") type = val;
      else if (field === "id") { id = val; state.tail.lastId = val; }
      else if (field === "retry" && /^\d+$/.test(val)) state.tail.retryMs = Number(val);
    }
    buffer = buffer.slice(start);
  }
}

function onEvent(event) {
  const tail = state.tail;
  if (event.type === "missed") {
    let info = {};
    try { info = JSON.parse(event.data); } catch { /* keep the raw text */ }
    const what = info.missed === null || info.missed === undefined ? "some messages" : `${count(info.missed)} messages`;
    addEntry({ notice: `${what} not shown${info.reason ? " (" + info.reason + ")" : " (this reader fell behind)"}` });
    return;
  }
  if (event.type !== "message") return;
  tail.received++;
  addEntry({ id: event.id, data: event.data, at: new Date() });
}

function addEntry(entry) {
  const tail = state.tail;
  tail.entries.push(entry);
  if (tail.entries.length >= 2 * TAIL_KEEP) tail.entries.splice(0, tail.entries.length - TAIL_KEEP); // trimmed in chunks, not per message
  if (tail.paused) {
    tail.pending++;
    setTailStatus(`paused · ${count(tail.pending)} new`);
    return;
  }
  scheduleTailRender();
}

let tailFrame = 0;
const fresh = [];
function scheduleTailRender() {
  fresh.push(state.tail.entries.at(-1));
  if (fresh.length >= 2 * TAIL_KEEP) fresh.splice(0, fresh.length - TAIL_KEEP);
  if (!tailFrame) tailFrame = requestAnimationFrame(flushTail);
}

function flushTail() {
  tailFrame = 0;
  const list = $("tail");
  const nodes = fresh.splice(0).slice(-TAIL_KEEP).reverse().map(entryNode);
  list.prepend(...nodes);
  while (list.childElementCount > TAIL_KEEP) list.lastElementChild.remove();
  setTailStatus(`${count(state.tail.received)} messages received on ${state.tail.topic}` + (state.tail.lastId !== null ? ` · last offset ${state.tail.lastId}` : ""));
}

function entryNode(entry) {
  if (entry.notice) return el("li", { class: "notice", text: "⚠ " + entry.notice });
  let pretty = entry.data;
  try { pretty = JSON.stringify(JSON.parse(entry.data), null, 2); } catch { /* not JSON: shown as it came */ }
  const li = el(
    "li",
    { "data-text": entry.data.toLowerCase() },
    el("div", { class: "meta" }, el("span", { text: "offset " + (entry.id ?? "–") }), el("time", { datetime: entry.at.toISOString(), text: entry.at.toLocaleTimeString() })),
    el("pre", {}, highlight(pretty)),
  );
  applyFilter(li);
  return li;
}

function applyFilter(li) {
  const f = state.tail.filter;
  li.classList.toggle("hidden", Boolean(f) && !(li.dataset.text || "").includes(f) && !li.classList.contains("notice"));
}

function rerenderTail() {
  fresh.length = 0;
  $("tail").replaceChildren(...state.tail.entries.slice(-TAIL_KEEP).reverse().map(entryNode));
}

// JSON syntax colouring with text nodes only (never innerHTML: messages are untrusted text)
function highlight(text) {
  const out = document.createDocumentFragment();
  const token = /("(?:\\.|[^"\\])*")(\s*:)?|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|\b(true|false|null)\b/g;
  let last = 0, m;
  while ((m = token.exec(text))) {
    if (m.index > last) out.append(text.slice(last, m.index));
    if (m[1] && m[2]) out.append(el("span", { class: "j-key", text: m[1] }), m[2]);
    else if (m[1]) out.append(el("span", { class: "j-str", text: m[1] }));
    else if (m[3]) out.append(el("span", { class: "j-num", text: m[3] }));
    else out.append(el("span", { class: "j-lit", text: m[4] }));
    last = token.lastIndex;
  }
  out.append(text.slice(last));
  return out;
}

function setTailStatus(text) {
  $("tail-status").textContent = text;
}

function togglePause() {
  const tail = state.tail;
  tail.paused = !tail.paused;
  const button = $("tail-pause");
  button.setAttribute("aria-pressed", String(tail.paused));
  button.textContent = tail.paused ? "Resume" : "Pause";
  if (!tail.paused) {
    tail.pending = 0;
    rerenderTail();
    flushTail();
  } else setTailStatus("paused");
}

// -- start ---------------------------------------------------------------------------------------

function init() {
  $("origin").textContent = location.host;
  $("tail-topic").addEventListener("change", (e) => selectTopic(e.target.value));
  $("tail-pause").addEventListener("click", togglePause);
  $("tail-clear").addEventListener("click", () => {
    state.tail.entries = [];
    fresh.length = 0;
    $("tail").replaceChildren();
  });
  $("tail-controls").addEventListener("submit", (e) => e.preventDefault());
  $("tail-filter").addEventListener("input", (e) => {
    state.tail.filter = e.target.value.trim().toLowerCase();
    for (const li of $("tail").children) applyFilter(li);
  });
  $("token-dialog").addEventListener("cancel", (e) => e.preventDefault()); // nothing to show without it
  document.addEventListener("keydown", (e) => {
    if (e.target.closest("input, select, textarea, dialog") || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "/") { e.preventDefault(); $("tail-filter").focus(); }
    else if (e.key === "p") togglePause();
  });
  window.addEventListener("resize", () => state.stats && renderChart());
  poll();
}

document.addEventListener("DOMContentLoaded", init);
