// Keel's web console (docs/ui.md): runs, a run's timeline and journal, operator actions,
// latency. Every request goes to this worker's API, with the token from session storage.

const STATUSES = ["running", "suspended", "paused", "compensating", "compensation_failed",
  "completed", "failed", "compensated", "resolved"];
const UNFINISHED = new Set(["running", "suspended", "paused", "compensating", "compensation_failed"]);
// What each action needs, as the engine's batch rules say (engine/batch.rs `admits`).
const ACTIONS = [
  { op: "cancel", label: "Cancel", needs: ["running", "suspended", "paused"], danger: true,
    text: "Cancel this run? Its completed steps are undone, newest first." },
  { op: "pause", label: "Pause", needs: ["running"],
    text: "Pause this run? It stops before its next step until resumed." },
  { op: "resume", label: "Resume", needs: ["paused", "suspended"],
    text: "Resume this run?" },
  { op: "retry-compensation", label: "Retry compensation", needs: ["compensation_failed"],
    text: "Retry the compensation that failed?" },
  { op: "resolve", label: "Resolve", needs: ["compensation_failed"], note: true,
    text: "Mark this run resolved? Say what you did by hand." },
];
const TOKEN_KEY = "keel-token";
const POLL_MS = 1000;
const COUNTS_EVERY = 5;

const $ = (id) => document.getElementById(id);
let poll = null;
let ticks = 0;

// An element with attributes and children (strings become text: never parsed as HTML).
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") setStyle(el, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// Styles through the CSSOM: the page's policy refuses `style` attributes.
function setStyle(el, text) {
  for (const rule of text.split(";")) {
    const at = rule.indexOf(":");
    if (at > 0) el.style.setProperty(rule.slice(0, at).trim(), rule.slice(at + 1).trim());
  }
}

const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  for (const c of children.flat(Infinity)) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

class SignedOut extends Error {}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) throw new SignedOut("no token");
  const headers = { Authorization: `Bearer ${token}` };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
    cache: "no-store",
  });
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    throw new SignedOut("the worker refused the token");
  }
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!response.ok) {
    const line = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    const error = new Error(line);
    error.status = response.status;
    throw error;
  }
  return body;
}

const time = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "");
function span(ms) {
  if (ms < 1) return `${ms.toFixed(2)} ms`;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 120000) return `${(ms / 1000).toFixed(1)} s`;
  return `${(ms / 60000).toFixed(1)} min`;
}
const badge = (status) => h("span", { class: `badge s-${status}`, "data-status": status }, status);
const runLink = (id) => h("a", { href: `#/run/${encodeURIComponent(id)}`, class: "mono" }, id);

// A JSON value, folded: objects and arrays are <details>, open at the top level.
function folded(value, depth = 0) {
  if (value === null || typeof value !== "object") return h("code", {}, JSON.stringify(value));
  const entries = Array.isArray(value) ? value.map((v, i) => [i, v]) : Object.entries(value);
  const open = depth < 1 ? { open: true } : {};
  const summary = Array.isArray(value) ? `[${entries.length}]` : `{${entries.length}}`;
  return h("details", { class: "json", ...open }, h("summary", {}, summary),
    entries.map(([k, v]) => h("div", {}, h("span", { class: "muted mono" }, `${k}: `), folded(v, depth + 1))));
}

// ---- routing ----

function route() {
  clearInterval(poll);
  poll = null;
  ticks = 0;
  const hash = location.hash || "#/runs";
  const [path, query] = hash.slice(1).split("?");
  for (const [id, prefix] of [["nav-runs", "/run"], ["nav-latency", "/latency"]]) {
    $(id).classList.toggle("active", path.startsWith(prefix));
  }
  if (!sessionStorage.getItem(TOKEN_KEY)) return showLogin("");
  $("login").hidden = true;
  $("sign-out").hidden = false;
  const view = $("view");
  view.hidden = false;
  let show;
  if (path.startsWith("/run/")) show = runView(decodeURIComponent(path.slice(5)));
  else if (path === "/latency") show = latencyView();
  else show = runsView(new URLSearchParams(query || ""));
  const tick = async () => {
    try {
      await show(ticks++);
    } catch (error) {
      if (error instanceof SignedOut) return showLogin(error.message === "no token" ? "" : "Wrong token: the worker refused it.");
      const line = $("view-error");
      if (line) line.textContent = `Could not load: ${error.message}`;
    }
  };
  tick();
  poll = setInterval(tick, POLL_MS);
}

