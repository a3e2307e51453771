// Hangar dashboard: polls ctrl/dashboard/state every 2 s and renders it; `#b/<backend id>` shows one
// backend instead: its event timeline (ctrl/b/<id>/events, polled) and its live log tail
// (ctrl/b/<id>/logs?follow=true, read as a stream of JSON lines). Every value from the controller
// reaches the page through textContent or an attribute, never as markup.
"use strict";

const REFRESH_MS = 2000;
const TOKEN_KEY = "hangar.dashboard.token";
const LIVE = new Set(["scheduled", "loading", "starting", "waiting", "ready"]);
// Lines asked for when a backend's page opens, and most lines kept on the page.
const TAIL_LINES = 200;
const MAX_LOG_LINES = 2000;

let timer = null;
let waitingForToken = false;
// The backend shown (from the location's hash), and the AbortController of its log follow.
let backendId = null;
let follow = null;

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function authHeaders() {
  const t = token();
  return t ? { Authorization: "Bearer " + t } : {};
}

// Creates an element with optional class and text.
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function row(cells) {
  const tr = el("tr");
  for (const cell of cells) tr.appendChild(cell);
  return tr;
}

function table(headings, rows) {
  const t = el("table");
  const head = el("thead");
  head.appendChild(row(headings.map((h) => el("th", null, h))));
  const body = el("tbody");
  for (const r of rows) body.appendChild(r);
  t.append(head, body);
  return t;
}

function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 120) return s + " s";
  if (s < 7200) return Math.floor(s / 60) + " min";
  return Math.floor(s / 3600) + " h";
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

// A node name as serialized by the controller: `{"Drone": "dr-…"}` or `{"Proxy": "px-…"}`.
function nodeName(name) {
  if (typeof name === "string") return name;
  return name ? String(Object.values(name)[0]) : "";
}

function showError(message) {
  document.getElementById("error").textContent = message || "";
}

function askForToken(message) {
  waitingForToken = true;
  document.getElementById("auth-message").textContent = message;
  document.getElementById("auth").hidden = false;
  document.getElementById("main").hidden = true;
  document.getElementById("backend-view").hidden = true;
  document.getElementById("updated").textContent = "";
  document.getElementById("auth-token").focus();
}

function renderClusters(clusters) {
  const box = document.getElementById("clusters");
  if (clusters.length === 0) {
    box.replaceChildren(el("p", "empty", "No cluster has a connected drone or proxy."));
    return;
  }
  const parts = [];
  for (const c of clusters) {
    const section = el("div", "cluster");
    section.dataset.cluster = c.name;
    section.appendChild(el("h3", null, c.name));
    const drones = c.drones.map((d) => {
      const tr = row([
        el("td", "mono", nodeName(d.node.name)),
        el("td", null, d.pool || "(default)"),
        el("td", null, d.ready ? "yes" : "no"),
        el("td", null, d.draining ? "yes" : "no"),
        el("td", "num", seconds(d.last_heartbeat_age)),
        el("td", "num", d.backend_count),
        el("td", null, (d.executors || []).join(", ")),
        el("td", "mono", d.node.controller || "–"),
      ]);
      tr.dataset.drone = nodeName(d.node.name);
      return tr;
    });
    section.appendChild(
      drones.length
        ? table(
            ["Drone", "Pool", "Ready", "Draining", "Last heartbeat", "Backends", "Executors", "Controller"],
            drones,
          )
        : el("p", "empty", "No drones."),
    );
    const proxies = c.proxies.map((p) =>
      row([el("td", "mono", nodeName(p.name)), el("td", null, p.plane_version), el("td", "mono", p.controller || "–")]),
    );
    section.appendChild(
      proxies.length ? table(["Proxy", "Version", "Controller"], proxies) : el("p", "empty", "No proxies."),
    );
    parts.push(section);
  }
  box.replaceChildren(...parts);
}

function cpuCell(m) {
  if (!m || !m.sys_cpu_ns) return el("td", "num", "–");
  return el("td", "num", ((100 * m.cpu_used_ns) / m.sys_cpu_ns).toFixed(1) + "% host");
}

