// The tensorlet operator dashboard: one page, no framework, no build step.
//
// Everything it shows comes from the node's admin API (/v1/admin/…) and /metrics, with the
// admin token the operator typed (kept in this tab's sessionStorage). App names, log lines and
// error messages are hostile input: the DOM is built with createElement and textContent only,
// never from HTML strings, and the page runs under a CSP without inline scripts or styles.
"use strict";

(() => {
  const TOKEN_KEY = "tensorlet.adminToken";
  const REFRESH_MS = 2000;
  const FETCH_TIMEOUT_MS = 8000;
  const LOG_LINES = 50;
  const DEAD_LETTERS = 50;
  // A rate needs this long between two scrapes of /metrics (a refresh asked for right after
  // another one keeps the previous rates).
  const MIN_RATE_WINDOW_MS = 1000;
  const LOG_LEVELS = new Set(["error", "warn", "info", "debug", "trace"]);

  const $ = (id) => document.getElementById(id);

  const state = {
    token: null,
    // Bumped on every sign-in and sign-out: answers to an older generation are dropped.
    generation: 0,
    abort: null,
    timer: null,
    inFlight: false,
    again: false,
    // The previous scrape of /metrics: {t, requests: Map app→count, tokens: Map model→{…}}.
    prevScrape: null,
    rates: null,
    apps: [],
    jobs: null,
    rollingBack: new Set(),
    keys: new Map(),
  };

  // ---------------------------------------------------------------------------------------
  // DOM helpers (text only).

  /** Makes an element; `props`: class, text, dataset, title, other attributes; children are
   *  nodes or strings (strings become text nodes). */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (value === undefined || value === null || value === false) continue;
        if (key === "class") node.className = value;
        else if (key === "dataset") {
          for (const [name, v] of Object.entries(value)) {
            if (v !== undefined && v !== null) node.dataset[name] = String(v);
          }
        } else if (key === "style" || key.startsWith("on")) {
          throw new Error("el(): no inline styles or handlers");
        } else node.setAttribute(key, value === true ? "" : String(value));
      }
    }
    for (const child of children.flat(Infinity)) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function table(headers, rows, className) {
    return el(
      "table",
      { class: className },
      el("thead", null, el("tr", null, headers.map((h) =>
        el("th", { scope: "col", class: h.num ? "num" : undefined }, h.text ?? h)))),
      el("tbody", null, rows),
    );
  }

  function td(text, field, num) {
    return el("td", { dataset: { field }, class: num ? "num" : undefined }, text);
  }

  function empty(text) {
    return el("p", { class: "empty muted" }, text);
  }

  /** Runs `render` only when `key` differs from the last one rendered for `section`, so that
   *  rows under the pointer (and their buttons) are not replaced every 2 s for nothing. */
  function renderIfChanged(section, key, render) {
    if (state.keys.get(section) === key) return;
    state.keys.set(section, key);
    render();
  }

  function formatTime(ms) {
    const d = new Date(ms);
    if (!Number.isFinite(ms) || Number.isNaN(d.getTime())) return "";
    const p = (n, w = 2) => String(n).padStart(w, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
      `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
  }

  function formatDuration(secs) {
    if (!Number.isFinite(secs)) return "?";
    secs = Math.max(0, Math.floor(secs));
    const d = Math.floor(secs / 86400);
    const h = Math.floor((secs % 86400) / 3600);
    const m = Math.floor((secs % 3600) / 60);
    const s = secs % 60;
    if (d) return `${d}d ${h}h ${m}m`;
    if (h) return `${h}h ${m}m ${s}s`;
    if (m) return `${m}m ${s}s`;
    return `${s}s`;
  }

  function formatBytes(n) {
    if (!Number.isFinite(n)) return "";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${i ? n.toFixed(1) : n} ${units[i]}`;
  }

  function formatRate(r) {
    if (r === null || r === undefined || !Number.isFinite(r)) return "…";
    if (r === 0) return "0";
    return r < 10 ? r.toFixed(2) : r.toFixed(1);
  }

  const show = (node, visible) => { node.hidden = !visible; };

  // ---------------------------------------------------------------------------------------
  // The admin API.

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }
  class Unauthorized extends ApiError {}
  class Unreachable extends Error {}

  /** Reads `{"error":{"code","message"}}` from a failed answer, else its first bytes. */
  async function errorFrom(response) {
    let text = "";
    try { text = await response.text(); } catch (_) { /* the body is optional */ }
    let code = `http_${response.status}`;
    let message = `HTTP ${response.status} ${response.statusText}`.trim();
    try {
      const body = JSON.parse(text);
      if (body && typeof body.error === "object" && body.error) {
        if (typeof body.error.code === "string") code = body.error.code;
        if (typeof body.error.message === "string") message = body.error.message;
      }
    } catch (_) {
      if (text.trim()) message += `: ${text.trim().slice(0, 300)}`;
    }
    const Kind = response.status === 401 ? Unauthorized : ApiError;
    return new Kind(response.status, code, message);
  }

  function signal() {
    const timeout = AbortSignal.timeout(FETCH_TIMEOUT_MS);
    if (state.abort && typeof AbortSignal.any === "function") {
      return AbortSignal.any([state.abort.signal, timeout]);
    }
    return timeout;
  }

  /** Calls the node with the admin token; JSON (or text) back, or throws ApiError,
   *  Unauthorized or Unreachable. */
  async function api(path, { method = "GET", body, text = false } = {}) {
    const headers = { Authorization: `Bearer ${state.token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
        credentials: "omit",
        redirect: "error",
        signal: signal(),
      });
    } catch (e) {
      if (e && e.name === "TimeoutError") {
        throw new Unreachable(`no answer from the node within ${FETCH_TIMEOUT_MS / 1000} s`);
      }
      if (e && e.name === "AbortError") throw e;
      throw new Unreachable(`cannot reach the node (${e && e.message ? e.message : e})`);
    }
    if (!response.ok) throw await errorFrom(response);
    try {
      return text ? await response.text() : await response.json();
    } catch (e) {
      if (e && (e.name === "AbortError" || e.name === "TimeoutError")) throw e;
      throw new ApiError(response.status, "bad_answer", `unreadable answer from ${path}: ${e.message}`);
    }
  }

  const appPath = (app, rest) => `/v1/admin/apps/${encodeURIComponent(app)}/${rest}`;

  // ---------------------------------------------------------------------------------------
  // Sign in / out.

  function setLoginMessage(text, kind = "error") {
    const node = $("login-message");
    node.textContent = text || "";
    node.className = `form-message ${kind}`;
    show(node, Boolean(text));
  }

  function setError(text) {
    const node = $("error");
    node.textContent = text || "";
    show(node, Boolean(text));
    $("dashboard").classList.toggle("stale", Boolean(text));
  }

  function showActionResult(text, kind) {
    const box = $("action-result");
    $("action-result-text").textContent = text;
    box.className = `banner banner-${kind}`;
    show(box, true);
  }

  function newGeneration() {
    state.generation += 1;
    if (state.abort) state.abort.abort();
    state.abort = new AbortController();
    clearTimeout(state.timer);
    state.timer = null;
    state.inFlight = false;
    state.again = false;
  }

  async function onLogin(event) {
    event.preventDefault();
    const input = $("token");
    const token = input.value.trim();
    if (!token) {
      setLoginMessage("Enter the admin token.");
      return;
    }
    // A header value must be visible ASCII: anything else is not a token the node made.
    if (!/^[\x21-\x7e]+$/.test(token)) {
      setLoginMessage("That is not an admin token: it must be printable ASCII without spaces.");
      return;
    }
    newGeneration();
    const generation = state.generation;
    state.token = token;
    const button = $("login-submit");
    button.disabled = true;
    setLoginMessage("Checking the token…", "info");
    try {
      await api("/v1/admin/status");
    } catch (e) {
      if (generation !== state.generation) return;
      state.token = null;
      if (e instanceof Unauthorized) {
        setLoginMessage(`The node refused this token (401 ${e.code}): ${e.message}`);
      } else {
        setLoginMessage(`Could not check the token: ${e.message}`);
      }
      input.focus();
      input.select();
      return;
    } finally {
      button.disabled = false;
    }
    if (generation !== state.generation) return;
    try {
      sessionStorage.setItem(TOKEN_KEY, token);
    } catch (_) { /* storage disabled: the token lives in memory until the tab closes */ }
    input.value = "";
    setLoginMessage("");
    showDashboard();
  }

  function showDashboard() {
    show($("login"), false);
    show($("dashboard"), true);
    show($("logout"), true);
    refresh();
  }

  /** Forgets the token and everything shown, and returns to the sign-in form. */
  function logout(message, kind = "error") {
    newGeneration();
    state.token = null;
    try { sessionStorage.removeItem(TOKEN_KEY); } catch (_) { /* ignore */ }
    state.prevScrape = null;
    state.rates = null;
    state.apps = [];
    state.jobs = null;
    state.rollingBack.clear();
    state.keys.clear();
    for (const id of ["status", "apps", "rates", "models", "jobs", "dead-letters", "logs",
      "logs-app", "dead-letters-app"]) {
      $(id).replaceChildren();
    }
    $("node-summary").textContent = "";
    $("updated").textContent = "";
    show($("action-result"), false);
    setError("");
    show($("dashboard"), false);
    show($("logout"), false);
    show($("login"), true);
    setLoginMessage(message || "", kind);
    $("token").focus();
  }

  // ---------------------------------------------------------------------------------------
  // The refresh loop: one refresh at a time, the next REFRESH_MS after the last one ended.

  function schedule(delay) {
    clearTimeout(state.timer);
    state.timer = setTimeout(refresh, delay);
  }

  /** Refreshes as soon as the current refresh (if any) is done. */
  function refreshSoon() {
    if (!state.token) return;
    if (state.inFlight) state.again = true;
    else schedule(0);
  }

  async function refresh() {
    if (!state.token) return;
    if (state.inFlight) {
      state.again = true;
      return;
    }
    clearTimeout(state.timer);
    state.inFlight = true;
    state.again = false;
    const generation = state.generation;
    try {
      const problems = await refreshOnce(generation);
      if (generation !== state.generation) return;
      if (problems.unauthorized) {
        logout("The node refused the admin token (401). Sign in again.");
        return;
      }
      if (problems.messages.length) {
        const prefix = problems.unreachable
          ? "The node is unreachable; retrying every 2 s."
          : "Some of the dashboard could not be refreshed.";
        setError(`${prefix} ${problems.messages.join(" · ")}`);
      } else {
        setError("");
        $("updated").textContent = `updated ${formatTime(Date.now()).slice(11, 19)}`;
      }
    } catch (e) {
      if (generation !== state.generation || (e && e.name === "AbortError")) return;
      // A bug in rendering: say so rather than freezing silently.
      setError(`Dashboard error: ${e && e.message ? e.message : e}`);
    } finally {
      if (generation === state.generation) {
        state.inFlight = false;
        if (state.token) schedule(state.again ? 0 : REFRESH_MS);
      }
    }
  }

  /** Loads and renders everything once; returns what failed. */
  async function refreshOnce(generation) {
    const problems = { unauthorized: false, unreachable: null, messages: [] };
    const settle = (label, promise) => promise.then(
      (value) => ({ ok: true, value }),
      (error) => {
        if (error && error.name === "AbortError") throw error;
        if (error instanceof Unauthorized) problems.unauthorized = true;
        else if (error instanceof Unreachable) problems.unreachable = problems.unreachable || error.message;
        problems.messages.push(`${label}: ${error && error.message ? error.message : error}`);
        return { ok: false };
      },
    );

    const [status, apps, jobs, models, metrics] = await Promise.all([
      settle("status", api("/v1/admin/status")),
      settle("apps", api("/v1/admin/apps")),
      settle("jobs", api("/v1/admin/jobs")),
      settle("models", api("/v1/admin/models")),
      settle("metrics", api("/metrics", { text: true }).then((text) => ({ text, t: performance.now() }))),
    ]);
    if (generation !== state.generation) return problems;
    if (problems.unauthorized) return problems;
    if (problems.unreachable) {
      // Nothing else would answer either; keep what is shown, marked stale.
      problems.messages = [problems.unreachable];
      return problems;
    }

    if (status.ok) renderStatus(status.value);
    if (apps.ok) {
      state.apps = (Array.isArray(apps.value.apps) ? apps.value.apps : []).filter(
        (a) => a && typeof a.name === "string",
      );
      renderApps(state.apps);
    }
    if (jobs.ok) {
      state.jobs = jobs.value;
      renderJobs(jobs.value);
    }
    if (models.ok) renderModels(Array.isArray(models.value.models) ? models.value.models : []);
    if (metrics.ok) updateRates(metrics.value.text, metrics.value.t);
    renderRates();

    const names = state.apps.map((a) => a.name);
    const deadApp = syncSelect($("dead-letters-app"), names, () => {
      const perApp = (state.jobs && state.jobs.apps) || {};
      return names.find((n) => Object.hasOwn(perApp, n) && perApp[n] && perApp[n].dead > 0);
    });
    const logsApp = syncSelect($("logs-app"), names, () => undefined);

    const [dead, logs] = await Promise.all([
      deadApp
        ? settle(`dead letters of ${deadApp}`,
          api(`${appPath(deadApp, "dead-letters")}?limit=${DEAD_LETTERS}`))
        : Promise.resolve(null),
      logsApp
        ? settle(`logs of ${logsApp}`, api(`${appPath(logsApp, "logs")}?limit=${LOG_LINES}`))
        : Promise.resolve(null),
    ]);
    if (generation !== state.generation) return problems;
    // The selection may have changed meanwhile: then the next refresh (asked for by the
    // change) renders the new one.
    if (dead === null) renderDeadLetters(null, []);
    else if (dead.ok && $("dead-letters-app").value === deadApp) {
      renderDeadLetters(deadApp, Array.isArray(dead.value.dead_letters) ? dead.value.dead_letters : []);
    }
    if (logs === null) renderLogs(null, []);
    else if (logs.ok && $("logs-app").value === logsApp) {
      renderLogs(logsApp, Array.isArray(logs.value.lines) ? logs.value.lines : []);
    }
    return problems;
  }

  /** Makes `select` offer `names`, keeping the operator's choice; returns the chosen one. */
  function syncSelect(select, names, preferred) {
    const current = select.value;
    const same = select.options.length === names.length &&
      names.every((n, i) => select.options[i].value === n);
    if (!same) {
      if (names.length) {
        select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
      } else {
        select.replaceChildren(el("option", { value: "", disabled: true }, "(no apps)"));
      }
    }
    if (!names.length) {
      select.value = "";
      return "";
    }
    if (current && names.includes(current)) select.value = current;
    else select.value = preferred() || names[0];
    return select.value;
  }

  // ---------------------------------------------------------------------------------------
  // Sections.

  function renderStatus(s) {
    const conn = s.connections || {};
    const items = [
      ["version", "Version", s.version],
      ["uptime", "Uptime", formatDuration(s.uptime_secs)],
      ["instances", "Instances running / max", `${s.running_instances} / ${s.max_concurrent_instances}`],
      ["queued", "Queued requests", s.queued_requests],
      ["connections", "Connections open / max", `${conn.open} / ${conn.max}`],
      ["apps", "Apps", s.apps],
      ["models", "Models", s.models],
      ["computes", "Model computes running", s.computes_running],
      ["listen", "Listening on", s.listen],
    ];
    $("status").replaceChildren(...items.map(([field, label, value]) =>
      el("div", { class: "stat", dataset: { field } },
        el("dt", null, label),
        el("dd", null, value === undefined || value === null ? "—" : String(value)))));
    $("node-summary").textContent = `${s.version ? `v${s.version}` : ""} · up ${formatDuration(s.uptime_secs)}`;
  }

  /** The revision a traffic entry names ("latest" is resolved to the record's latest). */
  function resolveRevision(entry, record) {
    return entry.revision === "latest" ? record.latest : entry.revision;
  }

  function describeTraffic(record) {
    const traffic = record && Array.isArray(record.traffic) ? record.traffic : [];
    return traffic.map((t) => {
      const which = t.revision === "latest" ? `latest (revision ${record.latest})` : `revision ${t.revision}`;
      return `${which} ${t.percent}%${t.tag ? ` [tag ${t.tag}]` : ""}`;
    }).join(", ") || "none";
  }

  function renderApps(apps) {
    const key = JSON.stringify([apps.map((a) => [a.name, a.record && {
      latest: a.record.latest, traffic: a.record.traffic,
    }, (a.revisions || []).map((r) => [r.number, r.warm, r.running, r.queued, r.stats, r.created_at])]),
    [...state.rollingBack]]);
    renderIfChanged("apps", key, () => {
      const box = $("apps");
      if (!apps.length) {
        box.replaceChildren(empty("No apps are deployed. Deploy one with `tensorlet deploy <app> <component.wasm>`."));
        return;
      }
      box.replaceChildren(...apps.map(renderApp));
    });
  }

  function renderApp(app) {
    const record = app.record || {};
    const traffic = Array.isArray(record.traffic) ? record.traffic : [];
    const share = new Map();
    for (const t of traffic) {
      const n = resolveRevision(t, record);
      share.set(n, (share.get(n) || 0) + (Number(t.percent) || 0));
    }

    const trafficList = el("ul", { class: "traffic", dataset: { traffic: "" } },
      traffic.length ? traffic.map((t) => el("li", {
        class: "chip",
        dataset: {
          trafficRevision: String(t.revision),
          resolvedRevision: resolveRevision(t, record),
          percent: t.percent,
          tag: t.tag,
        },
      },
      t.revision === "latest" ? `latest (revision ${record.latest})` : `revision ${t.revision}`,
      `: ${t.percent}%`,
      t.tag ? el("span", { class: "tag" }, ` tag ${t.tag}`) : null))
        : el("li", { class: "chip muted" }, "no traffic"));

    const button = el("button", {
      type: "button",
      class: "rollback",
      dataset: { rollback: app.name },
      disabled: state.rollingBack.has(app.name),
      title: "Send all of this app's traffic to its previous revision",
    }, state.rollingBack.has(app.name) ? "Rolling back…" : "Roll back");
    button.addEventListener("click", () => rollback(app.name, button));

    const revisions = (Array.isArray(app.revisions) ? app.revisions : [])
      .slice()
      .sort((a, b) => b.number - a.number);
    const rows = revisions.map((r) => {
      const stats = r.stats || {};
      const pct = share.get(r.number);
      return el("tr", {
        dataset: { revision: r.number },
        class: r.number === record.latest ? "latest" : undefined,
      },
      td(r.number === record.latest ? `${r.number} (latest)` : String(r.number), "number"),
      td(r.warm ? "yes" : "no", "warm"),
      td(String(r.running ?? 0), "running", true),
      td(String(r.queued ?? 0), "queued", true),
      td(String(stats.warm_starts ?? 0), "warm-starts", true),
      td(String(stats.cold_starts ?? 0), "cold-starts", true),
      td(String(stats.cache_hits ?? 0), "cache-hits", true),
      td(pct ? `${pct}%` : "—", "traffic", true),
      td(r.created_at ? formatTime(r.created_at * 1000).slice(0, 19) : "", "created"));
    });

    return el("section", { class: "app", dataset: { app: app.name } },
      el("div", { class: "app-head" },
        el("h3", { class: "app-name" }, app.name),
        el("span", { class: "muted" }, `latest revision ${record.latest ?? "?"}`),
        el("span", { class: "traffic-label" }, "Traffic:"),
        trafficList,
        el("span", { class: "spacer" }),
        button),
      revisions.length
        ? table([
          "Revision", "Warm", { text: "Running", num: true }, { text: "Queued", num: true },
          { text: "Warm starts", num: true }, { text: "Cold starts", num: true },
          { text: "Cache hits", num: true }, { text: "Traffic", num: true }, "Created",
        ], rows, "revisions")
        : empty("No revisions."));
  }

  async function rollback(name, button) {
    if (!state.token || state.rollingBack.has(name)) return;
    const ok = window.confirm(
      `Roll back app "${name}" to its previous revision?\n\nAll of its traffic will go to that revision.`,
    );
    if (!ok) return;
    const generation = state.generation;
    state.rollingBack.add(name);
    button.disabled = true;
    button.textContent = "Rolling back…";
    try {
      const answer = await api(appPath(name, "rollback"), { method: "POST" });
      if (generation !== state.generation) return;
      showActionResult(`Rolled back ${name}: traffic is now ${describeTraffic(answer && answer.app)}.`, "ok");
    } catch (e) {
      if (generation !== state.generation || (e && e.name === "AbortError")) return;
      if (e instanceof Unauthorized) {
        logout("The node refused the admin token (401). Sign in again.");
        return;
      }
      const code = e instanceof ApiError ? ` (${e.code}, HTTP ${e.status})` : "";
      showActionResult(`Roll back of ${name} failed: ${e.message}${code}`, "error");
    } finally {
      if (generation === state.generation) {
        state.rollingBack.delete(name);
        state.keys.delete("apps");
        refreshSoon();
      }
    }
  }

  function renderJobs(jobs) {
    const perApp = (jobs && typeof jobs.apps === "object" && jobs.apps) || {};
    const names = [...new Set([...state.apps.map((a) => a.name), ...Object.keys(perApp)])].sort();
    const total = (jobs && jobs.total) || {};
    const key = JSON.stringify([names, names.map((n) => perApp[n]), total]);
    renderIfChanged("jobs", key, () => {
      const row = (name, s, attrs) => el("tr", attrs,
        name === null ? el("th", { scope: "row" }, "All apps") : td(name, "app"),
        td(String((s && s.queued) ?? 0), "queued", true),
        td(String((s && s.running) ?? 0), "running", true),
        td(String((s && s.dead) ?? 0), "dead", true));
      const rows = names.map((n) => row(n, Object.hasOwn(perApp, n) ? perApp[n] : null,
        { dataset: { jobsApp: n } }));
      rows.push(row(null, total, { class: "total", dataset: { jobsTotal: "" } }));
      $("jobs").replaceChildren(table(
        ["App", { text: "Queued", num: true }, { text: "Running", num: true }, { text: "Dead", num: true }],
        rows, "jobs"));
    });
  }

  function renderDeadLetters(app, letters) {
    const key = JSON.stringify([app, letters.map((j) => [j.id, j.attempts, j.updated_ms, j.last_error])]);
    renderIfChanged("dead-letters", key, () => {
      const box = $("dead-letters");
      box.dataset.app = app || "";
      if (!app) {
        box.replaceChildren(empty("No apps."));
        return;
      }
      if (!letters.length) {
        box.replaceChildren(empty(`No dead letters for ${app}.`));
        return;
      }
      box.replaceChildren(table(
        ["Job", { text: "Attempts", num: true }, "Last error", "Created", "Updated"],
        letters.map((j) => el("tr", { dataset: { deadLetter: j.id } },
          td(j.id, "id"),
          td(`${j.attempts ?? "?"} / ${j.max_attempts ?? "?"}`, "attempts", true),
          td(j.last_error ?? "", "last-error"),
          td(formatTime(j.created_ms), "created"),
          td(formatTime(j.updated_ms), "updated"))),
        "dead-letters"));
    });
  }

  function renderModels(models) {
    const key = JSON.stringify(models);
    renderIfChanged("models", key, () => {
      const box = $("models");
      if (!models.length) {
        box.replaceChildren(empty("No models are registered."));
        return;
      }
      box.replaceChildren(table(
        ["Name", "Encoding", "Backend", "Target", { text: "Size", num: true }, "Loaded", "LLM running / waiting"],
        models.map((m) => {
          const g = m.generation;
          return el("tr", { dataset: { model: m.name } },
            td(m.name, "name"),
            td(m.encoding ?? "", "encoding"),
            td(m.backend ?? "", "backend"),
            el("td", { dataset: { field: "target" } }, m.target ?? "",
              m.fallback ? el("div", { class: "muted small" }, `fallback: ${m.fallback}`) : null),
            td(formatBytes(m.size_bytes), "size", true),
            el("td", { dataset: { field: "loaded" }, class: m.loaded ? "ok" : "bad" },
              m.loaded ? "yes" : "no",
              m.load_error ? el("div", { class: "muted small" }, m.load_error) : null),
            td(g ? `${g.running} / ${g.waiting}` : "—", "llm"));
        }), "models"));
    });
  }

  // ---------------------------------------------------------------------------------------
  // Rates, from two successive scrapes of /metrics.

  /** Parses Prometheus' text exposition format into [{name, labels, value}]. */
  function parseMetrics(text) {
    const samples = [];
    for (const raw of text.split("\n")) {
      const line = raw.trim();
      if (!line || line.startsWith("#")) continue;
      const sample = parseSample(line);
      if (sample) samples.push(sample);
    }
    return samples;
  }

  function parseSample(line) {
    let i = 0;
    while (i < line.length && /[A-Za-z0-9_:]/.test(line[i])) i++;
    const name = line.slice(0, i);
    if (!name) return null;
    const labels = Object.create(null);
    if (line[i] === "{") {
      i++;
      for (;;) {
        while (line[i] === " " || line[i] === ",") i++;
        if (i >= line.length) return null;
        if (line[i] === "}") { i++; break; }
        let j = i;
        while (j < line.length && /[A-Za-z0-9_]/.test(line[j])) j++;
        const key = line.slice(i, j);
        if (!key) return null;
        i = j;
        while (line[i] === " ") i++;
        if (line[i] !== "=") return null;
        i++;
        while (line[i] === " ") i++;
        if (line[i] !== "\"") return null;
        i++;
        let value = "";
        for (;;) {
          if (i >= line.length) return null;
          const ch = line[i++];
          if (ch === "\"") break;
          if (ch === "\\") {
            const next = line[i++];
            value += next === "n" ? "\n" : (next ?? "");
          } else value += ch;
        }
        labels[key] = value;
      }
    }
    const fields = line.slice(i).trim().split(/\s+/);
    const value = parseValue(fields[0]);
    if (value === null) return null;
    return { name, labels, value };
  }

  function parseValue(text) {
    if (text === undefined || text === "") return null;
    if (text === "+Inf" || text === "Inf") return Infinity;
    if (text === "-Inf") return -Infinity;
    if (text === "NaN") return NaN;
    const v = Number(text);
    return Number.isNaN(v) ? null : v;
  }

  function aggregate(samples) {
    const requests = new Map();
    const tokens = new Map();
    for (const s of samples) {
      if (!Number.isFinite(s.value)) continue;
      if (s.name === "tensorlet_requests_total" && s.labels.app !== undefined) {
        requests.set(s.labels.app, (requests.get(s.labels.app) || 0) + s.value);
      } else if (s.name === "tensorlet_llm_tokens_total" && s.labels.model !== undefined) {
        const t = tokens.get(s.labels.model) || { prompt: 0, completion: 0, total: 0 };
        if (s.labels.kind === "prompt") t.prompt += s.value;
        else if (s.labels.kind === "completion") t.completion += s.value;
        t.total += s.value;
        tokens.set(s.labels.model, t);
      }
    }
    return { requests, tokens };
  }

  /** Per second from `prev` to `cur` over `secs`; a counter that went down was reset. */
  function perSecond(cur, prev, secs) {
    const delta = cur >= prev ? cur - prev : cur;
    return delta / secs;
  }

  function updateRates(text, t) {
    const now = { t, ...aggregate(parseMetrics(text)) };
    const prev = state.prevScrape;
    if (!prev) {
      state.prevScrape = now;
      state.rates = { requests: new Map(), tokens: new Map(), totals: now, measured: false };
      return;
    }
    const secs = (t - prev.t) / 1000;
    if (secs * 1000 < MIN_RATE_WINDOW_MS) {
      // Too close to the last scrape for a useful rate: keep the rates, update the totals.
      state.rates.totals = now;
      return;
    }
    const requests = new Map();
    for (const [app, count] of now.requests) {
      requests.set(app, perSecond(count, prev.requests.get(app) || 0, secs));
    }
    const tokens = new Map();
    for (const [model, c] of now.tokens) {
      const p = prev.tokens.get(model) || { prompt: 0, completion: 0, total: 0 };
      tokens.set(model, {
        prompt: perSecond(c.prompt, p.prompt, secs),
        completion: perSecond(c.completion, p.completion, secs),
        total: perSecond(c.total, p.total, secs),
      });
    }
    state.prevScrape = now;
    state.rates = { requests, tokens, totals: now, measured: true, window: secs };
  }

  function renderRates() {
    const box = $("rates");
    const rates = state.rates;
    if (!rates) {
      box.replaceChildren(empty("No scrape of /metrics yet."));
      return;
    }
    const measured = rates.measured;
    const appNames = [...new Set([...state.apps.map((a) => a.name), ...rates.totals.requests.keys()])].sort();
    const requestRows = appNames.map((app) => {
      const r = measured ? (rates.requests.get(app) || 0) : null;
      return el("tr", { dataset: { rateApp: app, rate: measured ? String(r) : "" } },
        td(app, "app"),
        el("td", { class: "num", dataset: { field: "rps", rate: measured ? String(r) : "" } }, formatRate(r)),
        td(String(rates.totals.requests.get(app) || 0), "total", true));
    });
    const models = [...rates.totals.tokens.keys()].sort();
    const tokenRows = models.map((model) => {
      const r = measured ? (rates.tokens.get(model) || { prompt: 0, completion: 0, total: 0 }) : null;
      return el("tr", { dataset: { rateModel: model, rate: r ? String(r.total) : "" } },
        td(model, "model"),
        el("td", { class: "num", dataset: { field: "tps", rate: r ? String(r.total) : "" } }, formatRate(r && r.total)),
        td(formatRate(r && r.prompt), "prompt", true),
        td(formatRate(r && r.completion), "completion", true),
        td(String(rates.totals.tokens.get(model).total), "total", true));
    });
    box.replaceChildren(
      el("p", { class: "muted small" }, measured
        ? `Over the last ${rates.window.toFixed(1)} s, from two scrapes of /metrics.`
        : "Measuring: rates appear after the next refresh."),
      el("h3", null, "Requests per second"),
      requestRows.length
        ? table(["App", { text: "req/s", num: true }, { text: "Total", num: true }], requestRows, "rates-requests")
        : empty("No requests yet."),
      el("h3", null, "LLM tokens per second"),
      tokenRows.length
        ? table(["Model", { text: "tokens/s", num: true }, { text: "prompt/s", num: true },
          { text: "completion/s", num: true }, { text: "Total", num: true }], tokenRows, "rates-tokens")
        : empty("No LLM tokens yet."),
    );
  }

  // ---------------------------------------------------------------------------------------
  // Logs.

  function renderLogs(app, lines) {
    const key = JSON.stringify([app, lines.length, lines.length ? lines[lines.length - 1].seq : null,
      lines.length ? lines[0].seq : null]);
    renderIfChanged("logs", key, () => {
      const box = $("logs");
      box.dataset.app = app || "";
      if (!app) {
        box.replaceChildren(empty("No apps."));
        return;
      }
      if (!lines.length) {
        box.replaceChildren(empty(`No log lines for ${app} yet.`));
        return;
      }
      const rows = lines.slice().reverse().map((l) => {
        const level = LOG_LEVELS.has(l.level) ? l.level : "other";
        return el("tr", { class: `level-${level}`, dataset: { seq: l.seq } },
          td(formatTime(l.time_ms), "time"),
          td(String(l.revision ?? ""), "revision", true),
          el("td", { class: "mono", dataset: { field: "request-id" } }, l.request_id ?? ""),
          td(String(l.level ?? ""), "level"),
          td(String(l.source ?? ""), "source"),
          el("td", { class: "message", dataset: { field: "message" } }, String(l.message ?? "")));
      });
      box.replaceChildren(table(
        ["Time", { text: "Rev", num: true }, "Request ID", "Level", "Source", "Message"], rows, "logs"));
    });
  }

  // ---------------------------------------------------------------------------------------
  // Start.

  function init() {
    $("login-form").addEventListener("submit", onLogin);
    $("logout").addEventListener("click", () => logout("Logged out.", "info"));
    $("action-result-dismiss").addEventListener("click", () => show($("action-result"), false));
    for (const id of ["logs-app", "dead-letters-app"]) {
      $(id).addEventListener("change", () => {
        state.keys.delete(id === "logs-app" ? "logs" : "dead-letters");
        refreshSoon();
      });
    }
    let saved = null;
    try { saved = sessionStorage.getItem(TOKEN_KEY); } catch (_) { /* storage disabled */ }
    if (saved) {
      newGeneration();
      state.token = saved;
      showDashboard();
    } else {
      show($("login"), true);
      $("token").focus();
    }
  }

  init();
})();
