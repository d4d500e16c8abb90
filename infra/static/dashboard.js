/* Jobs dashboard: vanilla JS, no build step, no dependencies.
 *
 * Pages (hash routing): #/ overview, #/jobs list, #/jobs/<id> one job, #/dead-letters,
 * #/schedules, #/submit. Everything comes from the public HTTP API on the same origin;
 * errors are problem documents whose `detail` is shown as it is. A job's page follows the
 * job's event stream (GET /jobs/{id}/events) and polls only if the stream cannot be had.
 *
 * The API wants `Authorization: Bearer <token>`. The token is asked for in a sign-in form
 * and kept in sessionStorage (this tab only, gone when it closes; never localStorage, never
 * a URL); every call goes through request(), which sends it. A 401 on the stored token ends
 * the session and shows the form again. What the token's scopes (from /whoami) do not allow
 * is not shown: no submit form without jobs:submit, no cancel or replay without jobs:operate.
 */
"use strict";

(() => {
  const STATUSES = ["WAITING", "QUEUED", "IN_PROGRESS", "RETRYING", "FAILED", "COMPLETED", "DEAD_LETTER",
    "CANCELLED"];
  const LABELS = {WAITING: "Waiting", QUEUED: "Queued", IN_PROGRESS: "In progress", RETRYING: "Retrying",
    FAILED: "Failed", COMPLETED: "Completed", DEAD_LETTER: "Dead letter", CANCELLED: "Cancelled"};
  const SHORT = {WAITING: "Wait", QUEUED: "Queued", IN_PROGRESS: "Running", RETRYING: "Retry", FAILED: "Failed",
    COMPLETED: "Done", DEAD_LETTER: "Dead", CANCELLED: "Cancel."};
  const TERMINAL = new Set(["COMPLETED", "DEAD_LETTER", "CANCELLED"]);
  const CANCELLABLE = new Set(["WAITING", "QUEUED", "RETRYING", "IN_PROGRESS"]);
  const REFRESH_MS = 2000;
  const JOB_REFRESH_MS = 1000;
  const SCOPE = {SUBMIT: "jobs:submit", READ: "jobs:read", OPERATE: "jobs:operate", ADMIN: "admin"};
  const TOKEN_KEY = "jobs.token";

  // ---------------------------------------------------------------- HTML building
  class Raw { constructor(s) { this.s = s; } toString() { return this.s; } }
  const raw = (s) => new Raw(s);
  const esc = (v) => String(v).replace(/[&<>"']/g, (c) => (
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const fmt = (v) => {
    if (v instanceof Raw) return v.s;
    if (Array.isArray(v)) return v.map(fmt).join("");
    if (v === null || v === undefined || v === false) return "";
    return esc(v);
  };
  /** Tagged template: every interpolation is escaped unless it is raw(...) or html`...`. */
  const html = (strings, ...values) => {
    let out = strings[0];
    values.forEach((v, i) => { out += fmt(v) + strings[i + 1]; });
    return raw(out);
  };
  /** Set innerHTML only when it changed: no flicker, no lost focus on unchanged parts. */
  const setHTML = (el, content) => {
    const s = fmt(content);
    if (el._html !== s) { el.innerHTML = s; el._html = s; }
  };
  const setText = (el, text) => { if (el.textContent !== String(text)) el.textContent = text; };
  const $ = (sel, root = document) => root.querySelector(sel);

  // ---------------------------------------------------------------- formatting
  let clockSkew = 0;  // server time - browser time, from the Date header of each answer
  const serverNow = () => Date.now() + clockSkew;
  const pad = (n) => String(n).padStart(2, "0");
  const hhmm = (d) => `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  const hhmmss = (d) => `${hhmm(d)}:${pad(d.getSeconds())}`;
  const sameDay = (a, b) => a.toDateString() === b.toDateString();
  function when(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return sameDay(d, new Date(serverNow())) ? hhmmss(d)
      : `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${hhmmss(d)}`;
  }
  function ago(iso) {
    if (!iso) return "";
    const s = Math.max(0, Math.round((serverNow() - Date.parse(iso)) / 1000));
    if (s < 2) return "just now";
    if (s < 90) return `${s} s ago`;
    if (s < 90 * 60) return `${Math.round(s / 60)} min ago`;
    if (s < 36 * 3600) return `${Math.round(s / 3600)} h ago`;
    return when(iso);
  }
  const localZone = () => {
    try { return Intl.DateTimeFormat().resolvedOptions().timeZone || "browser time"; } catch (err) {
      return "browser time";
    }
  };
  /**
   * A datetime-local value ("2030-01-31T14:00[:05]") as ISO 8601 with this browser's UTC
   * offset at that moment (so summer time is right): "2030-01-31T14:00:05+01:00".
   */
  function localISO(value) {
    const m = /^(\d{4,})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2}))?/.exec(value);
    if (!m) return value;  // not from a datetime-local input: the server says what is wrong
    const d = new Date(Number(m[1]), Number(m[2]) - 1, Number(m[3]), Number(m[4]), Number(m[5]),
      Number(m[6] || 0));
    const offset = -d.getTimezoneOffset();
    const abs = Math.abs(offset);
    return `${String(d.getFullYear()).padStart(4, "0")}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`
      + `T${hhmmss(d)}${offset < 0 ? "-" : "+"}${pad(Math.floor(abs / 60))}:${pad(abs % 60)}`;
  }
  /** "in 5 s", "in 3 min", "in 2 h", else the date: for times ahead (next runs). */
  function until(iso) {
    if (!iso) return "";
    const s = Math.round((Date.parse(iso) - serverNow()) / 1000);
    if (s < 1) return "due now";
    if (s < 90) return `in ${s} s`;
    if (s < 90 * 60) return `in ${Math.round(s / 60)} min`;
    if (s < 36 * 3600) return `in ${Math.round(s / 3600)} h`;
    return when(iso);
  }
  const timeCell = (iso) => (iso ? html`<time datetime="${iso}" title="${iso}">${ago(iso)}</time>`
    : html`<span class="muted">–</span>`);
  function duration(a, b) {
    if (!a || !b) return "";
    const ms = Date.parse(b) - Date.parse(a);
    if (ms < 1000) return `${ms} ms`;
    if (ms < 120000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
    return `${Math.round(ms / 60000)} min`;
  }
  const shortId = (id) => (id ? String(id).slice(0, 8) : "");
  const badge = (status, testid) => html`<span class="badge" data-status="${status}"
    ${testid ? raw(`data-testid="${esc(testid)}"`) : ""}>${status}</span>`;
  const jobLink = (id, testid = "job-link") => html`<a class="mono" href="#/jobs/${id}"
    data-testid="${testid}" title="${id}">${shortId(id)}</a>`;
  const pretty = (v) => JSON.stringify(v, null, 2);
  function progressBar(p, message) {
    const known = typeof p === "number";
    const pct = known ? Math.round(p * 100) : null;
    const text = known ? `${pct}%` : "running";
    return html`<div class="progress-line"><div class="progress ${known ? "" : "indeterminate"}"
      role="progressbar" aria-label="Progress" aria-valuemin="0" aria-valuemax="100"
      ${known ? raw(`aria-valuenow="${pct}"`) : raw('aria-valuetext="running, no progress reported"')}
      data-testid="progress"><span style="${known ? `width:${pct}%` : ""}"></span></div>
      <span class="progress-text">${text}${message ? ` · ${message}` : ""}</span></div>`;
  }

  // ---------------------------------------------------------------- the token
  // sessionStorage can be unavailable (storage disabled): then the token lives in memory only.
  let memoryToken = null;
  function storedToken() {
    try { return sessionStorage.getItem(TOKEN_KEY); } catch (err) { return memoryToken; }
  }
  function storeToken(token) {
    memoryToken = token;
    try {
      if (token === null) sessionStorage.removeItem(TOKEN_KEY);
      else sessionStorage.setItem(TOKEN_KEY, token);
    } catch (err) { /* kept in memory */ }
  }
  let me = null;  // {name, scopes} of the stored token (GET /whoami), null when signed out
  let signInNotice = null;  // {kind, content} shown above the sign-in form once
  const can = (scope) => Boolean(me) && (me.scopes.includes(SCOPE.ADMIN) || me.scopes.includes(scope));

  // ---------------------------------------------------------------- the API
  class ApiError extends Error {
    constructor(status, detail, body) {
      super(detail);
      this.status = status;
      this.detail = detail;
      this.body = body;
    }
  }
  /**
   * The one place that calls fetch: sends the token, tracks the connection and the server's
   * clock, and turns a non-2xx answer into an ApiError carrying the problem's detail. A 401
   * on the stored token ends the session (`token` overrides it, for the sign-in form's check).
   */
  async function request(path, {method = "GET", body, accept = "application/json",
    token = storedToken(), signal} = {}) {
    const opts = {method, headers: {Accept: accept}, cache: "no-store", signal};
    if (token) opts.headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) {
      opts.body = JSON.stringify(body);
      opts.headers["Content-Type"] = "application/json";
    }
    let resp;
    try {
      resp = await fetch(path, opts);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      live(false, "the gateway is not answering");
      throw new ApiError(0, "the gateway is not answering", null);
    }
    const date = Date.parse(resp.headers.get("Date") || "");
    if (!Number.isNaN(date)) clockSkew = date - Date.now();
    if (resp.ok) {
      live(true);
      return resp;
    }
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (err) { data = null; }
    const detail = (data && data.detail) || `${resp.status} ${resp.statusText}`.trim();
    if (resp.status >= 500) live(false, detail);
    const error = new ApiError(resp.status, detail, data);
    if (resp.status === 401 && token && token === storedToken()) endSession(error);
    throw error;
  }
  /** request() for a JSON answer. */
  async function api(path, opts = {}) {
    const resp = await request(path, opts);
    const text = await resp.text();
    try { return text ? JSON.parse(text) : null; } catch (err) { return null; }
  }
  /**
   * Follow a job's event stream (GET /jobs/{id}/events, server-sent events): `onDoc` gets
   * each job document as it comes and is awaited; resolves when the server ends the stream
   * (after a final document), rejects if it cannot be opened or breaks. fetch() reads it,
   * not EventSource, which cannot send the token in a header. The smallest reader of the
   * format that fits what the gateway sends: `data:` lines joined until a blank line make
   * one event; comments (heartbeats), `id:` and other fields are skipped.
   */
  async function jobEvents(id, onDoc, signal) {
    const resp = await request(`/jobs/${encodeURIComponent(id)}/events`,
      {accept: "text/event-stream", signal});
    if (resp.status === 204 || !resp.body) return;  // nothing more will come
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let data = [];
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      live(true);  // heartbeats keep the indicator fresh while nothing changes
      const lines = (buffer + value).split(/\r\n|\r|\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line === "") {
          if (data.length) await onDoc(JSON.parse(data.join("\n")));
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        }
      }
    }
  }
  /** The name in a Content-Disposition header (filename* first, RFC 6266), else null. */
  function dispositionName(header) {
    if (!header) return null;
    const clean = (name) => name.replace(/[/\\\u0000-\u001f]/g, "_").trim() || null;
    const star = /filename\*\s*=\s*([\w!#$%&+^`{}~-]*)'[^']*'([^;\s]+)/i.exec(header);
    if (star && (!star[1] || /^utf-8$/i.test(star[1]))) {
      try { return clean(decodeURIComponent(star[2])); } catch (err) { /* the plain form */ }
    }
    const plain = /filename\s*=\s*(?:"((?:\\.|[^"\\])*)"|([^;\s]+))/i.exec(header);
    if (plain) return clean(plain[1] !== undefined ? plain[1].replace(/\\(.)/g, "$1") : plain[2]);
    return null;
  }
  /**
   * Save a file the API serves. A plain <a href> cannot send the token, so the file is
   * fetched with it and handed to the browser as a Blob object URL under its own name.
   */
  async function download(path, fallbackName) {
    const resp = await request(path, {accept: "*/*"});
    const blob = await resp.blob();
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = dispositionName(resp.headers.get("Content-Disposition")) || fallbackName;
    a.hidden = true;
    document.body.appendChild(a);
    a.click();
    a.remove();
    // Revoked later, not at once: some browsers still read the URL after click() returns.
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }
  function problemHTML(err) {
    const errors = err.body && Array.isArray(err.body.errors) ? err.body.errors : [];
    const list = errors.length ? html`<ul>${errors.map((e) => html`<li><code>${
      (e.loc || []).join(".") || "body"}</code>: ${e.msg || ""}</li>`)}</ul>` : "";
    return html`<strong>${err.status ? `${err.status}: ` : ""}</strong>${err.detail}${list}`;
  }

  /** The connection indicator: ok true (live), false (offline, why), null (signed out). */
  function live(ok, why) {
    const box = $(".live");
    if (!box) return;
    box.classList.toggle("ok", ok === true);
    box.classList.toggle("error", ok === false);
    // Only a change of state is announced (role=status); the clock beside it is not.
    setText($(".live-text", box), ok === null ? "not signed in"
      : ok ? "live" : `offline: ${why} (retrying)`);
    setText($(".live-time", box), ok ? ` · ${hhmmss(new Date())}` : "");
  }

  // ---------------------------------------------------------------- polling
  /** Run fn now and then every ms after it finishes; paused while the tab is hidden. */
  function poller(fn, ms) {
    let timer = null;
    let stopped = false;
    let running = false;
    const tick = async () => {
      timer = null;
      if (stopped) return;
      if (!document.hidden) {
        running = true;
        try { await fn(); } catch (err) { if (!(err instanceof ApiError)) console.error(err); }
        running = false;
      }
      if (!stopped && timer === null) timer = setTimeout(tick, ms);
    };
    tick();
    return {
      stop() { stopped = true; clearTimeout(timer); },
      now() { if (!running && !stopped) { clearTimeout(timer); tick(); } },
    };
  }
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && view && view.refresh) view.refresh();
  });

  /** Keyed rows: unchanged rows and cells stay as they are (no flicker, focus kept). */
  function patchRows(tbody, items, {key, cells, attrs, empty, cols}) {
    const existing = new Map();
    for (const tr of tbody.querySelectorAll(":scope > tr[data-key]")) existing.set(tr.dataset.key, tr);
    const placeholder = tbody.querySelector(":scope > tr.empty");
    if (!items.length) {
      existing.forEach((tr) => tr.remove());
      if (!placeholder) {
        tbody.innerHTML = html`<tr class="empty"><td colspan="${cols}">${empty}</td></tr>`.s;
      }
      return;
    }
    if (placeholder) placeholder.remove();
    let prev = null;
    for (const item of items) {
      const k = String(key(item));
      let tr = existing.get(k);
      if (tr) existing.delete(k);
      else { tr = document.createElement("tr"); tr.dataset.key = k; }
      for (const [name, value] of Object.entries(attrs ? attrs(item) : {})) {
        if (tr.getAttribute(name) !== String(value)) tr.setAttribute(name, value);
      }
      const specs = cells(item);
      specs.forEach((spec, i) => {
        let td = tr.children[i];
        if (!td) { td = document.createElement("td"); tr.appendChild(td); }
        const content = spec && spec.html !== undefined ? spec.html : spec;
        const cls = (spec && spec.cls) || "";
        if (td.className !== cls) td.className = cls;
        setHTML(td, content);
      });
      while (tr.children.length > specs.length) tr.lastChild.remove();
      const want = prev ? prev.nextSibling : tbody.firstChild;
      if (want !== tr) tbody.insertBefore(tr, want);
      prev = tr;
    }
    existing.forEach((tr) => tr.remove());
  }
  const num = (n) => ({html: String(n), cls: n ? "num" : "num zero"});

  // ---------------------------------------------------------------- job types (openapi)
  let typesPromise = null;
  function jobTypes() {
    if (!typesPromise) {
      typesPromise = api("/openapi.json").then((doc) => {
        const schemas = (doc.components && doc.components.schemas) || {};
        const resolve = (s) => {
          if (s && s.$ref) return schemas[s.$ref.split("/").pop()] || {};
          return s || {};
        };
        return Object.keys(schemas).filter((k) => k.startsWith("Submit_")).sort().map((k) => {
          const sub = schemas[k];
          const payload = resolve(sub.properties && sub.properties.payload);
          return {name: k.slice("Submit_".length), description: sub.description || "",
            payload, resolve};
        });
      }).catch((err) => { typesPromise = null; throw err; });
    }
    return typesPromise;
  }
  /** A starting payload for a type: its model's example, else one built from its fields. */
  function examplePayload(type) {
    const s = type.payload;
    if (Array.isArray(s.examples) && s.examples.length) return s.examples[0];
    if (!s.properties) return {};
    const out = {};
    for (const name of s.required || []) {
      const p = type.resolve(s.properties[name]);
      if (Array.isArray(p.examples) && p.examples.length) out[name] = p.examples[0];
      else if (p.default !== undefined) out[name] = p.default;
      else if (p.enum) out[name] = p.enum[0];
      else {
        out[name] = {string: "hello", integer: 1, number: 1, boolean: true, array: [],
          object: {}}[p.type] ?? null;
      }
    }
    return out;
  }
  function typeName(p) {
    if (!p) return "any";
    if (p.$ref) return p.$ref.split("/").pop();
    if (p.enum) return p.enum.map((v) => JSON.stringify(v)).join(" | ");
    if (p.anyOf) return p.anyOf.map(typeName).join(" | ");
    if (p.type === "array") {
      const inner = typeName(p.items);
      return `${inner.includes(" ") ? `(${inner})` : inner}[]`;
    }
    return p.type || "any";
  }

  // ---------------------------------------------------------------- router
  let view = null;  // {stop(), refresh?(), actions?}
  const main = () => $("#main");
  // [path, nav section, scope the page needs, what it shows (for a token without it), view]
  const ROUTES = [
    [/^\/?$/, "overview", SCOPE.READ, "see jobs", () => overviewView()],
    [/^\/jobs\/?$/, "jobs", SCOPE.READ, "see jobs", (m, q) => jobsView(q)],
    [/^\/jobs\/([^/]+)\/?$/, "jobs", SCOPE.READ, "see jobs",
      (m) => jobView(decodeURIComponent(m[1]))],
    [/^\/dead-letters\/?$/, "dead-letters", SCOPE.READ, "see dead letters",
      () => deadLettersView()],
    [/^\/schedules\/?$/, "schedules", SCOPE.READ, "see schedules", () => schedulesView()],
    [/^\/submit\/?$/, "submit", SCOPE.SUBMIT, "submit jobs", (m, q) => submitView(q)],
  ];
  let lastPath = null;
  function route() {
    const hash = location.hash.replace(/^#/, "") || "/";
    const [path, query = ""] = hash.split("?");
    if (view) view.stop();
    view = null;
    let section = null;
    if (!me) {
      view = storedToken() ? resumeView() : signInView();
    } else {
      for (const [re, name, scope, what, make] of ROUTES) {
        const m = path.match(re);
        if (m) {
          section = name;
          view = can(scope) ? make(m, new URLSearchParams(query)) : missingScopeView(scope, what);
          break;
        }
      }
      if (!view) view = notFoundView(path);
    }
    document.querySelectorAll("nav a[data-route]").forEach((a) => {
      if (a.dataset.route === section) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    });
    if (lastPath !== null && lastPath !== path) {
      const h1 = $("h1", main());
      if (h1) { h1.tabIndex = -1; h1.focus({preventScroll: true}); }
      window.scrollTo(0, 0);
    }
    lastPath = path;
  }
  function render(title, content) {
    document.title = `${title} · Jobs`;
    const el = main();
    el.innerHTML = fmt(content);
    el._html = undefined;
    return el;
  }
  document.addEventListener("click", (e) => {
    const skip = e.target.closest("[data-skip]");
    if (skip) { e.preventDefault(); main().focus(); return; }
    const btn = e.target.closest("button[data-action]");
    if (!btn || !view || !view.actions) return;
    const action = view.actions[btn.dataset.action];
    if (action) { e.preventDefault(); action(btn); }
  });

  // ---------------------------------------------------------------- signing in and out
  /** Show who is signed in, and only the pages the token may use. */
  function showIdentity() {
    const who = $("[data-testid=who]");
    who.hidden = !me;
    $("nav").hidden = !me;
    if (!me) {
      live(null);
      return;
    }
    setText($("[data-testid=who-name]", who), me.name);
    who.title = `Scopes: ${me.scopes.join(", ")}`;
    document.querySelectorAll("nav a[data-scope]").forEach((a) => {
      a.parentElement.hidden = !can(a.dataset.scope);
    });
  }
  /** Forget the token and ask for one again; `why` (an ApiError) says what the API said. */
  function endSession(why) {
    if (!me && !storedToken()) return;  // already signed out: several polls may get 401
    storeToken(null);
    me = null;
    flash = null;
    watched.clear();
    signInNotice = why ? {kind: "error", content: html`You were signed out: ${why.detail}`}
      : {kind: "ok", content: "Signed out."};
    showIdentity();
    route();
  }

  function signInView() {
    showIdentity();
    const el = render("Sign in", html`
      <form class="panel sign-in" method="post" data-testid="sign-in-form" novalidate
        aria-labelledby="sign-in-h">
        <h1 id="sign-in-h">Sign in</h1>
        <p>The API needs a token. Paste one to use this dashboard: it is kept in this tab only,
          until you sign out or close it.</p>
        <div class="field"><label for="f-token">API token</label>
          <input id="f-token" name="token" type="password" autocomplete="off" spellcheck="false"
            required placeholder="jobs_…" aria-describedby="f-token-hint"
            data-testid="sign-in-token">
          <span class="hint" id="f-token-hint">An admin makes tokens with <code>POST /tokens</code>;
            <code>make run</code> writes an admin token to <code>.data/admin-token</code> (or <code>$JOBS_DATA_DIR/admin-token</code>).</span></div>
        <div class="notice" role="alert" data-testid="sign-in-error"></div>
        <div class="actions"><button type="submit" class="primary"
          data-testid="sign-in-button">Sign in</button></div>
      </form>`);
    const errorEl = $("[data-testid=sign-in-error]", el);
    const input = $("#f-token", el);
    if (signInNotice) {
      notice(errorEl, signInNotice.kind, signInNotice.content);
      signInNotice = null;
    }
    input.focus({preventScroll: true});
    input.addEventListener("input", () => { errorEl.className = "notice"; setHTML(errorEl, ""); });
    $("form", el).addEventListener("submit", async (e) => {
      e.preventDefault();
      const token = input.value.trim();
      if (!token) {
        notice(errorEl, "error", "Paste a token first.");
        input.focus();
        return;
      }
      const btn = $("[data-testid=sign-in-button]", el);
      btn.disabled = true;
      try {
        const who = await api("/whoami", {token});
        storeToken(token);
        me = who;
        showIdentity();
        route();
      } catch (err) {
        notice(errorEl, "error", problemHTML(err));
        btn.disabled = false;
        input.select();
      }
    });
    return {stop() {}};
  }

  /** A token is stored (a reload): ask /whoami whose it is, until the API answers. */
  function resumeView() {
    render("Signing in", html`<p class="muted" data-testid="signing-in">Signing in…</p>`);
    let stopped = false;
    const p = poller(async () => {
      const who = await api("/whoami");  // a 401 ends the session and shows the form
      if (stopped) return;
      p.stop();
      me = who;
      showIdentity();
      route();
    }, REFRESH_MS);
    return {stop() { stopped = true; p.stop(); }};
  }

  function missingScopeView(scope, what) {
    const el = render("Not allowed", html`
      <h1>Not allowed</h1>
      <div class="notice" role="status" data-testid="page-notice"></div>
      <div class="notice error" data-testid="missing-scope">The token <strong>${me.name}</strong>
        may not ${what}: it lacks the <code>${scope}</code> scope (it has ${
        me.scopes.map((s, i) => html`${i ? ", " : ""}<code>${s}</code>`)}).
        Ask an admin for a token with it, or sign out and use another one.</div>
      ${can(SCOPE.SUBMIT) && scope !== SCOPE.SUBMIT
        ? html`<p><a class="button" href="#/submit">Submit a job</a></p>` : ""}`);
    if (flash) { notice($("[data-testid=page-notice]", el), flash.kind, flash.content); flash = null; }
    return {stop() {}};
  }

  function notice(el, kind, content) {
    el.className = `notice ${kind}`;
    setHTML(el, content);
  }

  /** POST /jobs/{id}/cancel from a button; then `after(doc)`. */
  async function cancelJob(btn, noticeEl, after) {
    const id = btn.dataset.jobId;
    btn.disabled = true;
    try {
      const doc = await api(`/jobs/${encodeURIComponent(id)}/cancel`, {method: "POST"});
      notice(noticeEl, "ok", html`Cancel of job ${jobLink(id, "notice-job-link")} accepted: ${
        badge(doc.status)} ${doc.status === "IN_PROGRESS" ? "(the handler is asked to stop)" : ""}`);
      if (after) after(doc);
    } catch (err) {
      btn.disabled = false;
      notice(noticeEl, "error", problemHTML(err));
    }
  }

  // ---------------------------------------------------------------- overview
  function overviewView() {
    const operate = can(SCOPE.OPERATE);
    const el = render("Overview", html`
      <h1>Overview</h1>
      <section class="cards" aria-label="Jobs per status" data-testid="status-cards">
        ${STATUSES.map((s) => html`<a class="card" href="#/jobs?status=${s}" data-status="${s}"
          data-testid="count-card-${s}"><div class="label">${LABELS[s]}</div>
          <div class="value" data-testid="count-${s}">–</div></a>`)}
      </section>
      <div class="notice" role="status" aria-live="polite" data-testid="overview-notice"></div>
      <section class="panel" aria-labelledby="running-h" style="margin-bottom:16px">
        <div class="panel-head"><h2 id="running-h">Running jobs</h2>
          <span class="hint" data-testid="running-count"></span></div>
        <div class="table-wrap"><table data-testid="running-table">
          <thead><tr><th scope="col">Job</th><th scope="col">Type</th>
            <th scope="col" style="width:34%">Progress</th><th scope="col" class="num">Attempt</th>
            <th scope="col">Started</th><th scope="col">Updated</th>
            ${operate ? html`<th scope="col"><span class="sr-only">Actions</span></th>` : ""}
            </tr></thead>
          <tbody></tbody></table></div>
      </section>
      <div class="grid chart-types">
        <section class="panel chart" aria-labelledby="tp-h">
          <div class="panel-head"><h2 id="tp-h">Throughput <span class="hint">per minute,
            last 15 min</span></h2>
            <div class="legend" aria-hidden="true"><span><i class="c"></i>completed</span>
              <span><i class="f"></i>failed</span></div></div>
          <div data-testid="throughput-chart"></div>
        </section>
        <section class="panel" aria-labelledby="type-h">
          <div class="panel-head"><h2 id="type-h">By type</h2></div>
          <div class="table-wrap"><table class="compact" data-testid="by-type-table">
            <thead><tr><th scope="col">Type</th>${STATUSES.map((s) => html`<th scope="col"
              class="num" title="${LABELS[s]}">${SHORT[s]}</th>`)}
              <th scope="col" class="num">Total</th></tr></thead>
            <tbody></tbody></table></div>
        </section>
      </div>
      <section class="panel" aria-labelledby="recent-h">
        <div class="panel-head"><h2 id="recent-h">Recent jobs <span class="hint">20 most recently
          changed</span></h2><a href="#/jobs">All jobs</a></div>
        <div class="table-wrap"><table data-testid="recent-table">
          <thead><tr><th scope="col">Job</th><th scope="col">Type</th><th scope="col">Status</th>
            <th scope="col" class="num">Attempts</th><th scope="col">Created</th>
            <th scope="col">Updated</th><th scope="col">Error</th></tr></thead>
          <tbody></tbody></table></div>
      </section>`);
    const noticeEl = $("[data-testid=overview-notice]", el);

    const update = async () => {
      const stats = await api("/stats");
      for (const s of STATUSES) setText($(`[data-testid=count-${s}]`, el), stats.counts[s] ?? 0);
      const running = stats.running || [];
      setText($("[data-testid=running-count]", el), running.length ? `${running.length} running` : "");
      patchRows($("[data-testid=running-table] tbody", el), running, {
        key: (j) => j.job_id, cols: operate ? 7 : 6, empty: "Nothing is running right now.",
        attrs: (j) => ({"data-testid": "running-row", "data-job-id": j.job_id}),
        cells: (j) => [
          jobLink(j.job_id), {html: html`${j.job_type}`, cls: "nowrap"},
          progressBar(j.progress, j.progress_message), num(j.attempts),
          timeCell(j.created_at), timeCell(j.updated_at),
          ...(!operate ? [] : [j.cancel_requested
            ? html`<button class="small" disabled data-testid="cancel-button">Cancelling…</button>`
            : html`<button class="small danger" data-action="cancel" data-job-id="${j.job_id}"
                data-testid="cancel-button" aria-label="Cancel job ${shortId(j.job_id)} (${
                j.job_type})">Cancel</button>`]),
        ],
      });
      const types = Object.keys(stats.by_type || {}).sort();
      patchRows($("[data-testid=by-type-table] tbody", el), types, {
        key: (t) => t, cols: STATUSES.length + 2, empty: "No jobs yet.",
        attrs: (t) => ({"data-testid": "type-row", "data-job-type": t}),
        cells: (t) => {
          const c = stats.by_type[t];
          const total = Object.values(c).reduce((a, b) => a + b, 0);
          return [html`<a href="#/jobs?job_type=${encodeURIComponent(t)}">${t}</a>`,
            ...STATUSES.map((s) => num(c[s] || 0)), {html: String(total), cls: "num"}];
        },
      });
      setHTML($("[data-testid=throughput-chart]", el), throughputChart(stats.throughput || []));
      patchRows($("[data-testid=recent-table] tbody", el), stats.recent || [], {
        key: (j) => j.job_id, cols: 7, empty: "No jobs yet: submit one.",
        attrs: (j) => ({"data-testid": "recent-row", "data-job-id": j.job_id,
          "data-status": j.status}),
        cells: (j) => [jobLink(j.job_id), {html: html`${j.job_type}`, cls: "nowrap"},
          badge(j.status, "recent-status"), num(j.attempts), timeCell(j.created_at),
          timeCell(j.updated_at), {html: html`<span title="${j.error_message || ""}">${
            j.error_message || ""}</span>`, cls: "err"}],
      });
    };
    const p = poller(update, REFRESH_MS);
    return {stop: p.stop, refresh: p.now,
      actions: {cancel: (btn) => cancelJob(btn, noticeEl, () => p.now())}};
  }

  /** Grouped bars (completed, failed) per minute for the last 15 minutes, as inline SVG. */
  function throughputChart(points) {
    const W = 560; const H = 210; const L = 34; const R = 8; const T = 10; const B = 26;
    const end = Math.floor(serverNow() / 60000);
    const slots = [];
    const byMinute = new Map(points.map((p) => [Math.floor(Date.parse(p.minute) / 60000), p]));
    for (let m = end - 14; m <= end; m++) {
      const p = byMinute.get(m) || {};
      slots.push({minute: m, completed: p.completed || 0, failed: p.failed || 0});
    }
    const peak = Math.max(0, ...slots.map((s) => Math.max(s.completed, s.failed)));
    const niceMax = (v) => {
      if (v <= 4) return 4;
      const mag = 10 ** Math.floor(Math.log10(v));
      return [1, 2, 2.5, 5, 10].map((f) => f * mag).find((c) => c >= v) || 10 * mag;
    };
    const max = niceMax(peak);
    const plotW = W - L - R; const plotH = H - T - B;
    const y = (v) => T + plotH - (v / max) * plotH;
    const slotW = plotW / slots.length;
    const barW = Math.max(2, (slotW - 6) / 2);
    const totals = slots.reduce((a, s) => [a[0] + s.completed, a[1] + s.failed], [0, 0]);
    const ticks = [0, max / 2, max];
    const fmtTick = (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1));
    const label = (m) => hhmm(new Date(m * 60000));
    const parts = [];
    for (const t of ticks) {
      parts.push(html`<line class="${t ? "gridline" : "axis"}" x1="${L}" x2="${W - R}"
        y1="${y(t)}" y2="${y(t)}"/><text x="${L - 6}" y="${y(t) + 4}"
        text-anchor="end">${fmtTick(t)}</text>`);
    }
    slots.forEach((s, i) => {
      const x = L + i * slotW + 3;
      const tip = `${label(s.minute)}: ${s.completed} completed, ${s.failed} failed`;
      for (const [kind, v, dx] of [["completed", s.completed, 0], ["failed", s.failed, barW]]) {
        if (!v) continue;
        parts.push(html`<rect class="bar-${kind}" x="${(x + dx).toFixed(1)}"
          y="${y(v).toFixed(1)}" width="${barW.toFixed(1)}"
          height="${(T + plotH - y(v)).toFixed(1)}" rx="1.5"><title>${tip}</title></rect>`);
      }
      if (i % 5 === 0 || i === slots.length - 1) {
        parts.push(html`<text x="${(L + i * slotW + slotW / 2).toFixed(1)}" y="${H - 8}"
          text-anchor="middle">${i === slots.length - 1 ? "now" : label(s.minute)}</text>`);
      }
    });
    if (!peak) {
      parts.push(html`<text x="${L + plotW / 2}" y="${T + plotH / 2}" text-anchor="middle">no
        attempt finished in the last 15 minutes</text>`);
    }
    const desc = `${totals[0]} completed and ${totals[1]} failed attempts in the last 15 minutes`;
    return html`<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="Throughput chart: ${desc}"
      data-completed="${totals[0]}" data-failed="${totals[1]}">${parts}</svg>`;
  }

  // ---------------------------------------------------------------- jobs list
  function jobsView(query) {
    const status = query.get("status") || "";
    const jobType = query.get("job_type") || "";
    const el = render("Jobs", html`
      <h1>Jobs</h1>
      <form class="filters" data-testid="jobs-filters">
        <div class="field"><label for="flt-status">Status</label>
          <select id="flt-status" name="status"><option value="">Any</option>
          ${STATUSES.map((s) => html`<option value="${s}" ${s === status ? raw("selected") : ""}>${
            LABELS[s]}</option>`)}</select></div>
        <div class="field"><label for="flt-type">Type</label>
          <select id="flt-type" name="job_type"><option value="">Any</option>
          ${jobType ? html`<option value="${jobType}" selected>${jobType}</option>` : ""}</select></div>
        <button type="button" data-action="refresh">Refresh</button>
      </form>
      <div class="notice" role="status" aria-live="polite" data-testid="jobs-notice"></div>
      <section class="panel">
        <div class="table-wrap"><table data-testid="jobs-table">
          <thead><tr><th scope="col">Job</th><th scope="col">Type</th><th scope="col">Status</th>
            <th scope="col" class="num">Attempts</th><th scope="col">Created</th>
            <th scope="col">Updated</th><th scope="col">Error</th></tr></thead>
          <tbody></tbody></table></div>
        <p class="more" hidden><button type="button" data-action="more"
          data-testid="jobs-more">Load more</button></p>
      </section>`);
    const noticeEl = $("[data-testid=jobs-notice]", el);
    const typeSelect = $("#flt-type", el);
    jobTypes().then((types) => {
      for (const t of types) {
        if (t.name === jobType) continue;
        typeSelect.insertAdjacentHTML("beforeend", html`<option value="${t.name}">${t.name}</option>`.s);
      }
    }).catch(() => {});
    const go = () => {
      const q = new URLSearchParams();
      if ($("#flt-status", el).value) q.set("status", $("#flt-status", el).value);
      if (typeSelect.value) q.set("job_type", typeSelect.value);
      location.hash = `#/jobs${q.toString() ? `?${q}` : ""}`;
    };
    $("#flt-status", el).addEventListener("change", go);
    typeSelect.addEventListener("change", go);
    let items = [];
    let cursor = null;
    let stopped = false;
    const load = async (more) => {
      const q = new URLSearchParams({limit: "50"});
      if (status) q.set("status", status);
      if (jobType) q.set("job_type", jobType);
      if (more && cursor) q.set("cursor", cursor);
      try {
        const page = await api(`/jobs?${q}`);
        if (stopped) return;
        items = more ? items.concat(page.items) : page.items;
        cursor = page.next_cursor;
        setHTML(noticeEl, "");
        noticeEl.className = "notice";
      } catch (err) {
        notice(noticeEl, "error", problemHTML(err));
      }
      patchRows($("tbody", el), items, {
        key: (j) => j.job_id, cols: 7, empty: "No jobs match.",
        attrs: (j) => ({"data-testid": "jobs-row", "data-job-id": j.job_id}),
        cells: (j) => [jobLink(j.job_id), {html: html`${j.job_type}`, cls: "nowrap"},
          badge(j.status), num(j.attempts), timeCell(j.created_at), timeCell(j.updated_at),
          {html: html`<span title="${j.error_message || ""}">${j.error_message || ""}</span>`,
            cls: "err"}],
      });
      $(".more", el).hidden = !cursor;
    };
    load(false);
    return {stop() { stopped = true; }, refresh() { load(false); },
      actions: {refresh: () => load(false), more: () => load(true)}};
  }

  // ---------------------------------------------------------------- one job
  let flash = null;  // a notice carried to the next page (after submit)
  function jobView(id) {
    const el = render(`Job ${shortId(id)}`, html`
      <p class="crumbs"><a href="#/jobs">Jobs</a> / <span data-testid="job-crumb-type"></span></p>
      <h1><span class="mono" data-testid="job-id">${id}</span>
        <span data-testid="job-status-wrap"></span>
        ${can(SCOPE.OPERATE) ? html`<span class="actions">
          <button type="button" class="danger" data-action="cancel" data-job-id="${id}"
            data-testid="job-cancel" hidden>Cancel job</button>
          <button type="button" class="primary" data-action="replay" data-job-id="${id}"
            data-testid="job-replay" hidden>Replay</button>
        </span>` : ""}</h1>
      <div class="notice" role="status" aria-live="polite" data-testid="job-notice"></div>
      <div class="grid halves" data-testid="job-body" hidden>
        <section class="panel" aria-labelledby="facts-h"><h2 id="facts-h">Details</h2>
          <dl class="facts" data-testid="job-facts"></dl></section>
        <section class="panel" aria-labelledby="payload-h"><h2 id="payload-h">Payload</h2>
          <pre class="json" data-testid="job-payload"></pre></section>
        <section class="panel" aria-labelledby="result-h">
          <div class="panel-head"><h2 id="result-h">Result</h2>
            <span data-testid="artifact-wrap"></span></div>
          <pre class="json" data-testid="job-result"></pre></section>
        <section class="panel" aria-labelledby="error-h"><h2 id="error-h">Error</h2>
          <pre class="json error" data-testid="job-error"></pre></section>
      </div>
      <section class="panel" aria-labelledby="att-h" data-testid="job-attempts-panel" hidden>
        <div class="panel-head"><h2 id="att-h">Attempts</h2></div>
        <div class="table-wrap"><table data-testid="attempts-table">
          <thead><tr><th scope="col" class="num">#</th><th scope="col">Started</th>
            <th scope="col">Finished</th><th scope="col" class="num">Duration</th>
            <th scope="col">Outcome</th><th scope="col">Error</th></tr></thead>
          <tbody></tbody></table></div>
      </section>
      <section class="panel" aria-labelledby="deps-h" data-testid="job-dependents-panel" hidden>
        <div class="panel-head"><h2 id="deps-h">Dependents</h2>
          ${can(SCOPE.OPERATE) ? html`<button type="button" data-action="replayAll"
            data-testid="job-replay-with-dependents" hidden>Replay with dependents</button>` : ""}
        </div>
        <div class="table-wrap"><table data-testid="dependents-table">
          <thead><tr><th scope="col">Job</th><th scope="col">Type</th><th scope="col">Status</th>
            <th scope="col">Error</th></tr></thead><tbody></tbody></table></div>
      </section>
      <section class="panel" aria-labelledby="cb-h" data-testid="job-callbacks-panel" hidden>
        <div class="panel-head"><h2 id="cb-h">Callbacks</h2></div>
        <div class="table-wrap"><table data-testid="callbacks-table">
          <thead><tr><th scope="col">Event</th><th scope="col">State</th>
            <th scope="col" class="num">Try</th><th scope="col">At</th><th scope="col">Answer</th>
            </tr></thead><tbody></tbody></table></div>
      </section>`);
    const noticeEl = $("[data-testid=job-notice]", el);
    let relationsOf = null;  // the version whose dependents and callbacks are shown
    const loadRelations = async (doc) => {
      const [deps, calls] = await Promise.all([
        api(`/jobs/${encodeURIComponent(id)}/dependents`),
        doc.callback_url ? api(`/jobs/${encodeURIComponent(id)}/callbacks`) : {items: []}]);
      const depItems = deps.items || [];
      $("[data-testid=job-dependents-panel]", el).hidden = !depItems.length;
      const replayAll = $("[data-testid=job-replay-with-dependents]", el);
      if (replayAll) {
        replayAll.hidden = doc.status !== "DEAD_LETTER"
          || !depItems.some((d) => d.cancelled_by === doc.job_id);
      }
      patchRows($("[data-testid=dependents-table] tbody", el), depItems, {
        key: (d) => d.job_id, cols: 4, empty: "",
        attrs: (d) => ({"data-testid": "dependent-row", "data-status": d.status}),
        cells: (d) => [html`<a class="mono" href="#/jobs/${d.job_id}">${shortId(d.job_id)}</a>`,
          d.job_type, badge(d.status), {html: html`${d.error_message || ""}`, cls: "err"}],
      });
      const tries = [];
      for (const c of calls.items || []) {
        for (const a of (c.attempts.length ? c.attempts : [{}])) tries.push({c, a});
      }
      $("[data-testid=job-callbacks-panel]", el).hidden = !tries.length;
      patchRows($("[data-testid=callbacks-table] tbody", el), tries, {
        key: ({c, a}) => `${c.callback_id}/${a.attempt || 0}`, cols: 5, empty: "",
        attrs: ({c}) => ({"data-testid": "callback-row", "data-state": c.state}),
        cells: ({c, a}) => [c.event_type, c.state, num(a.attempt || 0),
          a.started_at ? when(a.started_at) : "–",
          a.error || (a.status_code ? String(a.status_code) : "–")],
      });
    };
    if (flash) { notice(noticeEl, flash.kind, flash.content); flash = null; }
    // The page follows the job's event stream; it polls only if the stream cannot be opened
    // or breaks before the job ends. `run` counts restarts (cancel, replay): a follower of
    // an earlier run stops quietly.
    let p = null;
    let stream = null;
    let run = 0;
    let stopped = false;
    let shown = null;  // the document on the page, and its attempts
    let shownAttempts = [];
    const attemptsOf = async () =>
      (await api(`/jobs/${encodeURIComponent(id)}/attempts`)).items || [];
    const display = (doc, attempts) => {
      if (stopped || (shown && doc.version < shown.version)) return;
      shown = doc;
      shownAttempts = attempts;
      show(doc, attempts);
    };
    const update = async () => {  // the whole page, read now
      let doc;
      let attempts;
      try {
        // The attempts after the document, never side by side: read first, they could
        // predate a job that then finished, and a finished job is not read again.
        doc = await api(`/jobs/${encodeURIComponent(id)}`);
        attempts = await attemptsOf();
      } catch (err) {
        if (err.status === 404 || err.status === 400) {
          notice(noticeEl, "error", problemHTML(err));
          if (p) p.stop();
        }
        throw err;
      }
      display(doc, attempts);
      if (p && TERMINAL.has(doc.status)) p.stop();
    };
    const onDoc = async (doc) => {  // one event: the attempts too when they may have changed
      if (shown && doc.version <= shown.version) return;
      const moved = !shown || doc.status !== shown.status || doc.attempts !== shown.attempts;
      display(doc, moved ? await attemptsOf() : shownAttempts);
    };
    const follow = async () => {
      const mine = ++run;
      if (p) { p.stop(); p = null; }
      if (stream) stream.abort();
      stream = new AbortController();
      try {
        await update();
      } catch (err) {
        if (err.status === 404 || err.status === 400) return;
      }
      if (stopped || mine !== run || (shown && TERMINAL.has(shown.status))) return;
      const before = shown && shown.version;
      try {
        await jobEvents(id, onDoc, stream.signal);
      } catch (err) {
        if (err.name === "AbortError" || err.status === 401) return;
      }
      if (stopped || mine !== run || (shown && TERMINAL.has(shown.status))) return;
      // Cut before the end (a proxy's time limit, a gateway restart): open it again if it
      // brought news, else poll.
      if (shown && shown.version !== before) follow();
      else p = poller(update, JOB_REFRESH_MS);
    };
    const show = (doc, attempts) => {
      document.title = `${doc.job_type} ${shortId(doc.job_id)} (${doc.status}) · Jobs`;
      setHTML($("[data-testid=job-status-wrap]", el), badge(doc.status, "job-status"));
      const cancelBtn = $("[data-testid=job-cancel]", el);
      if (cancelBtn) cancelBtn.hidden = !CANCELLABLE.has(doc.status) || doc.cancel_requested;
      const replayBtn = $("[data-testid=job-replay]", el);
      if (replayBtn) replayBtn.hidden = doc.status !== "DEAD_LETTER";
      $("[data-testid=job-body]", el).hidden = false;
      $("[data-testid=job-attempts-panel]", el).hidden = false;
      const facts = [
        ["Type", html`<a href="#/jobs?job_type=${encodeURIComponent(doc.job_type)}">${doc.job_type}</a>`],
        ["Submitted by", doc.submitted_by
          ? html`<span data-testid="job-submitted-by">${doc.submitted_by}</span>`
          : html`<span class="muted" data-testid="job-submitted-by"
              title="submitted before tokens were required">–</span>`],
        ["Status", html`${LABELS[doc.status] || doc.status}${doc.cancel_requested
          && !TERMINAL.has(doc.status) ? " · cancel requested" : ""}`],
        ["Attempts", html`<span data-testid="job-attempts">${doc.attempts}</span>`],
        ["Retries", `${doc.retries} of ${doc.max_retries}`],
        ["Progress", doc.status === "IN_PROGRESS" || doc.progress !== null
          ? progressBar(doc.progress, doc.progress_message) : html`<span class="muted">–</span>`],
        ["Created", html`${when(doc.created_at)} <span class="muted">(${ago(doc.created_at)})</span>`],
        ["Updated", html`${when(doc.updated_at)} <span class="muted">(${ago(doc.updated_at)})</span>`],
      ];
      if (doc.run_at) facts.push(["Run at", when(doc.run_at)]);
      if (doc.next_attempt_at) facts.push(["Next attempt", when(doc.next_attempt_at)]);
      if (doc.depends_on && doc.depends_on.length) {
        facts.push(["Depends on", html`<span data-testid="job-parents">${doc.depends_on.map(
          (p) => html`<a class="mono" href="#/jobs/${p}" data-testid="job-parent">${shortId(p)}</a> `)}</span>`]);
      }
      if (doc.cancelled_by) {
        facts.push(["Cancelled by", html`<a class="mono" href="#/jobs/${doc.cancelled_by}"
          data-testid="job-cancelled-by">${shortId(doc.cancelled_by)}</a>
          <span class="muted">(a parent that did not complete)</span>`]);
      }
      if (doc.callback_url) facts.push(["Callback", html`<span class="mono">${doc.callback_url}</span>`]);
      facts.push(["Version", String(doc.version)]);
      setHTML($("[data-testid=job-facts]", el), facts.map(([k, v]) => html`<dt>${k}</dt><dd>${v}</dd>`));
      setText($("[data-testid=job-payload]", el), pretty(doc.payload));
      setText($("[data-testid=job-result]", el), doc.result === null ? "none" : pretty(doc.result));
      $("[data-testid=job-result]", el).classList.toggle("none", doc.result === null);
      setText($("[data-testid=job-error]", el), doc.error_message || "none");
      $("[data-testid=job-error]", el).classList.toggle("none", !doc.error_message);
      setHTML($("[data-testid=job-crumb-type]", el), html`<a href="#/jobs?job_type=${
        encodeURIComponent(doc.job_type)}">${doc.job_type}</a>`);
      const artifact = doc.result && typeof doc.result === "object" && doc.result.artifact;
      setHTML($("[data-testid=artifact-wrap]", el), artifact && doc.status === "COMPLETED"
        ? html`<button type="button" data-action="download" data-testid="artifact-download"
            >Download ${artifact}</button>` : "");
      if (doc.version !== relationsOf) {  // dependents and callbacks change with the job
        relationsOf = doc.version;
        loadRelations(doc).catch(() => {});
      }
      patchRows($("[data-testid=attempts-table] tbody", el), attempts, {
        key: (a) => a.attempt, cols: 6, empty: "Not started yet.",
        attrs: (a) => ({"data-testid": "attempt-row", "data-outcome": a.outcome || "RUNNING"}),
        cells: (a) => [num(a.attempt), html`<span title="${a.started_at}">${when(a.started_at)}</span>`,
          a.finished_at ? html`<span title="${a.finished_at}">${when(a.finished_at)}</span>`
            : html`<span class="muted">running…</span>`,
          {html: duration(a.started_at, a.finished_at), cls: "num"},
          a.outcome ? badge(a.outcome) : badge("IN_PROGRESS"),
          {html: html`<span title="${a.error || ""}">${a.error || ""}</span>`, cls: "err"}],
      });
    };
    follow();
    const restart = () => { follow(); };
    return {
      stop() {
        stopped = true;
        if (p) p.stop();
        if (stream) stream.abort();
      },
      refresh() { if (p) p.now(); },
      actions: {
        cancel: (btn) => cancelJob(btn, noticeEl, () => { btn.disabled = false; restart(); }),
        download: async (btn) => {
          btn.disabled = true;
          try {
            await download(`/jobs/${encodeURIComponent(id)}/artifact`, id);
          } catch (err) {
            notice(noticeEl, "error", problemHTML(err));
          }
          btn.disabled = false;
        },
        replayAll: async (btn) => {
          btn.disabled = true;
          try {
            const doc = await api(`/jobs/${encodeURIComponent(id)}/retry?with_dependents=true`,
              {method: "POST"});
            notice(noticeEl, "ok", html`Replayed: the job is ${badge(doc.status)} again, and
              the jobs its failure cancelled wait for it again.`);
          } catch (err) {
            notice(noticeEl, "error", problemHTML(err));
          }
          btn.disabled = false;
          relationsOf = null;
          restart();
        },
        replay: async (btn) => {
          btn.disabled = true;
          try {
            const doc = await api(`/jobs/${encodeURIComponent(id)}/retry`, {method: "POST"});
            notice(noticeEl, "ok", html`Replayed: the job is ${badge(doc.status)} again with a
              fresh retry budget.`);
          } catch (err) {
            notice(noticeEl, "error", problemHTML(err));
          }
          btn.disabled = false;
          restart();
        },
      },
    };
  }

  // ---------------------------------------------------------------- dead letters
  const watched = new Map();  // job id -> {trail: [status...], attempts, type}
  function deadLettersView() {
    const operate = can(SCOPE.OPERATE);
    const el = render("Dead letters", html`
      <h1>Dead letters <span class="hint">jobs that kept failing${operate ? "; Replay sends one"
        + " back to QUEUED with a fresh retry budget" : ""}</span></h1>
      <ul class="notice" role="status" aria-live="polite" data-testid="dl-replays"
        style="list-style:none"></ul>
      <div class="notice" role="alert" data-testid="dl-error"></div>
      <section class="panel">
        <div class="table-wrap"><table data-testid="dl-table">
          <thead><tr><th scope="col">Dead-lettered</th><th scope="col">Job</th>
            <th scope="col">Type</th><th scope="col">Reason</th><th scope="col">Last error</th>
            <th scope="col" class="num">Attempts</th><th scope="col">${
              operate ? "Replay" : "Replayed"}</th></tr></thead>
          <tbody></tbody></table></div>
        <p class="more" hidden><button type="button" data-action="more"
          data-testid="dl-more">Load more</button></p>
      </section>`);
    const errorEl = $("[data-testid=dl-error]", el);
    let first = [];
    let older = [];
    let cursor = null;
    let stopped = false;
    const draw = () => {
      const seen = new Set();
      const items = first.concat(older).filter((d) => !seen.has(d.dead_letter_id)
        && seen.add(d.dead_letter_id));
      patchRows($("tbody", el), items, {
        key: (d) => d.dead_letter_id, cols: 7, empty: "No dead letters. Everything got done.",
        attrs: (d) => ({"data-testid": "dl-row", "data-job-id": d.job_id || "",
          "data-dead-letter-id": d.dead_letter_id, "data-replayed": d.replayed_at ? "true" : "false"}),
        cells: (d) => {
          const w = d.job_id && watched.get(d.job_id);
          const now = w ? w.trail[w.trail.length - 1] : null;
          let action;
          if (!d.job_id) action = html`<span class="muted">no job</span>`;
          else if (!d.replayed_at && !operate) action = "";
          else if (!d.replayed_at) {
            action = html`<button type="button" class="small primary" data-action="replay"
              data-job-id="${d.job_id}" data-testid="dl-replay"
              aria-label="Replay job ${shortId(d.job_id)} (${d.job_type || ""})">Replay</button>`;
          } else {
            action = html`<span class="muted" title="${d.replayed_at}">replayed ${
              ago(d.replayed_at)}</span> ${now ? badge(now, "dl-job-status") : ""}`;
          }
          return [timeCell(d.dead_lettered_at),
            d.job_id ? jobLink(d.job_id) : html`<span class="muted">–</span>`,
            {html: html`${d.job_type || ""}`, cls: "nowrap"}, html`${d.reason}`,
            {html: html`<span title="${d.last_error || ""}">${d.last_error || ""}</span>`, cls: "err"},
            {html: html`<span data-testid="dl-attempts">${d.attempts}</span>`, cls: "num"},
            {html: action, cls: "nowrap"}];
        },
      });
      $(".more", el).hidden = !cursor;
      setHTML($("[data-testid=dl-replays]", el), [...watched.entries()].map(([id, w]) => html`
        <li data-testid="dl-replay-trail" data-job-id="${id}" data-status="${w.trail[w.trail.length - 1]}">
          Replayed job ${jobLink(id, "trail-job-link")} (${w.type}):
          ${w.trail.map((s, i) => html`${i ? " → " : ""}${badge(s)}`)}
          ${w.attempts !== null ? html` <span class="muted">· ${w.attempts} attempts</span>` : ""}
        </li>`));
      $("[data-testid=dl-replays]", el).hidden = watched.size === 0;
    };
    const update = async () => {
      const page = await api("/dead-letters?limit=50");
      if (stopped) return;
      first = page.items;
      if (!older.length) cursor = page.next_cursor;
      // follow replayed jobs until they end again
      await Promise.all([...watched.entries()].map(async ([id, w]) => {
        const last = w.trail[w.trail.length - 1];
        if (TERMINAL.has(last) && w.done) return;
        try {
          const doc = await api(`/jobs/${encodeURIComponent(id)}`);
          if (doc.status !== last) w.trail.push(doc.status);
          w.attempts = doc.attempts;
          w.done = TERMINAL.has(doc.status);
        } catch (err) { /* shown by the connection indicator */ }
      }));
      if (!stopped) draw();
    };
    const p = poller(update, REFRESH_MS);
    return {
      stop() { stopped = true; p.stop(); },
      refresh: p.now,
      actions: {
        replay: async (btn) => {
          const id = btn.dataset.jobId;
          btn.disabled = true;
          try {
            const doc = await api(`/jobs/${encodeURIComponent(id)}/retry`, {method: "POST"});
            watched.set(id, {trail: [doc.status], attempts: doc.attempts, type: doc.job_type,
              done: false});
            errorEl.className = "notice";
            setHTML(errorEl, "");
            draw();
          } catch (err) {
            btn.disabled = false;
            notice(errorEl, "error", problemHTML(err));
          }
          p.now();
        },
        more: async () => {
          try {
            const page = await api(`/dead-letters?limit=50&cursor=${encodeURIComponent(cursor)}`);
            older = older.concat(page.items);
            cursor = page.next_cursor;
            draw();
          } catch (err) {
            notice(errorEl, "error", problemHTML(err));
          }
        },
      },
    };
  }

  // ---------------------------------------------------------------- schedules
  const scheduleWhen = (d) => (d.every_seconds !== null && d.every_seconds !== undefined
    ? html`every ${d.every_seconds} s`
    : html`<code>${d.cron}</code> <span class="muted">${d.timezone || "UTC"}</span>`);
  function schedulesView() {
    const operate = can(SCOPE.OPERATE);
    const submit = can(SCOPE.SUBMIT);
    const el = render("Schedules", html`
      <h1>Schedules <span class="hint">a job on every tick of a cron expression (in its time
        zone) or every N seconds; missed ticks make one job</span></h1>
      <div class="notice" role="status" aria-live="polite" data-testid="schedules-notice"></div>
      <section class="panel" style="margin-bottom:16px">
        <div class="table-wrap"><table data-testid="schedules-table">
          <thead><tr><th scope="col">Name</th><th scope="col">Type</th><th scope="col">When</th>
            <th scope="col">Next run</th><th scope="col">Last run</th><th scope="col">Last job</th>
            <th scope="col">State</th>
            ${operate ? html`<th scope="col"><span class="sr-only">Actions</span></th>` : ""}
            </tr></thead>
          <tbody></tbody></table></div>
      </section>
      ${submit ? html`<form class="panel" data-testid="schedule-form" novalidate
        aria-labelledby="new-schedule-h"><h2 id="new-schedule-h">New schedule</h2>
        <div class="grid halves">
          <div>
            <div class="field"><label for="s-name">Name</label>
              <input id="s-name" name="name" required data-testid="schedule-name"
                placeholder="nightly-report"></div>
            <div class="field"><label for="s-type">Job type</label>
              <select id="s-type" name="job_type" data-testid="schedule-type"></select></div>
            <div class="field"><label for="s-cron">Cron <span class="hint">(five fields; or
              every)</span></label>
              <input id="s-cron" name="cron" class="mono" data-testid="schedule-cron"
                placeholder="30 2 * * MON-FRI"></div>
            <div class="field"><label for="s-zone">Time zone <span class="hint">(IANA name, with
              cron; default UTC)</span></label>
              <input id="s-zone" name="timezone" data-testid="schedule-timezone"
                placeholder="${localZone()}"></div>
            <div class="field"><label for="s-every">Every <span class="hint">(seconds; or
              cron)</span></label>
              <input id="s-every" name="every_seconds" type="number" min="1" inputmode="numeric"
                data-testid="schedule-every" style="width:10em"></div>
          </div>
          <div class="field"><label for="s-payload">Payload (JSON)</label>
            <textarea id="s-payload" name="payload" class="mono" spellcheck="false"
              data-testid="schedule-payload">{}</textarea></div>
        </div>
        <div class="notice error" role="alert" data-testid="schedule-error"></div>
        <div class="actions"><button type="submit" class="primary"
          data-testid="schedule-create">Create schedule</button></div>
      </form>` : ""}`);
    const noticeEl = $("[data-testid=schedules-notice]", el);
    let stopped = false;
    const update = async () => {
      const page = await api("/schedules?limit=200");
      if (stopped) return;
      patchRows($("tbody", el), page.items, {
        key: (d) => d.schedule_id, cols: operate ? 8 : 7, empty: "No schedules yet.",
        attrs: (d) => ({"data-testid": "schedule-row", "data-name": d.name,
          "data-paused": d.paused ? "true" : "false"}),
        cells: (d) => [{html: html`<strong>${d.name}</strong>`, cls: "nowrap"},
          {html: html`${d.job_type}`, cls: "nowrap"}, scheduleWhen(d),
          d.next_run_at ? html`<time datetime="${d.next_run_at}" title="${d.next_run_at}"
            data-testid="schedule-next-run">${when(d.next_run_at)} <span class="muted">(${
            until(d.next_run_at)})</span></time>` : html`<span class="muted">–</span>`,
          timeCell(d.last_run_at),
          d.last_job_id ? jobLink(d.last_job_id, "schedule-last-job") : html`<span
            class="muted">–</span>`,
          d.paused ? html`<span class="badge" data-status="CANCELLED" data-testid="schedule-paused"
            title="${d.paused_reason || ""}">paused</span>`
            : html`<span class="badge" data-status="COMPLETED">active</span>`,
          ...(!operate ? [] : [{cls: "nowrap", html: html`<button type="button" class="small"
            data-action="${d.paused ? "resume" : "pause"}" data-name="${d.name}"
            data-testid="schedule-${d.paused ? "resume" : "pause"}">${
            d.paused ? "Resume" : "Pause"}</button> <button type="button" class="small danger"
            data-action="remove" data-name="${d.name}" data-testid="schedule-delete"
            aria-label="Delete schedule ${d.name}">Delete</button>`}])],
      });
    };
    const p = poller(update, REFRESH_MS);
    const call = async (btn, method, suffix, done) => {
      btn.disabled = true;
      try {
        await api(`/schedules/${encodeURIComponent(btn.dataset.name)}${suffix}`, {method});
        notice(noticeEl, "ok", html`Schedule <strong>${btn.dataset.name}</strong> ${done}.`);
      } catch (err) {
        notice(noticeEl, "error", problemHTML(err));
      }
      btn.disabled = false;
      p.now();
    };
    if (submit) {
      const form = $("[data-testid=schedule-form]", el);
      const errorEl = $("[data-testid=schedule-error]", el);
      jobTypes().then((types) => {
        $("#s-type", el).innerHTML = types.map((t) => html`<option value="${t.name}">${
          t.name}</option>`.s).join("");
      }).catch((err) => notice(errorEl, "error", problemHTML(err)));
      form.addEventListener("submit", async (e) => {
        e.preventDefault();
        let payload;
        try {
          payload = JSON.parse($("#s-payload", el).value || "{}");
        } catch (err) {
          notice(errorEl, "error", html`The payload is not valid JSON: ${err.message}`);
          return;
        }
        const body = {name: $("#s-name", el).value.trim(), job_type: $("#s-type", el).value,
          payload};
        const cron = $("#s-cron", el).value.trim();
        const zone = $("#s-zone", el).value.trim();
        const every = $("#s-every", el).value.trim();
        if (cron) body.cron = cron;
        if (zone) body.timezone = zone;
        if (every) body.every_seconds = Number(every);
        try {
          const doc = await api("/schedules", {method: "POST", body});
          errorEl.className = "notice error";
          setHTML(errorEl, "");
          form.reset();
          $("#s-payload", el).value = "{}";
          notice(noticeEl, "ok", html`Created schedule <strong>${doc.name}</strong>; next run ${
            when(doc.next_run_at)}.`);
          p.now();
        } catch (err) {
          notice(errorEl, "error", problemHTML(err));
        }
      });
    }
    return {
      stop() { stopped = true; p.stop(); },
      refresh: p.now,
      actions: {
        pause: (btn) => call(btn, "POST", "/pause", "paused"),
        resume: (btn) => call(btn, "POST", "/resume", "resumed"),
        remove: (btn) => {
          // two clicks: the first only asks
          if (btn.dataset.armed !== "true") {
            btn.dataset.armed = "true";
            btn.textContent = "Confirm delete";
            return;
          }
          call(btn, "DELETE", "", "deleted");
        },
      },
    };
  }

  // ---------------------------------------------------------------- submit
  function submitView(query) {
    const el = render("Submit a job", html`
      <h1>Submit a job</h1>
      <div class="grid two">
        <form class="panel" data-testid="submit-form" novalidate>
          <div class="field"><label for="f-type">Job type</label>
            <select id="f-type" name="job_type" data-testid="submit-type" required
              aria-describedby="f-type-desc"><option value="">loading…</option></select>
            <span class="hint" id="f-type-desc" data-testid="submit-type-description"></span></div>
          <div class="field"><label for="f-payload">Payload (JSON)</label>
            <textarea id="f-payload" name="payload" data-testid="submit-payload" spellcheck="false"
              aria-describedby="f-payload-hint" class="mono"></textarea>
            <span class="hint" id="f-payload-hint">Prefilled with the type's example; the server
              checks it against the type's payload model.</span></div>
          <div class="field"><label for="f-retries">Max retries <span class="hint">(optional,
            0-100)</span></label>
            <input id="f-retries" name="max_retries" type="number" min="0" max="100" inputmode="numeric"
              data-testid="submit-max-retries" style="width:8em"></div>
          <div class="field"><label for="f-run-at">Run at <span class="hint">(optional)</span></label>
            <input id="f-run-at" name="run_at" type="datetime-local" step="1"
              aria-describedby="f-run-at-hint" data-testid="submit-run-at">
            <span class="hint" id="f-run-at-hint">The job waits until then. Your local time
              (${localZone()}); sent with this browser's UTC offset.</span></div>
          <div class="notice error" role="alert" data-testid="submit-error"></div>
          <div class="actions"><button type="submit" class="primary"
            data-testid="submit-button">Submit job</button></div>
        </form>
        <section class="panel" aria-labelledby="schema-h"><h2 id="schema-h">Payload fields</h2>
          <div data-testid="submit-schema" class="table-wrap"></div></section>
      </div>`);
    const select = $("#f-type", el);
    const textarea = $("#f-payload", el);
    const errorEl = $("[data-testid=submit-error]", el);
    let types = [];
    const chosen = () => types.find((t) => t.name === select.value);
    const clearError = () => { errorEl.className = "notice error"; setHTML(errorEl, ""); };
    const describe = () => {
      const t = chosen();
      setText($("#f-type-desc", el), t ? t.description : "");
      if (!t) return;
      textarea.value = pretty(examplePayload(t));
      const props = t.payload.properties;
      const required = new Set(t.payload.required || []);
      setHTML($("[data-testid=submit-schema]", el), props ? html`<table><thead><tr>
          <th scope="col">Field</th><th scope="col">Type</th><th scope="col">Required</th>
          <th scope="col">Description</th></tr></thead><tbody>${Object.entries(props).sort(
          ([a], [b]) => (required.has(b) - required.has(a)) || a.localeCompare(b)).map(([k, v]) => {
          const r = t.resolve(v);
          return html`<tr><td><code>${k}</code></td><td>${typeName(v)}</td><td>${
            required.has(k) ? "yes" : "no"}</td><td>${r.description || ""}</td></tr>`;
        })}</tbody></table>`
        : html`<p class="muted">${t.payload.description || "Free-form payload"}: any JSON object.</p>`);
    };
    jobTypes().then((list) => {
      types = list;
      const want = query.get("type");
      select.innerHTML = list.map((t) => html`<option value="${t.name}" ${
        t.name === want ? raw("selected") : ""}>${t.name}</option>`.s).join("");
      describe();
    }).catch((err) => notice(errorEl, "error", problemHTML(err)));
    select.addEventListener("change", () => { clearError(); describe(); });
    textarea.addEventListener("input", clearError);
    $("#f-run-at", el).addEventListener("input", clearError);
    $("form", el).addEventListener("submit", async (e) => {
      e.preventDefault();
      const btn = $("[data-testid=submit-button]", el);
      let payload;
      try {
        payload = JSON.parse(textarea.value || "{}");
      } catch (err) {
        notice(errorEl, "error", html`The payload is not valid JSON: ${err.message}`);
        textarea.focus();
        return;
      }
      const body = {job_type: select.value, payload};
      const retries = $("#f-retries", el).value.trim();
      if (retries !== "") body.max_retries = Number(retries);
      const runAt = $("#f-run-at", el);
      if (runAt.validity.badInput) {
        notice(errorEl, "error", "Run at is incomplete: give a full date and time, or clear it.");
        runAt.focus();
        return;
      }
      if (runAt.value) body.run_at = localISO(runAt.value);
      btn.disabled = true;
      try {
        const doc = await api("/jobs", {method: "POST", body});
        flash = {kind: "ok", content: html`Submitted: job ${doc.job_id} is ${badge(doc.status)}.`};
        location.hash = `#/jobs/${doc.job_id}`;
      } catch (err) {
        notice(errorEl, "error", problemHTML(err));
        btn.disabled = false;
      }
    });
    return {stop() {}};
  }

  function notFoundView(path) {
    render("Not found", html`<h1>Not found</h1><p>No page at <code>${path}</code>.
      <a href="#/">Back to the overview</a>.</p>`);
    return {stop() {}};
  }

  window.addEventListener("hashchange", route);
  const start = () => {
    $("[data-testid=sign-out]").addEventListener("click", () => endSession(null));
    showIdentity();
    route();
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
