// The Switchyard dashboard. It reads the hub's /v1 API with the admin
// token the operator types in, and keeps itself current from the event
// stream (GET /v1/events): every event makes it read the snapshot again
// (at most every REFRESH_MS), which cannot drift from the hub the way
// patching the page event by event could. EventSource cannot send an
// Authorization header, so the stream is read with fetch() and parsed here.
"use strict";

const TOKEN_KEY = "switchyard.admin-token";
const REFRESH_MS = 300;
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 15000;
const RECENT_DISPATCHES = 20;
const RECENT_FAILURES = 20;

const $ = (id) => document.getElementById(id);

/// One signed-in session of the page: its token, its stream, its timers.
/// Logging out aborts it, so nothing of it outlives the token.
let session = null;

class Unauthorized extends Error {}

class Session {
  constructor(token) {
    this.token = token;
    this.abort = new AbortController();
    this.lastEventId = null;
    this.refreshTimer = null;
    this.refreshing = false;
    this.refreshAgain = false;
    this.lastRefresh = 0;
    this.messageFailures = [];
    this.snapshot = null;
    this.reads = 0;
  }

  get active() {
    return !this.abort.signal.aborted && session === this;
  }

  async get(path) {
    const resp = await fetch(path, {
      headers: { Authorization: "Bearer " + this.token, Accept: "application/json" },
      cache: "no-store",
      signal: this.abort.signal,
    });
    if (resp.status === 401) throw new Unauthorized();
    if (!resp.ok) throw new Error(await describeError(resp));
    return resp.json();
  }

  /// Reads the snapshot again soon: at once if the last read was more
  /// than REFRESH_MS ago, else when it will be; one read at a time.
  scheduleRefresh() {
    if (!this.active || this.refreshTimer !== null) return;
    const wait = Math.max(0, REFRESH_MS - (Date.now() - this.lastRefresh));
    this.refreshTimer = setTimeout(() => this.refresh(), wait);
  }

  async refresh() {
    this.refreshTimer = null;
    if (this.refreshing) {
      this.refreshAgain = true;
      return;
    }
    this.refreshing = true;
    this.lastRefresh = Date.now();
    try {
      const [cluster, brokers, agents, dispatches, failed, queues] = await Promise.all([
        this.get("/v1/cluster"),
        this.get("/v1/brokers"),
        this.get("/v1/agents?include_deleted=true"),
        this.get("/v1/dispatches?limit=" + RECENT_DISPATCHES),
        this.get("/v1/dispatches?state=failed&limit=" + RECENT_FAILURES),
        this.get("/v1/queues"),
      ]);
      if (!this.active) return;
      this.snapshot = { cluster, brokers, agents, dispatches, failed, queues };
      render(this);
      showLoadError(null);
    } catch (err) {
      if (!this.active) return;
      if (err instanceof Unauthorized) {
        logout("The hub no longer accepts this token (401). Sign in again.");
        return;
      }
      showLoadError("Could not read the hub: " + err.message);
    } finally {
      this.refreshing = false;
      if (this.refreshAgain && this.active) {
        this.refreshAgain = false;
        this.scheduleRefresh();
      }
    }
  }

