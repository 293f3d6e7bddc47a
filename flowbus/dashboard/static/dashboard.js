// flowbus dashboard: the page's own small script (no framework). It keeps a copy of the server's
// model (rows, sessions, feed) from one Server-Sent Events stream and redraws on change. Every
// text from the bus goes in with textContent, never as markup.
"use strict";

(() => {
  const rows = new Map();      // id -> row (see flowbus/dashboard/_model.py)
  const sessions = new Map();  // source -> session
  let feed = [];
  let colours = {};
  let windowNs = 6 * 3600e9;
  let filter = "";
  let source = null;
  let scheduled = false;
  let revision = 0;
  const collapsed = new Set();
  const MAX_FEED = 200;
  const MAX_TIMELINE_ROWS = 150;

  const $ = (id) => document.getElementById(id);

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function age(ns) {
    if (!ns) return "";
    const s = Math.max(0, (Date.now() - ns / 1e6) / 1000);
    if (s < 60) return `${Math.floor(s)}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m${String(Math.floor(s % 60)).padStart(2, "0")}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
    return `${Math.floor(s / 86400)}d`;
  }

  function where(x) {  // session and key as one name (an ecFlow key starts with its own '/')
    return x.key ? `${x.source}${x.key.startsWith("/") ? "" : "/"}${x.key}` : x.source;
  }

  function clock(ns) {
    return ns ? new Date(ns / 1e6).toLocaleTimeString() : "";
  }

  function setConn(up, text) {
    const c = $("conn");
    c.className = "conn " + (up ? "up" : "down");
    c.textContent = text;
  }

  // -- the stream -------------------------------------------------------------------------------

  function connect() {
    if (source) source.close();
    source = new EventSource("/api/events" + (filter ? "?match=" + encodeURIComponent(filter) : ""));
    source.addEventListener("snapshot", (m) => {
      const s = JSON.parse(m.data);
      rows.clear();
      for (const r of s.rows) rows.set(r.id, r);
      sessions.clear();
      for (const x of s.sessions) sessions.set(x.source, x);
      feed = s.feed;
      colours = s.colours;
      windowNs = s.window_ns;
      setConn(true, "live");
      schedule();
    });
    source.addEventListener("ops", (m) => {
      for (const op of JSON.parse(m.data)) apply(op);
      schedule();
    });
    source.onerror = () => setConn(false, "reconnecting\u2026");
  }

  function apply(op) {
    if (op.op === "row") rows.set(op.row.id, op.row);
    else if (op.op === "remove") rows.delete(op.id);
    else if (op.op === "session") sessions.set(op.session.source, op.session);
    else if (op.op === "feed") {
      feed.push(op.item);
      if (feed.length > MAX_FEED) feed = feed.slice(-MAX_FEED);
    }
  }

  // at most five redraws a second however fast the bus goes (a tree of thousands of rows)
  const MIN_REDRAW_MS = 200;
  let lastRender = -MIN_REDRAW_MS;

  function schedule() {
    if (!scheduled) {
      scheduled = true;
      const wait = Math.max(0, MIN_REDRAW_MS - (performance.now() - lastRender));
      setTimeout(() => requestAnimationFrame(render), wait);
    }
  }

  function render() {
    scheduled = false;
    lastRender = performance.now();
    renderSessions();
    renderTree();
    renderFeed();
    renderTimeline();
    $("counts").textContent = `${rows.size} resource(s)`;
    document.body.dataset.revision = String(++revision);
  }

  // -- sessions and the tree --------------------------------------------------------------------

  function renderSessions() {
    const box = $("sessions");
    box.replaceChildren();
    for (const s of [...sessions.values()].sort((a, b) => a.source.localeCompare(b.source))) {
      const cls = s.stale ? "stale" : s.up ? "up" : "disconnected";
      const text = `${s.backend}/${s.source}: ` + (s.stale ? `stale (${s.stale})` : s.up ? "up" : `down (${s.reason})`);
      const e = el("span", "session " + cls, text);
      e.dataset.source = s.source;
      box.append(e);
    }
  }

  function buildTree() {
    const root = { children: new Map() };
    for (const r of rows.values()) {
      let node = root;
      r.path.forEach((name, i) => {
        if (!node.children.has(name)) {
          node.children.set(name, { name, depth: i, key: r.path.slice(0, i + 1).join("\u0000"), children: new Map() });
        }
        node = node.children.get(name);
      });
      node.row = r;
    }
    return root;
  }

  function badge(state, stale) {
    const b = el("span", "badge", state);
    if (!stale && colours[state]) b.style.backgroundColor = colours[state];
    return b;
  }

  function renderTree() {
    const body = $("tree-body");
    const out = [];
    const walk = (node, backend) => {
      const kids = [...node.children.values()].sort((a, b) => a.name.localeCompare(b.name, undefined, { numeric: true }));
      for (const n of kids) {
        const b = backend || n.name;
        out.push(treeRow(n, b));
        if (!collapsed.has(n.key)) walk(n, b);
      }
    };
    walk(buildTree(), "");
    body.replaceChildren(...out);
    $("empty").hidden = rows.size > 0;
  }

  // what a node is, in its backend's words (ecFlow: suite/family/task; soma, ctrl_bps: workflow/job)
  function kindOf(n, backend) {
    const leaf = n.children.size === 0;
    if (n.depth === 0) return "backend";
    if (n.depth === 1) return "session";
    if (backend === "ecflow") return n.depth === 2 ? "suite" : leaf ? "task" : "family";
    if (backend === "soma" || backend === "wms") return n.depth === 2 && !leaf ? "workflow" : "job";
    if (backend === "guiserver") return "DiFX job";
    return leaf ? "job" : "group";
  }

  function treeRow(n, backend) {
    const r = n.row;
    const tr = el("tr", r ? "resource" : "node");
    const name = el("td", "name");
    name.style.paddingLeft = `${6 + n.depth * 14}px`;
    const toggle = el("span", "toggle", n.children.size ? (collapsed.has(n.key) ? "\u25b8" : "\u25be") : "");
    toggle.addEventListener("click", (e) => {
      e.stopPropagation();
      if (collapsed.has(n.key)) collapsed.delete(n.key); else collapsed.add(n.key);
      schedule();
    });
    name.append(toggle, document.createTextNode(n.name + " "), el("span", "kind", kindOf(n, backend)));
    tr.append(name);
    if (!r) {
      if (n.depth === 1) {
        const s = sessions.get(n.name);
        tr.append(el("td", "", s ? (s.up ? "up" : "disconnected") : ""), el("td"), el("td"), el("td"),
          el("td", "reason", s ? (s.stale ? `stale: ${s.stale}` : s.reason) : ""));
      } else {
        tr.append(el("td"), el("td"), el("td"), el("td"), el("td"));
      }
      return tr;
    }
    tr.dataset.id = r.id;
    tr.dataset.state = r.state;
    if (r.stale) tr.classList.add("stale");
    const st = el("td");
    st.append(badge(r.state, r.stale));
    const prog = el("td");
    if (r.progress !== null && r.progress !== undefined) {
      const bar = el("span", "bar");
      const fill = el("span");
      fill.style.width = `${r.progress}%`;
      bar.append(fill);
      bar.title = `${r.progress.toFixed(1)} %`;
      prog.append(bar, document.createTextNode(` ${Math.round(r.progress)}%`));
    }
    const when = el("td", "age");
    when.dataset.time = String(r.time);
    if (r.stale) when.dataset.stale = r.stale;
    when.textContent = ageText(when);
    when.title = clock(r.time) + (r.try ? ` (try ${r.try})` : "");
    const attrs = Object.entries(r.attrs || {}).map(([k, v]) => `${k}=${v}`).join(" ");
    const reason = el("td", "reason", [r.reason, r.stale && `stale: ${r.stale}`].filter(Boolean).join("; "));
    if (attrs) reason.title = attrs;
    tr.append(st, el("td", "", r.native), prog, when, reason);
    tr.addEventListener("click", () => showLog(r));
    return tr;
  }

  function ageText(cell) {
    const a = age(Number(cell.dataset.time));
    return cell.dataset.stale ? `${a} (stale)` : a;
  }

  // -- feed, timeline, logs ---------------------------------------------------------------------

  function renderFeed() {
    const list = $("feed");
    const items = feed.slice(-MAX_FEED).reverse().map((f) => {
      const li = el("li", f.level);
      li.append(el("span", "when", clock(f.time) + " "),
        document.createTextNode(`${f.backend}/${where(f)} ${f.kind}: ${f.text}`));
      return li;
    });
    list.replaceChildren(...items);
  }

  function renderTimeline() {
    const box = $("timeline");
    const now = Date.now() * 1e6;
    const list = [...rows.values()].filter((r) => r.segments.length)
      .sort((a, b) => b.time - a.time).slice(0, MAX_TIMELINE_ROWS);
    let t0 = now - windowNs;
    const earliest = Math.min(...list.map((r) => r.segments[0][1]));
    if (Number.isFinite(earliest) && earliest > t0) t0 = earliest;
    const span = Math.max(now - t0, 1e9);
    $("timeline-range").textContent = list.length ? `${clock(t0)} \u2013 now` : "";
    const lines = list.map((r) => {
      const line = el("div", "tl-row");
      const label = el("div", "tl-label", where(r));
      label.title = r.id;
      const track = el("div", "tl-track");
      r.segments.forEach(([state, start], i) => {
        const end = i + 1 < r.segments.length ? r.segments[i + 1][1] : now;
        const a = Math.max(start, t0);
        if (end <= a) return;
        const seg = el("div", "tl-seg");
        seg.style.left = `${((a - t0) / span) * 100}%`;
        seg.style.width = `${Math.max(((end - a) / span) * 100, 0.2)}%`;
        seg.style.backgroundColor = colours[state] || "#ccc";
        seg.title = `${state} from ${clock(start)}`;
        track.append(seg);
      });
      line.append(label, track);
      return line;
    });
    box.replaceChildren(...lines);
    const legend = $("legend");
    if (!legend.childElementCount) legend.replaceChildren(...Object.keys(colours).map((s) => badge(s, false)));
  }

  async function showLog(r) {
    $("log-section").hidden = false;
    $("log-title").textContent = `Log of ${where(r)}`;
    const body = $("log-body");
    body.replaceChildren(el("p", "muted", "asking the backend\u2026"));
    let answer;
    try {
      const q = new URLSearchParams({ session: r.source, key: r.key });
      const resp = await fetch("/api/logs?" + q.toString(), { credentials: "same-origin" });
      answer = await resp.json();
    } catch (e) {
      answer = { error: String(e) };
    }
    if (answer.error) {
      body.replaceChildren(el("p", "error-text", `no logs: ${answer.error}`));
      return;
    }
    const parts = [];
    for (const p of answer.parts) {
      parts.push(el("h3", "", `${p.name}${p.path ? " \u2014 " + p.path : ""}${p.truncated ? " (truncated)" : ""}`));
      parts.push(el("pre", "", p.text || "(empty)"));
    }
    body.replaceChildren(...parts);
  }

  // -- the filter box ---------------------------------------------------------------------------

  async function applyFilter(e) {
    e.preventDefault();
    const text = $("filter").value.trim();
    const err = $("filter-error");
    if (text) {
      const resp = await fetch("/api/check?match=" + encodeURIComponent(text), { credentials: "same-origin" });
      const answer = await resp.json();
      if (answer.error) {
        err.textContent = answer.error;
        return;
      }
    }
    err.textContent = "";
    filter = text;
    // the address bar keeps the filter: a view to bookmark or share (the token never is in it)
    history.replaceState(null, "", filter ? "?match=" + encodeURIComponent(filter) : location.pathname);
    connect();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("filter-form").addEventListener("submit", applyFilter);
    $("log-close").addEventListener("click", () => { $("log-section").hidden = true; });
    setInterval(() => {  // ages move on without events
      for (const cell of document.querySelectorAll("td.age")) cell.textContent = ageText(cell);
      if (rows.size) renderTimeline();
    }, 1000);
    filter = new URLSearchParams(location.search).get("match") || "";
    $("filter").value = filter;
    connect();
  });
})();
