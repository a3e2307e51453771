// Hangar dashboard: polls ctrl/dashboard/state every 2 s and renders it. Every value from the
// controller reaches the page through textContent or an attribute, never as markup.
"use strict";

const REFRESH_MS = 2000;
const TOKEN_KEY = "hangar.dashboard.token";
const LIVE = new Set(["scheduled", "loading", "starting", "waiting", "ready"]);

let timer = null;
let waitingForToken = false;

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
    const tr = row([
      el("td", "id", b.id),
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

async function refresh() {
  clearTimeout(timer);
  if (waitingForToken) return;
  try {
    const response = await fetch(stateUrl(), { headers: authHeaders(), cache: "no-store" });
    if (response.status === 401) {
      askForToken(token() ? "The token was refused; enter another." : "This controller requires a bearer token.");
      return;
    }
    if (!response.ok) {
      let message = "HTTP " + response.status;
      try {
        message += ": " + (await response.json()).message;
      } catch (_) {
        // Not Hangar's error body: the status alone says enough.
      }
      throw new Error(message);
    }
    const state = await response.json();
    renderClusters(state.clusters);
    renderBackends(state.backends, state.time);
    renderWarmPools(state.warm_pools || []);
    showError("");
    document.getElementById("updated").textContent = "Updated " + new Date().toLocaleTimeString();
  } catch (e) {
    showError("Cannot load the state: " + e.message);
  }
  timer = setTimeout(refresh, REFRESH_MS);
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
    document.getElementById("main").hidden = false;
    refresh();
  });
  document.getElementById("status-filter").addEventListener("change", refresh);
  refresh();
});