function showLogin(message) {
  clearInterval(poll);
  poll = null;
  $("view").hidden = true;
  $("view").replaceChildren();
  $("sign-out").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("token").focus();
}

// ---- runs ----

function runsView(params) {
  const view = $("view");
  const filters = {};
  for (const k of ["status", "workflow", "prefix", "parent", "created_after", "created_before"]) {
    if (params.get(k)) filters[k] = params.get(k);
  }
  const after = params.get("after") || "";
  const back = params.getAll("back");
  const field = (name, label, attrs = {}) => h("label", {}, label,
    h("input", { name, value: filters[name] || "", ...attrs }));
  const localTime = (iso) => (iso ? iso.replace(/Z$/, "").slice(0, 16) : "");
  const form = h("form", { class: "filters", id: "filters" },
    h("label", {}, "Status", h("select", { name: "status" },
      h("option", { value: "" }, "any"),
      STATUSES.map((st) => h("option", { value: st, selected: filters.status === st }, st)))),
    field("workflow", "Workflow", { placeholder: "iot.onboard-device" }),
    field("prefix", "Id prefix", { placeholder: "fleet/" }),
    field("parent", "Parent run"),
    h("label", {}, "Created after (UTC)", h("input", { name: "created_after", type: "datetime-local", value: localTime(filters.created_after) })),
    h("label", {}, "Created before (UTC)", h("input", { name: "created_before", type: "datetime-local", value: localTime(filters.created_before) })),
    h("button", { type: "submit", id: "apply" }, "Apply"),
    h("button", { type: "button", onclick: () => { location.hash = "#/runs"; } }, "Clear"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const next = new URLSearchParams();
    for (const [k, v] of new FormData(form)) {
      if (!v) continue;
      next.set(k, k.startsWith("created_") ? `${v}:00Z`.slice(0, 19) + "Z" : v);
    }
    location.hash = `#/runs?${next}`;
  });
  const counts = h("div", { class: "counts", id: "counts" });
  const body = h("tbody", { id: "runs" });
  const pager = h("div", { class: "pager" });
  view.replaceChildren(
    h("h1", {}, "Runs"),
    h("div", { class: "card" }, form, counts),
    h("p", { class: "error", id: "view-error", role: "alert" }),
    h("div", { class: "card" },
      h("table", {}, h("thead", {}, h("tr", {},
        h("th", {}, "Run"), h("th", {}, "Workflow"), h("th", {}, "Status"),
        h("th", { class: "hide-narrow" }, "Created"), h("th", { class: "hide-narrow" }, "Updated"))), body),
      pager));

  const query = new URLSearchParams(filters);
  query.set("limit", "50");
  if (after) query.set("after", after);
  // A page's link: the filters, where it starts, and the starts of the pages before it
  // ("-" for the first), for Previous.
  const link = (start, before, status = filters.status) => {
    const p = new URLSearchParams({ ...filters, ...(status ? { status } : {}) });
    for (const b of before) p.append("back", b);
    if (start) p.set("after", start);
    return `#/runs?${p}`;
  };
  return async (tick) => {
    const page = await api(`/v1/runs?${query}`);
    if (tick % COUNTS_EVERY === 0) {
      const c = await api("/v1/runs:counts");
      counts.replaceChildren(
        h("span", { class: "muted" }, `${c.total} runs:`),
        ...STATUSES.map((st) => h("button", {
          type: "button", class: filters.status === st ? "active" : "", "data-count": st,
          onclick: () => { location.hash = link("", [], st); },
        }, badge(st), ` ${c.counts[st] || 0}`)));
    }
    // Rows are replaced in place; the window keeps its scroll position.
    const y = window.scrollY;
    body.replaceChildren(...page.runs.map((r) => h("tr", { class: r.parent ? "child" : "", "data-run": r.id },
      h("td", { class: "id" }, runLink(r.id)),
      h("td", {}, r.workflow),
      h("td", {}, badge(r.status)),
      h("td", { class: "hide-narrow" }, time(r.created_at_ms)),
      h("td", { class: "hide-narrow" }, time(r.updated_at_ms)))));
    // A page reads a bounded number of runs: an empty one with a next page read only part of
    // the store.
    const none = page.next ? "No match among the runs read so far: Next reads on." : "No runs match.";
    if (page.runs.length === 0) body.append(h("tr", {}, h("td", { colspan: 5, class: "muted" }, none)));
    window.scrollTo(0, y);
    $("view-error").textContent = "";
    const prev = back.length ? link(back.at(-1) === "-" ? "" : back.at(-1), back.slice(0, -1)) : null;
    pager.replaceChildren(
      prev ? h("a", { href: prev, id: "prev" }, "Previous") : "",
      page.next ? h("a", { href: link(page.next, [...back, after || "-"]), id: "next" }, "Next") : "",
      h("span", { class: "muted" }, `updated ${new Date().toLocaleTimeString()}`));
  };
}