  /// Keeps the event stream open until logout, reconnecting with
  /// exponential backoff and sending the last event id back, so the hub
  /// can replay what was missed (it says whether it could in `resume`).
  async stream() {
    let failures = 0;
    while (this.active) {
      setStreamState(failures === 0 ? "connecting" : "reconnecting", "connecting");
      try {
        const headers = { Authorization: "Bearer " + this.token, Accept: "text/event-stream" };
        const resumed = this.lastEventId !== null;
        if (resumed) headers["Last-Event-ID"] = this.lastEventId;
        const resp = await fetch("/v1/events", {
          headers,
          cache: "no-store",
          signal: this.abort.signal,
        });
        if (resp.status === 401) {
          logout("The hub no longer accepts this token (401). Sign in again.");
          return;
        }
        if (!resp.ok || !resp.body) throw new Error(await describeError(resp));
        failures = 0;
        setStreamState("live", "live");
        // Without an id to resume from, whatever happened while the stream
        // was down is only in the snapshot.
        if (!resumed) this.scheduleRefresh();
        await readEvents(resp.body, (event) => this.onEvent(event));
        throw new Error("the hub closed the stream");
      } catch (err) {
        if (!this.active) return;
        failures += 1;
        const base = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** (failures - 1));
        const delay = Math.round(base * (0.75 + Math.random() * 0.5));
        setStreamState("reconnecting", "reconnecting in " + Math.ceil(delay / 1000) + " s (" + err.message + ")");
        await sleep(delay, this.abort.signal);
      }
    }
  }

  onEvent(event) {
    if (event.id !== null) this.lastEventId = event.id;
    let data = null;
    try {
      data = JSON.parse(event.data);
    } catch (_) {
      data = null;
    }
    switch (event.type) {
      case "resume":
        // Replayed events follow and each reads the snapshot again; when
        // the hub could not replay, read everything now.
        if (!data || data.recovered !== true) this.scheduleRefresh();
        return;
      case "message_failed":
      case "message_expired":
        // The event names the message; its row says when and why.
        if (data && data.message) this.noteMessageFailure(data.message);
        return;
      default:
        // agent_status, dispatch_finished, broker_online, broker_offline,
        // message_delivered, and kinds this page does not know.
        break;
    }
    this.scheduleRefresh();
  }

  async noteMessageFailure(message) {
    let row = { ...message, updated_at: new Date().toISOString() };
    try {
      row = await this.get("/v1/messages/" + encodeURIComponent(message.id));
    } catch (_) {
      // Pruned or unreachable: what the event said is still worth showing.
    }
    if (!this.active) return;
    this.messageFailures = [row, ...this.messageFailures.filter((m) => m.id !== row.id)]
      .slice(0, RECENT_FAILURES);
    this.scheduleRefresh();
  }
}

/// Reads a text/event-stream body, calling `onEvent({type, data, id})` for
/// each event (the Server-Sent Events rules: `field: value` lines, a blank
/// line ends an event, `:` starts a comment, default type `message`).
async function readEvents(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let type = "";
  let data = [];
  let id = null;
  const line = (text) => {
    if (text === "") {
      if (data.length > 0) onEvent({ type: type || "message", data: data.join("\n"), id });
      type = "";
      data = [];
      id = null;
      return;
    }
    if (text.startsWith(":")) return;
    const colon = text.indexOf(":");
    const field = colon === -1 ? text : text.slice(0, colon);
    let value = colon === -1 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
    else if (field === "id" && !value.includes("\0")) id = value;
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    for (;;) {
      const end = buffer.search(/\r\n|\r|\n/);
      // A lone CR at the end may be the first half of a CRLF.
      if (end === -1 || (end === buffer.length - 1 && buffer[end] === "\r")) break;
      const width = buffer.startsWith("\r\n", end) ? 2 : 1;
      line(buffer.slice(0, end));
      buffer = buffer.slice(end + width);
    }
  }
}

async function describeError(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return resp.status + " " + body.error.code + ": " + body.error.message;
  } catch (_) {
    // Not the hub's JSON error: the status says enough.
  }
  return "HTTP " + resp.status;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
  });
}

// --- signing in and out ------------------------------------------------

