// hyperlex's page: every piece of data comes from the JSON API under /api (docs/ui.md).
// Cytoscape.js draws the scene, Chart.js the routing scores and the field; nothing else.
"use strict";

const $ = (id) => document.getElementById(id);
const KIND_SHAPE = {entity: "ellipse", concept: "round-rectangle", action: "diamond", quality: "triangle"};
const KIND_COLOR = {entity: "#2b5fd9", concept: "#1b8a5a", action: "#9c3fb8", quality: "#c26a00"};
const SALIENCE_SHOWN = 2.5;  // salience at and above this gets the largest node

const state = {
  key: sessionStorage.getItem("hyperlex-key") || "",
  session: null,       // the open session's name
  versions: [],        // its scene versions, oldest first: {version, turn, scene}
  running: null,       // the AbortController of the turn being streamed
  cy: null, scoresChart: null, fieldChart: null,
};
window.hyperlex = state;  // for people (and tests) poking at the page from the console

// -- the API --------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.param = error.param || null;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(options.json);
  }
  const response = await fetch(path, Object.assign({}, options, {headers}));
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    if (response.status === 401) askForKey();
    throw new ApiError(response.status, body);
  }
  return response;
}

const getJson = async (path) => (await api(path)).json();

function status(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
  el.setAttribute("role", isError ? "alert" : "status");
}

function askForKey() {
  $("key-form").hidden = false;
  $("api-key").focus();
  status("This server needs an API key.", true);
}

// -- sessions -------------------------------------------------------------------------------

function newSessionName() {
  const now = new Date();
  const pad = (n) => String(n).padStart(2, "0");
  const stamp = `${now.getFullYear()}-${pad(now.getMonth() + 1)}-${pad(now.getDate())}-` +
    `${pad(now.getHours())}${pad(now.getMinutes())}`;
  const hex = Array.from(crypto.getRandomValues(new Uint8Array(2)),
    (b) => b.toString(16).padStart(2, "0")).join("");
  return `${stamp}-${hex}`;
}

async function loadSessions() {
  const list = $("session-list");
  const {data} = await getJson("/api/sessions");
  list.replaceChildren();
  for (const info of data) {
    const li = document.createElement("li");
    li.dataset.session = info.name;
    li.classList.toggle("current", info.name === state.session);
    const open = button(info.name, `Open session ${info.name}`, () => openSession(info.name));
    open.className = "open";
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = `${info.turns} turn${info.turns === 1 ? "" : "s"}` +
      (info.last_persona ? ` · ${info.last_persona}` : "");
    const actions = document.createElement("div");
    actions.className = "actions";
    actions.append(
      button("Markdown", `Export session ${info.name} as Markdown`, () => exportSession(info.name, "markdown")),
      button("JSON", `Export session ${info.name} as JSON`, () => exportSession(info.name, "json")),
      button("Delete", `Delete session ${info.name}`, () => deleteSession(info.name)));
    li.append(open, meta, actions);
    list.append(li);
  }
}