// ---- a run ----

// The timeline's bars from the journal: one per step attempt, wait, timer, fork, child,
// receive and compensation attempt.
function bars(entries, endMs) {
  const out = [];
  const open = new Map();
  const kinds = new Map();
  const start = (key, bar) => {
    open.set(key, bar);
    out.push(bar);
    if (!kinds.has(bar.op)) kinds.set(bar.op, bar.label.replace(/^#\d+ /, "").replace(/ attempt \d+$/, ""));
  };
  const end = (key, at, cls, detail) => {
    const bar = open.get(key);
    if (!bar) return;
    bar.end = at;
    if (cls) bar.cls += ` ${cls}`;
    if (detail) bar.detail = detail;
    open.delete(key);
  };
  for (const e of entries) {
    const at = e.at_ms;
    switch (e.type) {
      case "step_started":
        start(`s${e.step}`, { label: `#${e.step} ${e.kind} attempt ${e.attempt}`, start: at, cls: "step", op: e.step });
        break;
      case "step_completed": end(`s${e.step}`, at, "ok", "completed"); break;
      case "step_failed":
        end(`s${e.step}`, at, "failed", `${e.error.class}: ${e.error.message}${e.retry_at_ms ? ` (retry at ${time(e.retry_at_ms)})` : ""}`);
        break;
      case "step_output_rejected": end(`s${e.step}`, at, "failed", e.error.message); break;
      case "wait_started":
        start(`w${e.step}`, { label: `#${e.step} wait ${e.kind}`, start: at, cls: "wait", op: e.step });
        break;
      case "wait_parked": {
        // The run parked between two polls: the open bar says how far the wait got.
        const bar = open.get(`w${e.step}`);
        if (bar) bar.detail = `${e.polls.sent} polls so far; parked until the next`;
        break;
      }
      case "wait_ended": {
        const o = e.outcome;
        end(`w${e.step}`, at, o.outcome === "ready" ? "" : "failed", `${o.outcome} after ${o.polls} polls`);
        const bar = out.find((b) => b.op === e.step && b.cls.startsWith("wait"));
        if (bar) bar.label += ` (${o.polls} polls)`;
        break;
      }
      case "timer_set":
        start(`t${e.step}`, { label: `#${e.step} timer`, start: at, cls: "timer", op: e.step, planned: e.wake_at_ms });
        break;
      case "timer_fired": end(`t${e.step}`, at, "", "fired"); break;
      case "fork_started":
        start(`f${e.step}`, { label: `#${e.step} fork of ${e.branches}`, start: at, cls: "fork", op: e.step, branches: e.branches });
        break;
      case "fork_selected": end(`f${e.step}`, at, "", `branch ${e.branch} won`); break;
      case "child_started":
        start(`c${e.step}`, { label: `#${e.step} child ${e.workflow}`, start: at, cls: "child", op: e.step, child: e.child });
        break;
      case "child_ended": end(`c${e.step}`, at, e.status === "completed" ? "" : "failed", e.status); break;
      case "receive_started":
        start(`r${e.step}`, { label: `#${e.step} receive ${e.names.join(", ")}`, start: at, cls: "wait", op: e.step });
        break;
      case "event_received": end(`r${e.step}`, at, "", `event ${e.event_id}`); break;
      case "receive_timed_out": end(`r${e.step}`, at, "failed", "timed out"); break;
      case "step_compensation_started":
        start(`u${e.step}`, { label: `undo #${e.step} ${kinds.get(e.step) || ""} attempt ${e.attempt}`, start: at, cls: "undo", op: e.step });
        break;
      case "step_compensated": end(`u${e.step}`, at, "", "undone"); break;
      case "step_compensation_failed": end(`u${e.step}`, at, "failed", `${e.error.class}: ${e.error.message}`); break;
      case "step_compensation_skipped":
        out.push({ label: `undo #${e.step} skipped`, start: at, end: at, cls: "undo", op: e.step, detail: e.reason });
        break;
      default: break;
    }
  }
  // A fork's bar spans its branches.
  for (const f of out.filter((b) => b.cls.startsWith("fork"))) {
    const branches = out.filter((b) => b.op > f.op && b.op <= f.op + f.branches && !b.cls.startsWith("undo"));
    if (branches.length) f.end = Math.max(f.end || 0, ...branches.map((b) => b.end || endMs));
  }
  for (const b of out) {
    if (b.end === undefined) { b.end = endMs; b.cls += " open"; }
  }
  return out.sort((a, b) => b.start - a.start || b.op - a.op);
}

function timeline(history) {
  const entries = history.entries;
  if (!entries.length) return h("p", { class: "muted" }, "No operations yet.");
  const run = history.run;
  const t0 = entries[0].at_ms;
  const endMs = UNFINISHED.has(run.status) ? Date.now() : entries.at(-1).at_ms;
  const all = bars(entries, endMs);
  const total = Math.max(endMs - t0, 1);
  const rows = all.map((b) => {
    const left = ((b.start - t0) / total) * 100;
    const width = Math.max(((b.end - b.start) / total) * 100, 0.3);
    const title = `${b.label}\n${time(b.start)} → ${time(b.end)} (${span(b.end - b.start)})${b.detail ? `\n${b.detail}` : ""}`;
    return h("div", { class: "tl-row", "data-kind": b.cls.split(" ")[0] },
      h("div", { class: "tl-label", title }, b.child ? [b.label, " ", runLink(b.child)] : b.label),
      h("div", { class: "tl-track" }, h("div", {
        class: `tl-bar ${b.cls}`, title, style: `left:${left}%;width:${Math.min(width, 100 - left)}%`,
      })));
  });
  const legend = [["step", "var(--ok)"], ["failed attempt", "var(--bad)"], ["wait / receive", "var(--wait)"],
    ["timer", "#9aa5b1"], ["child run", "#0f766e"], ["fork", "#334155"], ["compensation", "var(--undo)"]];
  return h("div", { class: "timeline", id: "timeline" },
    h("div", { class: "legend" }, legend.map(([t, c]) => h("span", { style: `--c:${c}` }, t)),
      h("span", { class: "muted" }, `${span(total)} from ${time(t0)}, newest first`)),
    rows);
}

function journal(entries) {
  return h("table", { id: "journal" },
    h("thead", {}, h("tr", {}, h("th", {}, "#"), h("th", {}, "Time"), h("th", {}, "Entry"), h("th", {}, "Detail"))),
    h("tbody", {}, entries.map((e, i) => {
      const { at_ms, type, ...rest } = e;
      const detail = JSON.stringify(rest);
      return h("tr", {}, h("td", {}, i), h("td", { class: "mono" }, time(at_ms)), h("td", {}, type),
        h("td", { class: "mono" }, detail.length > 300 ? `${detail.slice(0, 300)}…` : detail));
    })));
}

async function confirmAction(action) {
  const dialog = $("confirm");
  $("confirm-text").textContent = action.text;
  $("confirm-note").hidden = !action.note;
  $("confirm-note-label").hidden = !action.note;
  $("confirm-note").value = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
  });
}