function memoryCell(m) {
  if (!m) return el("td", "num", "–");
  const text = bytes(m.mem_used) + (m.mem_limit ? " / " + bytes(m.mem_limit) : "");
  return el("td", "num", text);
}

function terminateCell(b) {
  const td = el("td");
  if (!LIVE.has(b.status)) return td;
  const button = el("button", "terminate", "Terminate");
  button.type = "button";
  button.dataset.backendId = b.id;
  button.addEventListener("click", () => terminate(b.id, button));
  td.appendChild(button);
  return td;
}

function renderBackends(backends, now) {
  const rows = backends.map((b) => {
    const status = el("td", "status status-" + b.status, b.status);
    const idCell = el("td", "id");
    const link = el("a", null, b.id);
    link.href = "#b/" + encodeURIComponent(b.id);
    idCell.appendChild(link);
    const tr = row([
      idCell,
      el("td", "mono", b.cluster),
      el("td", "mono", b.drone),
      el("td", null, b.namespace),
      el("td", "mono", b.key),
      status,
      el("td", "num", seconds(Math.max(0, Math.round((now - b.status_time) / 1000)))),
      el("td", null, b.termination_reason || ""),
      cpuCell(b.metrics),
      memoryCell(b.metrics),
      terminateCell(b),
    ]);
    tr.dataset.backendId = b.id;
    tr.dataset.status = b.status;
    return tr;
  });
  document.querySelector("#backends tbody").replaceChildren(...rows);
  document.getElementById("backend-count").textContent =
    backends.length + (backends.length === 1 ? " backend" : " backends") + ", newest first";
}

function renderWarmPools(pools) {
  const box = document.getElementById("warm-pools");
  if (pools.length === 0) {
    box.replaceChildren(el("p", "empty", "No warm pool."));
    return;
  }
  const rows = pools.map((p) => {
    const tr = row([
      el("td", "mono", p.name),
      el("td", "mono", p.cluster),
      el("td", null, p.pool),
      el("td", "num", p.size),
      el("td", "num", p.ready),
      el("td", "num", p.starting),
      el("td", "num", p.claimed),
    ]);
    tr.dataset.warmPool = p.name;
    return tr;
  });
  box.replaceChildren(table(["Warm pool", "Cluster", "Pool", "Size", "Ready", "Starting", "Claimed"], rows));
}

function stateUrl() {
  const params = new URLSearchParams();
  const status = document.getElementById("status-filter").value;
  if (status) params.set("status", status);
  const limit = new URLSearchParams(window.location.search).get("limit");
  if (limit) params.set("limit", limit);
  const query = params.toString();
  return "ctrl/dashboard/state" + (query ? "?" + query : "");
}

