// The live view: tokens/s, running/waiting requests and KV use as small charts, sampled every
// second. It reads the server's Prometheus metrics (/metrics, with the API key) when the server
// has them, and /health's engine counters (no key) otherwise; tokens/s is the growth of the
// generated-token counter between two samples.
"use strict";

(() => {
  const { $, call, errorText, setStatus, apiKey, authOff } = window.Kodkod;
  const POLL_MS = 1000;
  const METRICS_RETRY_MS = 30000; // after a 404, look for /metrics again this much later
  const state = {
    lastSample: null, // {time_ms, generated} of the previous sample
    metricsAbsent: false, // /metrics answered 404: use /health's counters
    metricsRetryAt: 0,
  };
  const charts = window.KodkodCharts;
  const series = {
    tps: new charts.Series(60),
    running: new charts.Series(60),
    waiting: new charts.Series(60),
    kv: new charts.Series(60),
  };

  // sum of every sample of each metric family in Prometheus' text format
  function parsePrometheus(text) {
    const sums = new Map();
    for (const raw of text.split("\n")) {
      const line = raw.trim();
      if (!line || line.startsWith("#")) continue;
      const m = /^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(\S+)/.exec(line);
      if (!m) continue;
      const value = Number(m[3]);
      if (Number.isFinite(value)) sums.set(m[1], (sums.get(m[1]) || 0) + value);
    }
    return sums;
  }

  // {generated, running, waiting, kv (0..1)} from /metrics, or null when it is not there
  async function fromMetrics() {
    const status = $("metrics-status");
    if ((!apiKey() && !authOff()) || (state.metricsAbsent && Date.now() < state.metricsRetryAt)) return null;
    let resp;
    try {
      resp = await call("/metrics");
    } catch {
      return null;
    }
    if (resp.status === 404) {
      state.metricsAbsent = true;
      state.metricsRetryAt = Date.now() + METRICS_RETRY_MS;
      setStatus(status, "metrics unavailable (this server has no /metrics): showing /health's counters");
      return null;
    }
    if (!resp.ok) {
      setStatus(status, `metrics unavailable (${await errorText(resp)}): showing /health's counters`, "error");
      return null;
    }
    state.metricsAbsent = false;
    const m = parsePrometheus(await resp.text());
    if (!m.has("kodkod:generation_tokens_total")) {
      setStatus(status, "metrics unavailable (no kodkod counters yet): showing /health's counters");
      return null;
    }
    setStatus(status, "from /metrics");
    return {
      generated: m.get("kodkod:generation_tokens_total"),
      running: m.get("kodkod:num_requests_running") || 0,
      waiting: m.get("kodkod:num_requests_waiting") || 0,
      kv: m.get("kodkod:kv_cache_usage_perc") || 0,
    };
  }

  async function fromHealth() {
    let body = null;
    try {
      const resp = await fetch("/health", { cache: "no-store", credentials: "omit" });
      body = await resp.json();
    } catch {
      $("model-name").textContent = "server unreachable";
      return null;
    }
    const engine = body && body.engine;
    $("model-name").textContent = engine ? engine.model : "none loaded";
    if (!engine) return null;
    // before its first step the engine reports no free cells yet: nothing is in use then
    const cap = engine.steps ? engine.kv_capacity || 0 : 0;
    return {
      generated: engine.generated_tokens || 0,
      running: engine.running || 0,
      waiting: engine.waiting || 0,
      kv: cap ? (cap - engine.free_kv_cells) / cap : 0,
    };
  }

  function show(id, text) {
    $(id).textContent = text;
  }

  async function poll() {
    const health = await fromHealth();
    const sample = (await fromMetrics()) || health;
    const now = performance.now();
    if (sample) {
      let tps = 0;
      const prev = state.lastSample;
      if (prev && sample.generated >= prev.generated && now > prev.time_ms) {
        tps = (sample.generated - prev.generated) / ((now - prev.time_ms) / 1000);
      }
      state.lastSample = { time_ms: now, generated: sample.generated };
      if (prev) {
        series.tps.push(tps);
        show("tokens-per-second", tps.toFixed(1));
      }
      series.running.push(sample.running);
      series.waiting.push(sample.waiting);
      series.kv.push(100 * sample.kv);
      show("running", String(sample.running));
      show("waiting", String(sample.waiting));
      show("kv-use", `${(100 * sample.kv).toFixed(1)} %`);
    } else {
      state.lastSample = null;
      show("tokens-per-second", "–");
    }
    const accent = charts.cssColor("--accent", "#5fa8ff");
    const accent2 = charts.cssColor("--accent2", "#f2b45a");
    charts.draw($("chart-tps"), [{ series: series.tps, color: accent, fill: true }]);
    charts.draw($("chart-requests"), [
      { series: series.running, color: accent },
      { series: series.waiting, color: accent2 },
    ]);
    charts.draw($("chart-kv"), [{ series: series.kv, color: charts.cssColor("--ok", "#5fd08a"), fill: true }], {
      max: 100,
      unit: " %",
    });
  }

  function startPolling() {
    const tick = async () => {
      try {
        await poll();
      } finally {
        window.setTimeout(tick, POLL_MS);
      }
    };
    tick();
  }

  document.addEventListener("DOMContentLoaded", startPolling);
})();