function runView(id) {
  const view = $("view");
  const head = h("div", { class: "card", id: "run" });
  const actions = h("div", { class: "card" });
  const line = h("p", { class: "error", id: "action-error", role: "alert" });
  const tl = h("div", { class: "card" });
  const values = h("div", {});
  const jr = h("div", { class: "card" });
  view.replaceChildren(h("h1", {}, "Run ", h("span", { class: "mono" }, id)),
    h("p", { class: "error", id: "view-error", role: "alert" }), head, actions, line,
    h("h2", {}, "Timeline"), tl, values, h("h2", {}, "Journal"), jr);
  let last = null;
  let busy = false;
  const act = async (action) => {
    if (busy || !(await confirmAction(action))) return;
    busy = true;
    line.textContent = "";
    try {
      const body = action.note ? { note: $("confirm-note").value } : {};
      await api(`/v1/runs/${encodeURIComponent(id)}/${action.op}`, { method: "POST", body });
      last = null;
      await show(0);
    } catch (error) {
      if (error instanceof SignedOut) throw error;
      line.textContent = `${action.label} refused: ${error.message}`;
      // The refusal says the run moved on: show where it is now.
      last = null;
      await show(0);
    } finally {
      busy = false;
    }
  };
  const show = async () => {
    const history = await api(`/v1/runs/${encodeURIComponent(id)}/history`);
    const key = `${history.run.updated_at_ms}:${history.entries.length}:${history.run.status}`;
    if (key === last && !UNFINISHED.has(history.run.status)) return;
    $("view-error").textContent = "";
    const r = history.run;
    const first = last === null;
    last = key;
    const rows = [["Status", badge(r.status)], ["Workflow", `${r.workflow} (v${r.version})`],
      ["Created", time(r.created_at_ms)], ["Updated", time(r.updated_at_ms)]];
    if (r.finished_at_ms) rows.push(["Finished", `${time(r.finished_at_ms)} (${span(r.finished_at_ms - r.created_at_ms)})`]);
    if (r.parent) rows.push(["Parent", runLink(r.parent)]);
    if (r.rerun_of) rows.push(["Rerun of", runLink(r.rerun_of)]);
    if (r.error) rows.push(["Error", h("span", { class: "error", id: "run-error" }, r.error)]);
    rows.push(["Input", folded(r.input)]);
    if (r.output !== null && r.output !== undefined) rows.push(["Output", folded(r.output)]);
    head.replaceChildren(h("dl", { class: "record" }, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
    const reasons = [];
    actions.replaceChildren(h("div", { class: "actions" }, ACTIONS.map((a) => {
      const allowed = a.needs.includes(r.status);
      const reason = allowed ? "" : `${a.label}: needs ${a.needs.join(" or ")}; the run is ${r.status}`;
      if (!allowed) reasons.push(reason);
      return h("button", {
        type: "button", id: `action-${a.op}`, class: a.danger ? "danger" : "",
        disabled: !allowed, title: reason || a.text, "aria-description": reason || undefined,
        onclick: () => act(a),
      }, a.label);
    })), reasons.length ? h("ul", { class: "reasons" }, reasons.map((t) => h("li", {}, t))) : "");
    tl.replaceChildren(timeline(history));
    const published = history.entries.filter((e) => e.type === "value_published" || e.type === "progress_published");
    const received = history.entries.filter((e) => e.type === "event_delivered");
    values.replaceChildren(...[
      published.length ? [h("h2", {}, "Published values"), h("div", { class: "card" }, h("table", {}, h("tbody", {},
        published.map((e) => h("tr", {}, h("td", {}, e.name), h("td", { class: "mono" }, time(e.at_ms)), h("td", {}, folded(e.value, 1)))))))] : "",
      received.length ? [h("h2", {}, "Received events"), h("div", { class: "card" }, h("table", {}, h("tbody", {},
        received.map((e) => h("tr", {}, h("td", {}, e.name), h("td", { class: "mono" }, e.event_id), h("td", { class: "mono" }, time(e.at_ms)), h("td", {}, folded(e.payload, 1)))))))] : ""].flat());
    jr.replaceChildren(journal(history.entries));
    if (first) window.scrollTo(0, 0);
  };
  return show;
}

// ---- latency ----

function distributionPlot(stats) {
  const buckets = stats.distribution || [];
  if (!buckets.length) return h("p", { class: "muted" }, "No distribution recorded.");
  const W = 640, H = 160, L = 40, B = 28;
  const max = Math.max(...buckets.map((b) => b.count), 1);
  const lo = Math.log10(Math.max(buckets[0].le_us / Math.SQRT2, 1));
  const hi = Math.log10(buckets.at(-1).le_us);
  const x = (us) => L + ((Math.log10(Math.max(us, 1)) - lo) / Math.max(hi - lo, 1e-9)) * (W - L - 10);
  const y = (n) => H - B - (Math.log10(n + 1) / Math.log10(max + 1)) * (H - B - 10);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `distribution of ${stats.operation}`, class: "distribution" });
  let prev = buckets[0].le_us / Math.SQRT2;
  for (const b of buckets) {
    if (b.count > 0) {
      svg.append(s("rect", { class: "bar", x: x(prev), y: y(b.count), width: Math.max(x(b.le_us) - x(prev) - 1, 1), height: H - B - y(b.count) },
        s("title", {}, `≤ ${span(b.le_us / 1000)}: ${b.count}`)));
    }
    prev = b.le_us;
  }
  svg.append(s("line", { class: "axis", x1: L, y1: H - B, x2: W - 10, y2: H - B }));
  for (let d = Math.ceil(lo); d <= Math.floor(hi); d++) {
    svg.append(s("line", { class: "axis", x1: x(10 ** d), y1: H - B, x2: x(10 ** d), y2: H - B + 4 }),
      s("text", { x: x(10 ** d), y: H - 8, "text-anchor": "middle" }, span(10 ** d / 1000)));
  }
  svg.append(s("text", { x: 2, y: 12 }, `${max} max`), s("text", { x: 2, y: H - B }, "0"));
  return h("div", { class: "plot" }, svg);
}