// GETs `url` as JSON; `null` after asking for a token (401).
async function getJson(url) {
  const response = await fetch(url, { headers: authHeaders(), cache: "no-store" });
  if (response.status === 401) {
    askForToken(token() ? "The token was refused; enter another." : "This controller requires a bearer token.");
    return null;
  }
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

async function errorMessage(response) {
  let message = "HTTP " + response.status;
  try {
    message += ": " + (await response.json()).message;
  } catch (_) {
    // Not Hangar's error body: the status alone says enough.
  }
  return message;
}

async function refreshOverview() {
  const state = await getJson(stateUrl());
  if (!state) return false;
  renderClusters(state.clusters);
  renderBackends(state.backends, state.time);
  renderWarmPools(state.warm_pools || []);
  return true;
}

async function refresh() {
  clearTimeout(timer);
  if (waitingForToken) return;
  try {
    const loaded = backendId ? await refreshBackend(backendId) : await refreshOverview();
    if (!loaded) return;
    showError("");
    document.getElementById("updated").textContent = "Updated " + new Date().toLocaleTimeString();
  } catch (e) {
    showError("Cannot load the state: " + e.message);
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

function backendUrl(id, what) {
  return "ctrl/b/" + encodeURIComponent(id) + "/" + what;
}

function time(ms) {
  return new Date(ms).toLocaleString();
}

// The event timeline of the backend shown.
async function refreshBackend(id) {
  const events = await getJson(backendUrl(id, "events"));
  if (!events || id !== backendId) return false;
  const last = events.events[events.events.length - 1];
  document.getElementById("backend-summary").textContent =
    "Cluster " + events.cluster + ", drone " + events.drone + (last ? ", " + last.status : "");
  const rows = events.events.map((e) => {
    const tr = row([
      el("td", "num", time(e.time)),
      el("td", "status status-" + e.status, e.status),
      el("td", null, e.termination_reason || ""),
      el("td", null, e.termination_kind || ""),
      el("td", "num", e.exit_code === undefined ? "" : e.exit_code),
      el("td", null, e.message || ""),
    ]);
    tr.dataset.status = e.status;
    return tr;
  });
  document.querySelector("#backend-events tbody").replaceChildren(...rows);
  const errors = document.getElementById("backend-error-lines");
  const lines = events.error_lines || [];
  errors.hidden = lines.length === 0;
  errors.querySelector("pre").replaceChildren(...lines.map(logLine));
  return true;
}

function logLine(item) {
  const line = el("div", "line " + item.stream);
  line.append(el("span", "time", new Date(item.time).toISOString().slice(11, 23) + " "), item.line);
  return line;
}

// Follows the log of `id` into the page until the read ends, says why it ended.
async function startFollow(id) {
  const controller = new AbortController();
  follow = controller;
  const log = document.getElementById("backend-log");
  const state = document.getElementById("log-state");
  const show = (text, end) => {
    if (follow !== controller) return;
    state.textContent = text;
    state.dataset.end = end || "";
  };
  show("(connecting…)");
  try {
    const url = backendUrl(id, "logs") + "?follow=true&tail=" + TAIL_LINES;
    const response = await fetch(url, { headers: authHeaders(), signal: controller.signal, cache: "no-store" });
    if (response.status === 401) {
      follow = null;
      askForToken("This controller requires a bearer token.");
      return;
    }
    if (!response.ok) throw new Error(await errorMessage(response));
    show("(following)");
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let pending = "";
    let end = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += decoder.decode(value, { stream: true });
      const texts = pending.split("\n");
      pending = texts.pop();
      for (const text of texts) {
        if (!text) continue;
        const item = JSON.parse(text);
        if (item.end) {
          end = item;
          continue;
        }
        const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
        log.appendChild(logLine(item));
        while (log.childElementCount > MAX_LOG_LINES) log.firstElementChild.remove();
        if (atBottom) log.scrollTop = log.scrollHeight;
      }
    }
    if (!end) show("(the connection was cut)", "cut");
    else if (end.end === "backend_ended") show("(the backend ended)", end.end);
    else show("(ended: " + (end.message || end.end) + ")", end.end);
  } catch (e) {
    if (!controller.signal.aborted) show("(" + e.message + ")", "error");
  }
}

// Shows the view the location's hash names: `#b/<id>` a backend, anything else the overview.
function route() {
  const match = /^#b\/(.+)$/.exec(window.location.hash);
  const id = match ? decodeURIComponent(match[1]) : null;
  if (id !== backendId) {
    if (follow) follow.abort();
    follow = null;
    backendId = id;
    if (id) {
      document.getElementById("backend-id").textContent = id;
      document.getElementById("backend-summary").textContent = "";
      document.querySelector("#backend-events tbody").replaceChildren();
      document.getElementById("backend-log").replaceChildren();
    }
  }
  if (waitingForToken) return;
  document.getElementById("main").hidden = id !== null;
  document.getElementById("backend-view").hidden = id === null;
  if (id && !follow) startFollow(id);
  refresh();
}

async function terminate(id, button) {
  button.disabled = true;
  button.textContent = "Terminating…";
  try {
    const response = await fetch("ctrl/b/" + encodeURIComponent(id) + "/soft-terminate", {
      method: "POST",
      headers: authHeaders(),
    });
    if (response.status === 401) {
      askForToken("The token was refused; enter another.");
      return;
    }
    if (!response.ok) throw new Error("HTTP " + response.status);
  } catch (e) {
    showError("Cannot terminate " + id + ": " + e.message);
    button.disabled = false;
    button.textContent = "Terminate";
    return;
  }
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("auth").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("auth-token");
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    waitingForToken = false;
    document.getElementById("auth").hidden = true;
    route();
  });
  document.getElementById("status-filter").addEventListener("change", refresh);
  window.addEventListener("hashchange", route);
  route();
});