function button(text, label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

async function openSession(name) {
  if (state.running) state.running.abort();
  state.session = name;
  history.replaceState(null, "", `#session=${encodeURIComponent(name)}`);
  $("session-name").textContent = `session ${name}`;
  $("messages").replaceChildren();
  state.versions = [];
  let turns = [];
  try {
    turns = (await getJson(`/api/sessions/${encodeURIComponent(name)}`)).turns;
    state.versions = (await getJson(`/api/sessions/${encodeURIComponent(name)}/scenes`)).data;
  } catch (error) {
    if (error.status !== 404) throw error;  // a new session: saved with its first turn
  }
  for (const turn of turns) {
    addMessage("user", turn.user);
    const reply = addReply(turn.persona, turn.route);
    reply.querySelector(".text").textContent = turn.reply;
  }
  $("messages").scrollTop = $("messages").scrollHeight;
  const last = turns[turns.length - 1];
  showRoute(last ? last.persona : null, last ? last.route : null);
  showVersions(null);
  for (const li of $("session-list").children) li.classList.toggle("current", li.dataset.session === name);
  status(turns.length ? `Resumed ${name}: ${turns.length} turns.` : `New session ${name}.`);
}

async function exportSession(name, format) {
  const response = await api(`/api/sessions/${encodeURIComponent(name)}/export?format=${format}`);
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = `${name}.${format === "markdown" ? "md" : "json"}`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function deleteSession(name) {
  if (!confirm(`Delete session ${name} with its turns and scenes?`)) return;
  await api(`/api/sessions/${encodeURIComponent(name)}`, {method: "DELETE"});
  if (name === state.session) await openSession(newSessionName());
  await loadSessions();
  status(`Deleted ${name}.`);
}

// -- the chat -------------------------------------------------------------------------------

function addMessage(kind, text) {
  const li = document.createElement("li");
  li.className = `msg ${kind}`;
  li.textContent = text;
  $("messages").append(li);
  li.scrollIntoView({block: "nearest"});
  return li;
}

function addReply(persona, route) {
  const li = document.createElement("li");
  li.className = "msg reply";
  li.dataset.persona = persona;
  const label = document.createElement("span");
  label.className = "persona-label";
  label.textContent = persona;
  const text = document.createElement("span");
  text.className = "text";
  li.append(label, text);
  if (route) {
    const why = document.createElement("span");
    why.className = "why";
    why.textContent = route.reason;  // it names the source: "pinned to poet", "router: ..."
    li.append(why);
  }
  $("messages").append(li);
  return li;
}

async function send(event) {
  event.preventDefault();
  const message = $("message").value.trim();
  if (!message || state.running) return;
  if (!state.session) await openSession(newSessionName());
  const body = {message, persona: $("persona").value};
  if ($("mood").value) {
    body.mood = $("mood").value;
    body.mood_weight = Number($("mood-weight").value);
  }
  $("message").value = "";
  addMessage("user", message);
  const controller = new AbortController();
  setRunning(controller);
  let reply = null;
  try {
    const response = await api(`/api/sessions/${encodeURIComponent(state.session)}/turns`,
      {method: "POST", json: body, signal: controller.signal});
    for await (const data of events(response)) {
      if (data.error) throw new ApiError(500, data);
      if (data.type === "route") {
        reply = addReply(data.persona, data.route);
        showRoute(data.persona, data.route);
      } else if (data.type === "delta") {
        reply.querySelector(".text").textContent += data.content;
        reply.scrollIntoView({block: "nearest"});
      } else if (data.type === "done") {
        reply.classList.add("done");
        reply.querySelector(".text").textContent = data.turn.reply;
        state.versions.push({version: data.scene.version, turn: data.turn.index, scene: data.scene});
        showVersions(data.diff);
      }
    }
    status(`${reply ? reply.dataset.persona : "?"} answered.`);
    loadSessions().catch(() => {});
  } catch (error) {
    if (error.name === "AbortError") {
      if (reply) reply.classList.add("stopped");
      status("Stopped: the turn was cancelled and not saved.");
    } else {
      addMessage("error", error.message).dataset.param = error.param || "";
      status(error.message, true);
    }
  } finally {
    setRunning(null);
  }
}

// Server-Sent Events from a fetch body: one JSON object per "data:" line, until [DONE].
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function setRunning(controller) {
  state.running = controller;
  $("stop").disabled = !controller;
  $("send").disabled = !!controller;
  document.body.classList.toggle("running", !!controller);
  if (!controller) $("message").focus();
}

// -- routing --------------------------------------------------------------------------------

function showRoute(persona, route) {
  $("route-persona").textContent = persona || "–";
  $("route-source").textContent = route ? route.source : "–";
  $("route-reason").textContent = route ? route.reason : "–";
  const scores = (route && route.scores) || {};
  const names = Object.keys(scores);
  $("scores-list").replaceChildren(...names.map((name) => {
    const li = document.createElement("li");
    li.textContent = `${name}: ${scores[name].toFixed(3)}`;
    return li;
  }));
  $("scores-note").hidden = names.length > 0;
  $("scores-chart").parentElement.hidden = names.length === 0;
  const chart = state.scoresChart;
  chart.data.labels = names;
  chart.data.datasets[0].data = names.map((n) => scores[n]);
  chart.data.datasets[0].backgroundColor = names.map((n) => (n === persona ? "#2b5fd9" : "#b8c4e0"));
  chart.update();
}

// -- the scene ------------------------------------------------------------------------------

function elements(scene) {
  const focus = new Set(scene.focus || []);
  const nodes = scene.hyperlexemes.map((hx) => ({
    group: "nodes",
    data: {id: hx.id, label: hx.label, kind: hx.kind, salience: hx.salience, hx},
    classes: [hx.kind, focus.has(hx.id) ? "focus" : ""].join(" "),
  }));
  const edges = scene.links.map((link) => ({
    group: "edges",
    data: {
      id: `${link.src}|${link.rel}|${link.dst}|${link.polarity}`, source: link.src, target: link.dst,
      label: link.polarity < 0 ? `not ${link.rel}` : link.rel, polarity: link.polarity, link,
    },
    classes: link.polarity < 0 ? "negated" : "",
  }));
  return [...nodes, ...edges];
}

function makeGraph() {
  const cy = cytoscape({
    container: $("graph"),
    wheelSensitivity: 0.3,
    style: [
      {selector: "node", style: {
        label: "data(label)", "font-size": 13, "text-valign": "bottom", "text-margin-y": 3,
        width: `mapData(salience, 0, ${SALIENCE_SHOWN}, 12, 48)`,
        height: `mapData(salience, 0, ${SALIENCE_SHOWN}, 12, 48)`,
        "background-color": "#888", "border-width": 1, "border-color": "#fff",
        "text-background-color": "#fff", "text-background-opacity": 0.7, "text-background-padding": 1,
      }},
      ...Object.keys(KIND_SHAPE).map((kind) => ({selector: `node.${kind}`, style: {
        shape: KIND_SHAPE[kind], "background-color": KIND_COLOR[kind]}})),
      {selector: "node.focus", style: {"border-width": 4, "border-color": "#e0a100"}},
      {selector: "node.new", style: {"overlay-color": "#e0a100", "overlay-opacity": 0.35, "overlay-padding": 6}},
      {selector: "edge", style: {
        label: "data(label)", "font-size": 12, "curve-style": "bezier", "target-arrow-shape": "triangle",
        width: 2, "line-color": "#7a7f8c", "target-arrow-color": "#7a7f8c", color: "#333",
        "text-rotation": "autorotate", "text-background-color": "#fff", "text-background-opacity": 0.8,
      }},
      {selector: "edge.negated", style: {
        "line-style": "dashed", "line-color": "#c62828", "target-arrow-color": "#c62828",
        "target-arrow-shape": "tee", color: "#c62828",
      }},
      {selector: "edge.new", style: {width: 4}},
    ],
  });
  const info = $("node-info");
  const show = (event) => {
    const target = event.target;
    const pos = event.renderedPosition || target.renderedPosition();
    info.textContent = describe(target);
    info.style.left = `${pos.x + 12}px`;
    info.style.top = `${pos.y + $("graph").offsetTop + 12}px`;
    info.hidden = false;
  };
  cy.on("mouseover tap", "node, edge", show);
  cy.on("mouseout", "node, edge", () => { info.hidden = true; });
  new ResizeObserver(() => { cy.resize(); cy.fit(undefined, 24); }).observe($("graph"));
  return cy;
}

function describe(target) {
  if (target.isNode()) {
    const hx = target.data("hx");
    const attrs = Object.entries(hx.attrs || {}).map(([k, v]) => `${k}=${v}`).join(", ");
    return `${hx.label} (${hx.kind})\nsalience ${hx.salience.toFixed(2)}` +
      (attrs ? `\n${attrs}` : "") + (hx.said_by && hx.said_by.length ? `\nsaid by ${hx.said_by.join(", ")}` : "") +
      (hx.source_turn !== null && hx.source_turn !== undefined ? `, turn ${hx.source_turn}` : "");
  }
  const link = target.data("link");
  return `${link.polarity < 0 ? "NOT " : ""}${link.rel}` + (link.said_by ? `\nsaid by ${link.said_by}` : "") +
    (link.turn !== null && link.turn !== undefined ? `, turn ${link.turn}` : "");
}

// Draw scene version ``index`` (of state.versions); ``diff`` (the last turn's) is animated in.
function drawScene(index, diff) {
  const entry = state.versions[index];
  const cy = state.cy;
  const scene = entry ? entry.scene : {hyperlexemes: [], links: [], focus: [], field: null};
  const old = new Map(cy.nodes().map((n) => [n.id(), n.position()]));
  cy.elements().remove();
  cy.add(elements(scene));
  const added = new Set(diff ? [...diff.added, ...diff.changed] : []);
  const linksAdded = new Set(diff ? diff.links_added.map((l) => `${l.src}|${l.rel}|${l.dst}|${l.polarity}`) : []);
  cy.nodes().forEach((n) => { if (old.has(n.id())) n.position(old.get(n.id())); });
  const layout = cy.layout({name: "cose", animate: false, randomize: old.size === 0, nodeRepulsion: () => 12000,
    idealEdgeLength: () => 80, componentSpacing: 60, nodeOverlap: 20, fit: true, padding: 24});
  layout.run();
  if (diff) {
    const fresh = cy.nodes().filter((n) => added.has(n.id()))
      .union(cy.edges().filter((e) => linksAdded.has(e.id())));
    fresh.addClass("new");
    fresh.filter("node").style("opacity", 0).animate({style: {opacity: 1}}, {duration: 600});
    setTimeout(() => fresh.removeClass("new"), 2500);
  }
  fillSceneTable(scene);
  showField(scene.field);
  const label = entry ? `version ${entry.version}` + (entry.turn !== null ? ` (after turn ${entry.turn})` : "")
    : "no scene yet";
  $("scene-version-label").textContent = label;
  $("graph").setAttribute("aria-label", `The scene, ${label}: ${scene.hyperlexemes.length} hyperlexemes, ` +
    `${scene.links.length} links`);
}

function fillSceneTable(scene) {
  const focus = new Set(scene.focus || []);
  const labels = Object.fromEntries(scene.hyperlexemes.map((hx) => [hx.id, hx.label]));
  const cell = (text) => { const td = document.createElement("td"); td.textContent = text; return td; };
  $("scene-table").tBodies[0].replaceChildren(...scene.hyperlexemes.map((hx) => {
    const tr = document.createElement("tr");
    tr.dataset.label = hx.label;
    tr.append(cell(hx.label), cell(hx.kind), cell(hx.salience.toFixed(2)),
      cell(Object.entries(hx.attrs || {}).map(([k, v]) => `${k}=${v}`).join(", ")),
      cell(focus.has(hx.id) ? "yes" : ""));
    return tr;
  }));
  $("links-table").tBodies[0].replaceChildren(...scene.links.map((link) => {
    const tr = document.createElement("tr");
    tr.className = link.polarity < 0 ? "negated" : "";
    tr.append(cell(labels[link.src] || link.src), cell(`${link.polarity < 0 ? "NOT " : ""}${link.rel}`),
      cell(labels[link.dst] || link.dst));
    return tr;
  }));
}

// The slider over the session's scene versions; it moves to the newest when a turn lands.
function showVersions(diff) {
  const slider = $("scene-version");
  const count = state.versions.length;
  slider.max = String(Math.max(0, count - 1));
  slider.value = slider.max;
  slider.disabled = count < 2;
  drawScene(count - 1, diff);
  drawField();
}

// -- the field ------------------------------------------------------------------------------

function showField(field) {
  $("field-emotion").textContent = field ? field.emotion : "–";
  $("field-tempo").textContent = field ? field.tempo : "–";
  $("field-tone").textContent = field ? field.tone : "–";
  $("field-values").textContent = field
    ? `${field.valence >= 0 ? "+" : ""}${field.valence.toFixed(2)} / ${field.arousal.toFixed(2)}` : "–";
}

function drawField() {
  const chart = state.fieldChart;
  chart.data.labels = state.versions.map((v) => (v.turn !== null ? `turn ${v.turn}` : `v${v.version}`));
  chart.data.datasets[0].data = state.versions.map((v) => v.scene.field.valence);
  chart.data.datasets[1].data = state.versions.map((v) => v.scene.field.arousal);
  chart.update();
}

function makeCharts() {
  const small = {responsive: true, maintainAspectRatio: false, animation: {duration: 250}};
  state.scoresChart = new Chart($("scores-chart"), {
    type: "bar",
    data: {labels: [], datasets: [{label: "router score", data: [], backgroundColor: []}]},
    options: Object.assign({}, small, {indexAxis: "y", plugins: {legend: {display: false}},
      scales: {y: {ticks: {autoSkip: false, font: {size: 11}}}}}),
  });
  state.fieldChart = new Chart($("field-chart"), {
    type: "line",
    data: {labels: [], datasets: [
      {label: "valence", data: [], borderColor: "#2b5fd9", backgroundColor: "#2b5fd9", tension: 0.2},
      {label: "arousal", data: [], borderColor: "#c26a00", backgroundColor: "#c26a00", tension: 0.2},
    ]},
    options: Object.assign({}, small, {scales: {y: {min: -1, max: 1}}}),
  });
}

// -- start ----------------------------------------------------------------------------------

function fill(select, names, titles = {}) {
  for (const name of names) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = titles[name] ? `${name} (${titles[name]})` : name;
    select.append(option);
  }
}

async function start() {
  makeCharts();
  state.cy = makeGraph();
  $("chat-form").addEventListener("submit", (e) => send(e).catch((err) => status(err.message, true)));
  $("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => { if (state.running) state.running.abort(); });
  $("new-session").addEventListener("click", () => openSession(newSessionName()));
  $("mood-weight").addEventListener("input", () => {
    $("mood-weight-value").textContent = Number($("mood-weight").value).toFixed(1);
  });
  $("scene-version").addEventListener("input", () => drawScene(Number($("scene-version").value), null));
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("api-key").value.trim();
    sessionStorage.setItem("hyperlex-key", state.key);
    $("key-form").hidden = true;
    load().catch((err) => status(err.message, true));
  });
  if (document.body.dataset.keyRequired === "true" && !state.key) askForKey();
  else await load();
}

async function load() {
  const info = await getJson("/api/info");
  const personas = $("persona");
  personas.replaceChildren();
  fill(personas, ["auto", ...info.personas.map((p) => p.name)]);
  const moods = $("mood");
  moods.replaceChildren();
  fill(moods, [""]);
  moods.options[0].textContent = "none";
  fill(moods, info.moods);
  if (!info.store) status("Sessions are not saved on this server (--no-store).");
  await loadSessions();
  const wanted = new URLSearchParams(location.hash.slice(1)).get("session");
  await openSession(wanted || newSessionName());
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", () => start().catch((err) => status(err.message, true)));