function limiterPlot(limiter) {
  const points = limiter.history || [];
  const W = 640, H = 120, L = 40, B = 20;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `rate of ${limiter.service}` });
  if (points.length > 1) {
    const t0 = points[0].at_ms, t1 = points.at(-1).at_ms;
    const top = Math.max(...points.map((p) => p.rate), 1);
    const x = (t) => L + ((t - t0) / Math.max(t1 - t0, 1)) * (W - L - 10);
    const y = (r) => H - B - (r / top) * (H - B - 10);
    svg.append(s("polyline", { class: "rate", points: points.map((p) => `${x(p.at_ms)},${y(p.rate)}`).join(" ") }));
    for (let i = 1; i < points.length; i++) {
      const n = points[i].throttles - points[i - 1].throttles;
      if (n > 0) svg.append(s("circle", { class: "throttle", cx: x(points[i].at_ms), cy: H - B, r: Math.min(2 + n, 6) }, s("title", {}, `${n} throttled`)));
    }
    svg.append(s("text", { x: 2, y: 12 }, `${top.toFixed(1)}/s`), s("text", { x: L, y: H - 4 }, time(t0)),
      s("text", { x: W - 10, y: H - 4, "text-anchor": "end" }, time(t1)));
  }
  svg.append(s("line", { class: "axis", x1: L, y1: H - B, x2: W - 10, y2: H - B }));
  return h("div", { class: "plot" }, svg);
}

