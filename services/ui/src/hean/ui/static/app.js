// HEAN dashboard. Everything shown comes from the api-gateway, through this page's own
// server (/api/* for REST, /api/ws/events for the live stream). No build step.
//
// Data flow: the live stream (PNL_UPDATE, ORDER_*, SIGNAL, ML_PREDICTION,
// KILLSWITCH_TRIGGERED) feeds the P&L, chart, positions, orders, fills and signals; each
// time the stream (re)connects, the same panels are seeded from REST so nothing is missed.
// Health, kill-switch state, stream lengths, dead letters and open orders are polled.
// The API token is held in memory, and in sessionStorage only if the user asks; it is sent
// only with kill-switch commands and never written to the console.
(function () {
  "use strict";

  const TOKEN_KEY = "hean.apiToken";
  const LIVE_TYPES = [
    "PNL_UPDATE", "ORDER_REQUEST", "ORDER_APPROVED", "ORDER_PLACED", "ORDER_FILLED",
    "ORDER_CANCELLED", "ORDER_REJECTED", "SIGNAL", "ML_PREDICTION", "KILLSWITCH_TRIGGERED",
  ];
  const ORDER_TYPES = new Set(LIVE_TYPES.filter((t) => t.startsWith("ORDER_")));
  const MAX_POINTS = 5000;
  const MAX_ROWS = 100;
  const MAX_SEEN = 50000;

  const state = {
    pollMs: 2000,
    token: sessionStorage.getItem(TOKEN_KEY) || null,
    seen: new Map(),
    equity: [], // {t, equity, drawdown}, sorted by t
    pnl: null, // the newest PNL_UPDATE event
    fills: [], // newest first
    orders: [], // newest first
    symbols: new Map(), // symbol -> {prediction, signal}
    killswitch: null,
    streamError: null,
    wsRetries: 0,
    dialogMode: null,
    chart: null,
    renderQueued: false,
    problems: { gateway: null, redis: null },
  };

  // --- small helpers ---------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function num(value) {
    if (value === null || value === undefined || value === "") return null;
    const n = Number(value);
    return Number.isFinite(n) ? n : null;
  }

  function money(value) {
    const n = num(value);
    if (n === null) return "-";
    return n.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  }

  function signedClass(value) {
    const n = num(value);
    return n === null || n === 0 ? "" : n > 0 ? "pos" : "neg";
  }

  function percent(value, digits = 2) {
    const n = num(value);
    return n === null ? "-" : (n * 100).toFixed(digits) + " %";
  }

  function plain(value) {
    return value === null || value === undefined ? "-" : String(value);
  }

  function timeOf(ns) {
    const n = num(ns);
    if (n === null || n <= 0) return "-";
    return new Date(n / 1e6).toLocaleTimeString("en-GB", { hour12: false });
  }

  function shortId(id) {
    const s = plain(id);
    return s.length > 14 ? s.slice(0, 6) + "…" + s.slice(-6) : s;
  }

  function idKey(streamId) {
    const [ms, seq] = String(streamId || "0-0").split("-");
    return [Number(ms) || 0, Number(seq) || 0];
  }

  function newerFirst(a, b) {
    const [am, as] = idKey(a.stream_id);
    const [bm, bs] = idKey(b.stream_id);
    return bm - am || bs - as || (b.timestamp || 0) - (a.timestamp || 0);
  }

  function fillTable(tableId, rows, emptyId) {
    const body = $(tableId).tBodies[0];
    body.replaceChildren(...rows);
    $(tableId).hidden = rows.length === 0;
    if (emptyId) $(emptyId).hidden = rows.length !== 0;
  }

  // --- gateway access --------------------------------------------------------------------

  async function api(path, options = {}) {
    const headers = { Accept: "application/json", ...(options.headers || {}) };
    let response;
    try {
      response = await fetch("/api" + path, {
        method: options.method || "GET",
        headers,
        body: options.body,
        cache: "no-store",
      });
    } catch (err) {
      return { ok: false, status: 0, body: null, error: "ui_unreachable",
        detail: "the dashboard server does not answer (" + err.message + ")" };
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    let detail = body && body.detail;
    if (detail !== undefined && detail !== null && typeof detail !== "string") {
      detail = JSON.stringify(detail);
    }
    const error = (body && body.error) || (response.ok ? null : "http_" + response.status);
    return { ok: response.ok, status: response.status, body, error, detail: detail || "" };
  }

  // Gateway and Redis problems, decided from every answer: one banner each.
  function noteProblem(result) {
    if (result.error === "ui_unreachable") {
      state.problems.gateway = "The dashboard server does not answer: " + result.detail;
    } else if (result.error === "gateway_unreachable" || result.error === "gateway_timeout") {
      state.problems.gateway = "Gateway unreachable: " + result.detail +
        ". Figures below are the last ones received.";
    } else if (result.status === 401 && result.error === "http_401") {
      state.problems.gateway = "The gateway requires the API token for reads " +
        "(GATEWAY_READ_TOKEN_REQUIRED); this dashboard reads without one.";
    } else {
      state.problems.gateway = null;
    }
    if (result.error === "redis_unavailable") {
      state.problems.redis = "Redis is unreachable: the gateway cannot read the system state. " +
        "Services keep running degraded and hold events in their outbox until it is back. (" +
        result.detail + ")";
    }
  }

  function renderBanners() {
    const gw = $("gateway-banner");
    gw.hidden = !state.problems.gateway;
    gw.textContent = state.problems.gateway || "";
    const rd = $("redis-banner");
    rd.hidden = !state.problems.redis;
    rd.textContent = state.problems.redis || "";
    const ks = state.killswitch;
    const on = Boolean(ks && ks.active);
    $("killswitch-banner").hidden = !on;
    $("killswitch-banner-text").textContent = on
      ? (ks.reason ? "Reason: " + ks.reason + ". " : "") +
        (ks.timestamp_ns ? "Since " + timeOf(ks.timestamp_ns) + ". " : "")
      : "";
    document.body.classList.toggle("killswitch-on", on);
  }

  // --- polling: health, kill switch, streams, dead letters, open orders ---------------------

  async function pollHealth() {
    const result = await api("/health");
    noteProblem(result);
    const health = result.body;
    if (!health || !health.orchestrator) {
      if (result.error !== "redis_unavailable") {
        setBadge($("overall-state"), "unknown", "health unavailable");
      }
      return;
    }
    if (result.error === "redis_unavailable") {
      setBadge($("overall-state"), "unhealthy", "unhealthy: Redis unreachable");
      renderServices(health);
      return;
    }
    const busDown = Object.entries(health.components || {})
      .filter(([name, c]) => name.endsWith(".event_bus") && c.state !== "healthy")
      .map(([name]) => name.slice(0, -".event_bus".length));
    state.problems.redis = busDown.length
      ? "Degraded: " + busDown.join(", ") + " cannot reach Redis (event bus " +
        "degraded); their events wait in the outbox."
      : null;
    const services = health.services || {};
    const names = Object.keys(services);
    const up = names.filter((n) => services[n].replicas > 0).length;
    setBadge($("overall-state"), health.orchestrator.overall_state,
      "system " + health.orchestrator.overall_state + " · " + up + "/" + names.length +
      " services up");
    renderServices(health);
  }

  function setBadge(node, stateName, text) {
    node.className = "badge badge-" + stateName;
    node.textContent = text;
    node.dataset.state = stateName;
  }

  function renderServices(health) {
    const services = health.services || {};
    const components = health.components || {};
    const rows = Object.keys(services).sort().map((name) => {
      const svc = services[name];
      const instances = Object.entries(svc.instances || {}).map(([id, inst]) =>
        el("div", { class: "state-" + inst.state },
          id + ": " + inst.state + " · up " + inst.uptime_seconds + " s · snapshot " +
          Number(inst.age_seconds).toFixed(1) + " s old"));
      if (svc.error_message) instances.push(el("div", { class: "state-unhealthy" }, svc.error_message));
      const chips = Object.entries(components)
        .filter(([, c]) => c.service === name)
        .sort(([a], [b]) => a.localeCompare(b))
        .map(([key, c]) => {
          const label = key.startsWith(name + ".") ? key.slice(name.length + 1) : key;
          return el("span", { class: "component state-" + c.state, "data-component": key },
            label + ": " + c.state + " · breaker " + c.circuit_breaker + " · " +
            c.failure_count + " failures",
            c.error_message ? el("span", { class: "err" }, c.error_message) : null);
        });
      return el("tr", { "data-service": name, "data-state": svc.state },
        el("td", {}, name),
        el("td", { class: "state-" + svc.state }, svc.state),
        el("td", { class: "num" }, String(svc.replicas)),
        el("td", { class: "instances" }, ...instances),
        el("td", {}, el("div", { class: "components" }, ...chips)));
    });
    fillTable("services-table", rows);
    const missing = health.missing_services || [];
    $("health-summary").textContent = (missing.length
      ? "Down (no live health snapshot): " + missing.join(", ") + ". "
      : "Every expected service reports. ") +
      "Uptime " + (health.orchestrator.uptime_seconds || 0) + " s.";
  }

  async function pollKillswitch() {
    const result = await api("/killswitch");
    if (result.ok && result.body) {
      state.killswitch = result.body;
      const ks = result.body;
      const node = $("killswitch-state");
      node.textContent = !ks.known ? "off (risk has not reported yet)" : ks.active ? "ON" : "off";
      node.className = ks.active ? "state-unhealthy" : "state-healthy";
      node.dataset.active = String(Boolean(ks.active));
      $("killswitch-detail").textContent = ks.active
        ? "Reason: " + (ks.reason || "-") + " · since " + timeOf(ks.timestamp_ns)
        : ks.timestamp_ns ? "Last reset " + timeOf(ks.timestamp_ns) : "";
    } else {
      noteProblem(result);
    }
  }

  async function pollStreams() {
    const result = await api("/events");
    if (!result.ok || !result.body) return;
    const rows = result.body.types.map((t) =>
      el("tr", { "data-type": t.event_type },
        el("td", {}, t.event_type),
        el("td", { class: "num" }, Number(t.length).toLocaleString("en-US")),
        el("td", { class: "muted" }, t.retention)));
    fillTable("streams-table", rows);
  }

  async function pollDeadLetters() {
    const result = await api("/dlq?count=50");
    if (!result.ok || !result.body) return;
    $("dlq-total").textContent = "(" + result.body.total + " in hean:dlq)";
    const rows = result.body.entries.map((d) =>
      el("tr", { "data-dlq-id": d.dlq_id },
        el("td", {}, d.dlq_id),
        el("td", {}, d.stream),
        el("td", {}, d.group || "-"),
        el("td", { class: "num" }, plain(d.deliveries)),
        el("td", {}, d.error),
        el("td", {}, timeOf(d.dead_at_ns))));
    fillTable("dlq-table", rows, "dlq-empty");
  }

  async function pollOpenOrders() {
    const result = await api("/orders/open");
    if (!result.ok || !result.body) return;
    const rows = result.body.orders.map((o) =>
      el("tr", { "data-order-id": o.order_id },
        el("td", { title: o.order_id }, shortId(o.order_id)),
        el("td", {}, plain(o.symbol)),
        el("td", { class: "side-" + o.side }, o.side),
        el("td", {}, o.type),
        el("td", { class: "num" }, o.size),
        el("td", { class: "num" }, o.filled_qty),
        el("td", {}, o.status)));
    fillTable("open-orders-table", rows, "open-orders-empty");
  }

  async function poll() {
    try {
      await pollHealth();
      await Promise.all([pollKillswitch(), pollStreams(), pollDeadLetters(), pollOpenOrders()]);
      if (!state.problems.gateway) {
        $("last-update").textContent = "updated " + new Date().toLocaleTimeString("en-GB");
      }
      renderBanners();
    } finally {
      setTimeout(poll, state.pollMs);
    }
  }

  // --- live events -----------------------------------------------------------------------

  function remember(event) {
    const key = event.event_type + ":" + event.event_id;
    if (state.seen.has(key)) return false;
    state.seen.set(key, true);
    if (state.seen.size > MAX_SEEN) state.seen.delete(state.seen.keys().next().value);
    return true;
  }

  function insertNewestFirst(list, event) {
    let i = 0;
    while (i < list.length && newerFirst(list[i], event) < 0) i++;
    list.splice(i, 0, event);
    if (list.length > MAX_ROWS) list.length = MAX_ROWS;
  }

  function addEquityPoint(event) {
    const d = event.data;
    const equity = num(d.equity);
    if (equity === null) return;
    const point = { t: event.timestamp / 1e9, equity, drawdown: -(num(d.drawdown) || 0) * 100 };
    const pts = state.equity;
    let i = pts.length;
    while (i > 0 && pts[i - 1].t > point.t) i--;
    pts.splice(i, 0, point);
    if (pts.length > MAX_POINTS) pts.splice(0, pts.length - MAX_POINTS);
  }

  function handleEvent(event) {
    if (!event || !event.event_type || !remember(event)) return;
    const type = event.event_type;
    if (type === "PNL_UPDATE") {
      addEquityPoint(event);
      if (!state.pnl || newerFirst(state.pnl, event) > 0) state.pnl = event;
    } else if (ORDER_TYPES.has(type)) {
      insertNewestFirst(state.orders, event);
      if (type === "ORDER_FILLED") insertNewestFirst(state.fills, event);
    } else if (type === "SIGNAL" || type === "ML_PREDICTION") {
      const symbol = event.data.symbol || "(no symbol)";
      const entry = state.symbols.get(symbol) || { prediction: null, signal: null };
      const slot = type === "SIGNAL" ? "signal" : "prediction";
      if (!entry[slot] || entry[slot].timestamp < event.timestamp) entry[slot] = event;
      state.symbols.set(symbol, entry);
    } else if (type === "KILLSWITCH_TRIGGERED") {
      pollKillswitch().then(renderBanners);
    }
    queueRender();
  }

  function queueRender() {
    if (state.renderQueued) return;
    state.renderQueued = true;
    requestAnimationFrame(() => {
      state.renderQueued = false;
      renderPnl();
      renderChart();
      renderFills();
      renderOrders();
      renderSignals();
    });
  }

  async function seed() {
    const [pnl, fills, orders, signals, predictions] = await Promise.all([
      api("/events/PNL_UPDATE?count=1000"),
      api("/fills?count=" + MAX_ROWS),
      api("/orders?count=" + MAX_ROWS),
      api("/events/SIGNAL?count=100"),
      api("/events/ML_PREDICTION?count=200"),
    ]);
    for (const r of [pnl, signals, predictions]) {
      if (r.ok && r.body) r.body.events.forEach(handleEvent);
    }
    if (fills.ok && fills.body) fills.body.fills.forEach(handleEvent);
    if (orders.ok && orders.body) orders.body.events.forEach(handleEvent);
    queueRender();
  }

  function setStream(status, detail) {
    const node = $("stream-state");
    const cls = status === "live" ? "healthy" : status === "connecting" ? "unknown" : "unhealthy";
    node.className = "badge badge-" + cls;
    node.dataset.state = status;
    node.textContent = "live stream: " + status;
    node.title = detail || "the gateway's live event stream";
  }

  function connectStream() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const url = proto + "//" + location.host + "/api/ws/events?types=" + LIVE_TYPES.join(",");
    setStream(state.wsRetries ? "reconnecting" : "connecting");
    state.streamError = null;
    const ws = new WebSocket(url);
    ws.onmessage = (message) => {
      let payload;
      try {
        payload = JSON.parse(message.data);
      } catch (err) {
        return;
      }
      if (payload.error) {
        state.streamError = payload.detail || payload.error;
        return;
      }
      handleEvent(payload);
    };
    ws.onopen = () => {
      state.wsRetries = 0;
      setStream("live");
      // The gateway starts the stream at "now": seed what came before from REST.
      seed();
    };
    ws.onclose = () => {
      const delay = Math.min(5000, 500 * 2 ** state.wsRetries);
      state.wsRetries += 1;
      setStream("disconnected", state.streamError || "retrying in " + delay / 1000 + " s");
      setTimeout(connectStream, delay);
    };
  }

  // --- rendering of the live panels ---------------------------------------------------------

  function setFigure(id, text, cls) {
    const node = $(id);
    node.textContent = text;
    node.className = cls || "";
  }

  function renderPnl() {
    const ev = state.pnl;
    $("equity-empty").hidden = Boolean(ev);
    if (!ev) {
      fillTable("positions-table", [], "positions-empty");
      return;
    }
    const d = ev.data;
    setFigure("fig-equity", money(d.equity));
    setFigure("fig-total", money(d.total_pnl), signedClass(d.total_pnl));
    setFigure("fig-realized", money(d.realized_pnl), signedClass(d.realized_pnl));
    setFigure("fig-unrealized", money(d.unrealized_pnl), signedClass(d.unrealized_pnl));
    setFigure("fig-fees", money(d.fees));
    setFigure("fig-drawdown", percent(d.drawdown, 3), num(d.drawdown) > 0 ? "neg" : "");
    setFigure("fig-max-drawdown", percent(d.max_drawdown, 3));
    setFigure("fig-exposure", money(d.exposure));
    const stats = d.trade_stats || {};
    setFigure("fig-trades", plain(stats.closed_trades));
    setFigure("fig-winrate", stats.closed_trades ? percent(stats.win_rate, 1) : "-");
    const rows = Object.entries(d.positions || {})
      .filter(([, p]) => num(p.qty) !== 0)
      .map(([symbol, p]) =>
        el("tr", { "data-symbol": symbol },
          el("td", {}, symbol),
          el("td", { class: "num " + signedClass(p.qty) }, p.qty),
          el("td", { class: "num" }, money(p.avg_entry_price)),
          el("td", { class: "num" }, money(p.mark_price)),
          el("td", { class: "num" }, money(p.notional)),
          el("td", { class: "num " + signedClass(p.unrealized_pnl) }, money(p.unrealized_pnl)),
          el("td", { class: "num " + signedClass(p.realized_pnl) }, money(p.realized_pnl))));
    fillTable("positions-table", rows, "positions-empty");
  }

  function chartSize() {
    const width = Math.max(300, $("equity-chart").clientWidth);
    return { width, height: 240 };
  }

  function renderChart() {
    const pts = state.equity;
    const box = $("equity-chart");
    box.dataset.points = String(pts.length);
    box.hidden = pts.length === 0;
    if (pts.length === 0 || typeof uPlot === "undefined") return;
    const data = [pts.map((p) => p.t), pts.map((p) => p.equity), pts.map((p) => p.drawdown)];
    if (!state.chart) {
      const axisStyle = { stroke: "#8a98a8", grid: { stroke: "#2a3541" }, ticks: { stroke: "#2a3541" } };
      state.chart = new uPlot({
        ...chartSize(),
        scales: { x: { time: true }, usd: {}, pct: { range: (u, min) => [Math.min(min, -0.01), 0] } },
        series: [
          {},
          { label: "Equity", scale: "usd", stroke: "#58a6ff", width: 1.5,
            value: (u, v) => (v === null ? "-" : money(v)) },
          { label: "Drawdown %", scale: "pct", stroke: "#f85149", fill: "rgba(248,81,73,0.15)",
            value: (u, v) => (v === null ? "-" : v.toFixed(3) + " %") },
        ],
        axes: [
          { ...axisStyle },
          { ...axisStyle, scale: "usd", size: 70 },
          { ...axisStyle, scale: "pct", side: 1, size: 64,
            values: (u, vals) => vals.map((v) => +v.toFixed(4) + "%") },
        ],
      }, data, box);
    } else {
      state.chart.setData(data);
    }
  }

  function renderFills() {
    const rows = state.fills.map((ev) => {
      const d = ev.data;
      const slip = num(d.slippage_bps);
      return el("tr", { "data-fill-id": d.fill_id || ev.event_id },
        el("td", {}, timeOf(ev.timestamp)),
        el("td", {}, plain(d.symbol)),
        el("td", { class: "side-" + d.side }, plain(d.side)),
        el("td", { class: "num" }, plain(d.filled_qty)),
        el("td", { class: "num" }, money(d.fill_price)),
        el("td", { class: "num" }, d.reference_price ? money(d.reference_price) : "-"),
        el("td", { class: "num " + (slip > 0 ? "neg" : slip < 0 ? "pos" : "") },
          slip === null ? "-" : slip.toFixed(2)),
        el("td", { class: "num" }, plain(d.fee)),
        el("td", {}, plain(d.liquidity)),
        el("td", { title: d.order_id }, shortId(d.order_id)));
    });
    fillTable("fills-table", rows, "fills-empty");
    $("fills-count").textContent = rows.length ? "(latest " + rows.length + ")" : "";
  }

  function orderDetail(ev) {
    const d = ev.data;
    switch (ev.event_type) {
      case "ORDER_FILLED":
        return "filled " + d.filled_qty + " @ " + money(d.fill_price) + ", remaining " +
          plain(d.remaining_qty);
      case "ORDER_PLACED":
        return [d.algorithm, d.exchange, d.exchange_order_id].filter(Boolean).join(" · ");
      case "ORDER_REJECTED":
      case "ORDER_CANCELLED":
        return plain(d.reason);
      default:
        return [d.type, d.reduce_only ? "reduce only" : null,
          d.reference_price ? "ref " + money(d.reference_price) : null].filter(Boolean).join(" · ");
    }
  }

  function renderOrders() {
    const rows = state.orders.map((ev) => {
      const d = ev.data;
      return el("tr", { "data-event-type": ev.event_type },
        el("td", {}, timeOf(ev.timestamp)),
        el("td", {}, ev.event_type.replace("ORDER_", "")),
        el("td", { title: d.order_id || d.id }, shortId(d.order_id || d.id)),
        el("td", {}, plain(d.symbol)),
        el("td", { class: "side-" + d.side }, plain(d.side)),
        el("td", { class: "num" }, plain(d.size || d.filled_qty)),
        el("td", {}, orderDetail(ev)));
    });
    fillTable("orders-table", rows, "orders-empty");
  }

  function renderSignals() {
    const rows = [...state.symbols.keys()].sort().map((symbol) => {
      const { prediction, signal } = state.symbols.get(symbol);
      const p = prediction && prediction.data;
      const s = signal && signal.data;
      const when = Math.max(prediction ? prediction.timestamp : 0, signal ? signal.timestamp : 0);
      return el("tr", { "data-symbol": symbol },
        el("td", {}, symbol),
        el("td", { class: "num" }, p ? Number(p.prediction).toFixed(4) : "-"),
        el("td", { class: "num" }, p && p.confidence !== null && p.confidence !== undefined
          ? Number(p.confidence).toFixed(3) : "-"),
        el("td", {}, p ? plain(p.model_version) : "-"),
        el("td", { class: s ? "side-" + s.side : "" },
          s ? s.side + " at " + timeOf(signal.timestamp) : "-"),
        el("td", { class: "num" }, s && s.signal_strength !== null && s.signal_strength !== undefined
          ? Number(s.signal_strength).toFixed(3) : "-"),
        el("td", {}, timeOf(when)));
    });
    fillTable("signals-table", rows, "signals-empty");
  }

  // --- kill switch commands ---------------------------------------------------------------

  function openDialog(mode) {
    state.dialogMode = mode;
    const trigger = mode === "trigger";
    $("ks-dialog-title").textContent = trigger ? "Trigger the kill switch?" : "Reset the kill switch?";
    $("ks-dialog-text").textContent = trigger
      ? "Risk will refuse every order that does not reduce a position, and execution will " +
        "cancel open orders, until someone resets it."
      : "Risk will approve new orders again.";
    $("ks-reason-label").hidden = !trigger;
    $("ks-token").value = "";
    $("ks-token").placeholder = state.token
      ? "leave empty to use the token kept in this tab"
      : "the gateway's API_TOKEN";
    $("ks-confirm").textContent = trigger ? "Confirm: trigger kill switch" : "Confirm: reset";
    $("ks-dialog").showModal();
    $("ks-token").focus();
  }

  function showResult(text, ok) {
    const node = $("ks-result");
    node.textContent = text;
    node.className = "result " + (ok ? "ok" : "error");
    node.dataset.outcome = ok ? "ok" : "error";
  }

  async function sendCommand(mode, typedToken, reason, keep) {
    const token = typedToken || state.token;
    const headers = { "Content-Type": "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    const body = mode === "trigger" ? JSON.stringify({ reason: reason || "manual kill switch (dashboard)" }) : undefined;
    showResult((mode === "trigger" ? "Triggering" : "Resetting") + " …", true);
    const result = await api("/killswitch/" + mode, { method: "POST", headers, body });
    const verb = mode === "trigger" ? "triggered" : "reset";
    if (result.status === 200) {
      showResult("Kill switch " + verb + ": applied by risk.", true);
    } else if (result.status === 202) {
      showResult("Kill switch command queued, not applied yet: " + result.detail, false);
    } else if (result.status === 401 || result.status === 403) {
      showResult("Refused by the gateway (HTTP " + result.status + "): " + result.detail, false);
      if (!typedToken && token) forgetToken();
    } else {
      noteProblem(result);
      showResult("Command failed (" + (result.status || "no answer") + "): " +
        (result.detail || result.error), false);
    }
    if (token && (result.status === 200 || result.status === 202)) {
      state.token = token;
      if (keep) sessionStorage.setItem(TOKEN_KEY, token);
    }
    $("forget-token").hidden = !state.token;
    await Promise.all([pollKillswitch(), pollHealth()]);
    renderBanners();
  }

  function forgetToken() {
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    $("forget-token").hidden = true;
  }

  function wireKillswitch() {
    $("ks-trigger").addEventListener("click", () => openDialog("trigger"));
    $("ks-reset").addEventListener("click", () => openDialog("reset"));
    $("forget-token").addEventListener("click", forgetToken);
    $("forget-token").hidden = !state.token;
    $("ks-form").addEventListener("submit", (e) => {
      const choice = e.submitter ? e.submitter.value : "cancel";
      const token = $("ks-token").value.trim();
      $("ks-token").value = "";
      if (choice !== "confirm") return;
      sendCommand(state.dialogMode, token, $("ks-reason").value.trim(), $("ks-remember").checked);
    });
  }

  // --- start --------------------------------------------------------------------------------

  async function start() {
    try {
      const config = await (await fetch("/ui-config.json", { cache: "no-store" })).json();
      state.pollMs = config.poll_interval_ms || state.pollMs;
    } catch (err) {
      // The defaults serve; the first poll will report the server as unreachable.
    }
    wireKillswitch();
    window.addEventListener("resize", () => {
      if (state.chart) state.chart.setSize(chartSize());
    });
    renderFills();
    renderOrders();
    renderSignals();
    renderPnl();
    renderChart();
    connectStream();
    poll();
  }

  start();
})();