async function login(token) {
  const candidate = new Session(token);
  try {
    await candidate.get("/v1/cluster");
  } catch (err) {
    if (err instanceof Unauthorized) {
      throw new Error("The hub refused this token (401 unauthorized). Check it and try again.");
    }
    throw new Error("Could not reach the hub: " + err.message);
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  start(candidate);
}

function start(next) {
  if (session) session.abort.abort();
  session = next;
  $("login").hidden = true;
  $("dashboard").hidden = false;
  $("session").hidden = false;
  showLoginError(null);
  next.scheduleRefresh();
  next.stream();
}

function logout(reason) {
  if (session) session.abort.abort();
  session = null;
  sessionStorage.removeItem(TOKEN_KEY);
  setStreamState("stopped", "stream stopped");
  $("dashboard").hidden = true;
  $("session").hidden = true;
  $("login").hidden = false;
  $("token").value = "";
  showLoginError(reason || null);
  $("token").focus();
}

function showLoginError(text) {
  $("login-error").textContent = text || "";
  $("login-error").hidden = !text;
}

function showLoadError(text) {
  $("load-error").textContent = text || "";
  $("load-error").hidden = !text;
}

function setStreamState(state, text) {
  const el = $("stream-state");
  el.dataset.state = state;
  el.textContent = state === "live" ? "live" : "stream " + text;
  el.title = "event stream: " + text;
}

// --- rendering -----------------------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else if (key === "title") node.title = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function badge(word, cls) {
  return el("span", { class: "badge " + word + (cls ? " " + cls : "") }, word);
}

function short(id) {
  return id ? String(id).slice(0, 8) : "";
}

function age(since) {
  if (!since) return "";
  const secs = Math.max(0, Math.floor((Date.now() - Date.parse(since)) / 1000));
  if (secs < 60) return secs + "s";
  if (secs < 3600) return Math.floor(secs / 60) + "m " + (secs % 60) + "s";
  if (secs < 86400) return Math.floor(secs / 3600) + "h " + Math.floor((secs % 3600) / 60) + "m";
  return Math.floor(secs / 86400) + "d " + Math.floor((secs % 86400) / 3600) + "h";
}

/// A cell showing how long ago `since` was, kept current by the ticker.
function ageCell(since, suffix) {
  return el("td", { class: "age", "data-since": since, "data-suffix": suffix || "", title: since || "" },
    since ? age(since) + (suffix || "") : "");
}

function time(at) {
  if (!at) return "";
  const d = new Date(at);
  return d.toLocaleTimeString([], { hour12: false });
}

function fill(tableId, rows, columns) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren(...(rows.length > 0 ? rows : [
    el("tr", {}, el("td", { class: "empty", "data-colspan": columns }, "none")),
  ]));
  for (const cell of body.querySelectorAll("td[data-colspan]")) cell.colSpan = columns;
}