function latencyView() {
  const view = $("view");
  const table = h("div", { class: "card", id: "stats" });
  const plots = h("div", { id: "plots" });
  const limiters = h("div", { id: "limiters" });
  view.replaceChildren(h("h1", {}, "Latency"), h("p", { class: "error", id: "view-error", role: "alert" }),
    h("p", { class: "muted" }, "Successful executions per operation since the store began (the figures of keel stats); distributions on a log time axis."),
    table, plots, h("h2", {}, "Rate limiters"), limiters);
  return async (tick) => {
    if (tick % COUNTS_EVERY !== 0) return;
    const stats = await api("/v1/stats");
    const ms = (d) => span(d / 1000);
    table.replaceChildren(h("table", {},
      h("thead", {}, h("tr", {}, ["operation", "count", "min", "mean", "max", "σ", "p50", "p90", "p99", "p99.9"].map((t) => h("th", {}, t)))),
      h("tbody", {}, stats.map((st) => h("tr", {}, h("td", {}, st.operation), h("td", {}, st.count),
        [st.min, st.mean, st.max, st.std_dev, st.p50, st.p90, st.p99, st.p999].map((d) => h("td", { class: "mono" }, ms(micros(d)))))))));
    plots.replaceChildren(...stats.map((st) => h("div", { class: "card", "data-operation": st.operation },
      h("h2", {}, st.operation), distributionPlot(st),
      st.outliers && st.outliers.length ? h("p", {}, "Worst: ", st.outliers.map((o, i) => [i ? ", " : "",
        h("a", { href: `#/run/${encodeURIComponent(o.run_id)}`, title: o.run_id }, ms(micros(o.duration)))])) : "")));
    try {
      const all = await api("/v1/limiters");
      limiters.replaceChildren(...all.map((l) => h("div", { class: "card" },
        h("h2", {}, `${l.service}: ${l.rate.toFixed(1)}/s now, ${l.throttles} throttled`), limiterPlot(l))));
    } catch (error) {
      if (error instanceof SignedOut) throw error;
      limiters.replaceChildren(h("p", { class: "muted" }, `Not available: ${error.message}`));
    }
  };
}

// A duration as the API serialises it: microseconds, or serde's {secs, nanos}.
function micros(d) {
  if (typeof d === "number") return d;
  if (d && typeof d === "object") return (d.secs || 0) * 1e6 + (d.nanos || 0) / 1e3;
  return 0;
}

// ---- start ----

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  try {
    await api("/v1/runs?limit=1");
    route();
  } catch (error) {
    showLogin(error instanceof SignedOut ? "Wrong token: the worker refused it." : `Could not reach the worker: ${error.message}`);
  }
});
$("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin("");
});
window.addEventListener("hashchange", route);
route();