function render(s) {
  const { cluster, brokers, agents, dispatches, failed, queues } = s.snapshot;
  const replicaById = new Map(cluster.replicas.map((r) => [r.instance_id, r]));
  const brokerById = new Map(brokers.map((b) => [b.id, b]));
  const agentById = new Map(agents.map((a) => [a.id, a]));
  const brokerDepth = new Map(queues.brokers.map((q) => [q.broker_id, q.depth]));
  const agentDepth = new Map(queues.agents.map((q) => [q.agent_id, q.depth]));
  const brokerName = (id) => (brokerById.get(id) || { name: short(id) }).name;
  const agentName = (id) => (id ? (agentById.get(id) || { name: short(id) }).name : "(broker)");

  $("replicas-count").textContent = "(" + cluster.replicas.length + ")";
  fill("replicas", cluster.replicas.map((r) => el("tr", { "data-replica": r.instance_id },
    el("td", { class: "mono", title: r.instance_id }, short(r.instance_id)),
    el("td", { class: "mono" }, r.address),
    ageCell(r.started_at, " ago"),
    ageCell(r.last_seen, " ago"),
    el("td", {}, r.brokers.length === 0 ? "none" : r.brokers.map(brokerName).join(", ")),
  )), 5);

  const online = brokers.filter((b) => b.status === "online").length;
  $("brokers-count").textContent = "(" + online + " of " + brokers.length + " online)";
  fill("brokers", brokers.map((b) => {
    const replica = b.connected_replica ? replicaById.get(b.connected_replica) : null;
    const up = b.status === "online";
    return el("tr", { "data-broker": b.name, "data-broker-id": b.id },
      el("td", { title: b.id }, b.name),
      el("td", { class: "status" }, badge(b.status)),
      el("td", { class: "mono replica", title: b.connected_replica || "" },
        up ? (replica ? replica.address : short(b.connected_replica)) : ""),
      el("td", { class: "transport" }, b.transport),
      up ? ageCell(b.connected_at, "") : el("td", {}, ""),
      up ? ageCell(b.last_heartbeat, " ago") : el("td", {}, ""),
      el("td", { class: "num queue" }, brokerDepth.get(b.id) || 0),
    );
  }), 7);

  const live = agents.filter((a) => a.phase !== "deleted");
  $("agents-count").textContent = "(" + live.length + ")";
  fill("agents", live.map((a) => el("tr", { "data-agent": a.name, "data-agent-id": a.id },
    el("td", { title: a.id }, a.name),
    el("td", {}, brokerName(a.broker_id)),
    el("td", { class: "phase" }, badge(a.phase)),
    el("td", { class: "exit", title: a.detail || "" },
      a.exit_code === null || a.exit_code === undefined ? "" : "exit " + a.exit_code,
      a.detail ? (a.exit_code === null || a.exit_code === undefined ? "" : ": ") + a.detail : null),
    el("td", { class: "labels" }, ...Object.entries(a.labels || {}).map(([k, v]) => el("span", { class: "label" }, k + "=" + v))),
    el("td", { class: "num queue" }, agentDepth.get(a.id) || 0),
    ageCell(a.updated_at, " ago"),
  )), 7);

  const opName = (d) => (d.op === "call" && d.name ? d.name : d.op);
  fill("dispatches", dispatches.map((d) => el("tr", { "data-dispatch": d.id },
    el("td", { title: d.created_at }, time(d.created_at)),
    el("td", { class: "mono" }, opName(d)),
    el("td", {}, agentName(d.agent_id)),
    el("td", {}, brokerName(d.broker_id)),
    el("td", { class: "state" }, badge(d.state)),
    el("td", { class: "num" }, d.attempts),
    el("td", { class: "error-text" }, d.error || ""),
  )), 7);

  const failures = [
    ...failed.map((d) => ({
      at: d.updated_at, what: "dispatch " + opName(d), agent: d.agent_id, broker: d.broker_id,
      state: d.state, reason: d.error_code ? d.error_code + ": " + (d.error || "") : d.error || "", id: d.id,
    })),
    ...s.messageFailures.map((m) => ({
      at: m.updated_at, what: m.seq === undefined ? "message" : "message #" + m.seq, agent: m.agent_id, broker: m.broker_id,
      state: m.state, reason: m.error || (m.state === "expired" ? "not delivered before it expired" : ""), id: m.id,
    })),
  ].sort((x, y) => Date.parse(y.at) - Date.parse(x.at)).slice(0, RECENT_FAILURES);
  fill("failures", failures.map((f) => el("tr", { "data-failure": f.id },
    el("td", { title: f.at }, time(f.at)),
    el("td", { class: "mono" }, f.what),
    el("td", {}, agentName(f.agent)),
    el("td", {}, brokerName(f.broker)),
    el("td", {}, badge(f.state)),
    el("td", { class: "error-text" }, f.reason),
  )), 6);

  $("updated").textContent = "updated " + time(new Date().toISOString());
  // How many snapshots this page has shown: lets a test tell a quiet page.
  s.reads += 1;
  $("updated").dataset.reads = String(s.reads);
}

/// Ages ("session age", "last seen") move on between snapshots; this only
/// re-labels cells already on the page and reads nothing from the hub.
function tick() {
  for (const cell of document.querySelectorAll("td.age[data-since]")) {
    const since = cell.getAttribute("data-since");
    if (since) cell.textContent = age(since) + (cell.getAttribute("data-suffix") || "");
  }
}

// --- wiring --------------------------------------------------------------

function init() {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    $("login-button").disabled = true;
    showLoginError(null);
    try {
      await login(token);
    } catch (err) {
      showLoginError(err.message);
    } finally {
      $("login-button").disabled = false;
    }
  });
  $("logout").addEventListener("click", () => logout(null));
  setInterval(tick, 1000);
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) start(new Session(saved));
  else $("token").focus();
}

init();
