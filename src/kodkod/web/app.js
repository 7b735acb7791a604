// kodkod's web page: keys and chat with streamed replies (live.js: the live view, admin.js: the
// admin panel; both use what this file exports as window.Kodkod).
// Keys live in sessionStorage (this tab only) and travel only in the Authorization header of
// same-origin requests; nothing here writes them to the page, a URL or the browser log.
"use strict";

window.Kodkod = (() => {
  const $ = (id) => document.getElementById(id);
  const STORE_API = "kodkod.apiKey";
  const STORE_ADMIN = "kodkod.adminKey";

  const state = {
    controller: null, // AbortController of the reply being streamed
    messages: [], // the conversation sent with each request
    reply: null, // element of the latest assistant message
    authOff: false, // the server needs no key (network.disable_auth)
  };

  function storedKey(name) {
    try {
      return window.sessionStorage.getItem(name) || "";
    } catch {
      return "";
    }
  }

  function apiKey() {
    return $("api-key").value.trim() || storedKey(STORE_API) || adminKey();
  }

  function adminKey() {
    return $("admin-key").value.trim() || storedKey(STORE_ADMIN);
  }

  function setStatus(el, text, kind = "") {
    el.textContent = text;
    el.dataset.kind = kind;
  }

  // fetch with the key in a header; `admin` picks the admin key
  function call(path, { admin = false, method = "GET", body, signal } = {}) {
    const key = admin ? adminKey() : apiKey();
    const headers = {};
    if (key) headers.Authorization = `Bearer ${key}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    return fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
      credentials: "omit",
      referrerPolicy: "no-referrer",
    });
  }

  async function errorText(resp) {
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) return `${resp.status}: ${body.error.message}`;
      if (body && typeof body.detail === "string") return `${resp.status}: ${body.detail}`;
    } catch {
      // not JSON
    }
    return `HTTP ${resp.status}`;
  }

  // the `data:` payloads of a server-sent event stream
  async function* sseData(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        let line = buffer.slice(0, end);
        buffer = buffer.slice(end + 1);
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line.startsWith("data:")) yield line.slice(5).trimStart();
      }
    }
  }

  // ---- keys ----
  function saveKeys() {
    try {
      const api = $("api-key").value.trim();
      const admin = $("admin-key").value.trim();
      if (api) window.sessionStorage.setItem(STORE_API, api);
      if (admin) window.sessionStorage.setItem(STORE_ADMIN, admin);
    } catch {
      // storage disabled: the keys still work from the fields
    }
    showKeyStatus();
  }

  // a server with network.disable_auth answers without a key: say so, and need none
  async function probeAuth() {
    try {
      const resp = await fetch("/v1/auth/permission", { cache: "no-store", credentials: "omit" });
      state.authOff = resp.ok;
    } catch {
      state.authOff = false;
    }
    showKeyStatus();
    if (state.authOff) document.dispatchEvent(new Event("kodkod:keys"));
  }

  function showKeyStatus() {
    if (state.authOff && !apiKey()) {
      setStatus($("key-status"), "this server needs no key", "ok");
      return;
    }
    const parts = [];
    parts.push(apiKey() ? "API key set" : "no API key");
    if (adminKey()) parts.push("admin key set");
    setStatus($("key-status"), parts.join(", "), apiKey() ? "ok" : "");
    for (const [id, name] of [["api-key", STORE_API], ["admin-key", STORE_ADMIN]]) {
      $(id).placeholder = storedKey(name) ? "stored for this tab" : id === "api-key" ? "from api_tokens.yml" : "optional";
    }
  }

  function forgetKeys() {
    try {
      window.sessionStorage.removeItem(STORE_API);
      window.sessionStorage.removeItem(STORE_ADMIN);
    } catch {
      // nothing stored
    }
    $("api-key").value = "";
    $("admin-key").value = "";
    showKeyStatus();
    document.dispatchEvent(new Event("kodkod:keys"));
  }

  // ---- chat ----
  function addMessage(role, text) {
    const el = document.createElement("div");
    el.className = `msg ${role}`;
    const label = document.createElement("span");
    label.className = "role";
    label.textContent = role;
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    el.append(label, body);
    $("messages").append(el);
    el.scrollIntoView({ block: "end" });
    return el;
  }

  function samplers() {
    const out = {};
    for (const name of ["temperature", "top_p", "min_p", "repetition_penalty"]) {
      const v = parseFloat($(name).value);
      if (Number.isFinite(v)) out[name] = v;
    }
    for (const name of ["top_k", "max_tokens"]) {
      const v = parseInt($(name).value, 10);
      if (Number.isFinite(v)) out[name] = v;
    }
    if ($("ban_eos_token").checked) out.ban_eos_token = true;
    return out;
  }

  function setStreaming(on) {
    $("send").disabled = on;
    $("stop").disabled = !on;
  }

  async function send() {
    const text = $("chat-input").value.trim();
    if (!text || state.controller) return;
    const status = $("chat-status");
    if (!apiKey() && !state.authOff) {
      setStatus(status, "Enter the API key first.", "error");
      return;
    }
    $("chat-input").value = "";
    state.messages.push({ role: "user", content: text });
    addMessage("user", text);
    if (state.reply) delete state.reply.dataset.testid;
    const replyEl = addMessage("assistant", "");
    const textEl = replyEl.querySelector(".text");
    textEl.dataset.testid = "reply"; // the reply's text alone, without the role label
    state.reply = textEl;
    // "streaming", then "done", "stopped" or "error" (on the message and on its text)
    const setState = (value) => {
      replyEl.dataset.state = value;
      textEl.dataset.state = value;
    };
    setState("streaming");

    const system = $("system-prompt").value.trim();
    const messages = system ? [{ role: "system", content: system }, ...state.messages] : [...state.messages];
    const body = { messages, stream: true, stream_options: { include_usage: true }, ...samplers() };
    const controller = new AbortController();
    state.controller = controller;
    setStreaming(true);
    setStatus(status, "waiting for the first token…");
    let content = "";
    let pieces = 0;
    let firstAt = null;
    let usage = null;
    let finish = null;
    let streamed = true;
    const startedAt = performance.now();
    const rate = () => (firstAt && pieces > 1 ? (pieces - 1) / ((performance.now() - firstAt) / 1000) : 0);
    try {
      const resp = await call("/v1/chat/completions", { method: "POST", body, signal: controller.signal });
      if (!resp.ok) throw new Error(await errorText(resp));
      streamed = (resp.headers.get("content-type") || "").startsWith("text/event-stream");
      if (!streamed) {
        // the server answers in one piece (developer.disable_request_streaming)
        const whole = await resp.json();
        const choice = whole.choices && whole.choices[0];
        content = (choice && choice.message && choice.message.content) || "";
        textEl.textContent = content;
        usage = whole.usage || null;
        finish = choice ? choice.finish_reason : null;
      }
      for await (const data of streamed ? sseData(resp) : []) {
        if (data === "[DONE]") break;
        let event;
        try {
          event = JSON.parse(data);
        } catch {
          continue;
        }
        if (event.error) throw new Error(event.error.message || "the server reported an error");
        if (event.usage) usage = event.usage;
        const choice = event.choices && event.choices[0];
        if (!choice) continue;
        const piece = (choice.delta && choice.delta.content) || "";
        if (piece) {
          content += piece;
          pieces += 1;
          if (firstAt === null) firstAt = performance.now();
          textEl.textContent = content;
          replyEl.scrollIntoView({ block: "end" });
          setStatus(status, `streaming: ${pieces} tokens, ${rate().toFixed(1)} tokens/s`);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      setState("done");
      const n = usage ? usage.completion_tokens : pieces;
      const perSecond = streamed ? rate() : n / ((performance.now() - startedAt) / 1000);
      setStatus(status, `done (${finish || "end"}): ${n} tokens, ${perSecond.toFixed(1)} tokens/s`, "ok");
    } catch (err) {
      if (err && err.name === "AbortError") {
        setState("stopped");
        setStatus(status, `stopped after ${pieces} tokens`);
      } else {
        setState("error");
        setStatus(status, String(err && err.message ? err.message : err), "error");
      }
    } finally {
      if (content) state.messages.push({ role: "assistant", content });
      state.controller = null;
      setStreaming(false);
    }
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function clearChat() {
    stop();
    state.messages = [];
    state.reply = null;
    $("messages").replaceChildren();
    setStatus($("chat-status"), "");
  }

  async function showPreset() {
    if (!apiKey() && !state.authOff) return;
    try {
      const resp = await call("/v1/sampling/override/list");
      if (!resp.ok) return;
      const body = await resp.json();
      const n = body.overrides ? Object.keys(body.overrides).length : 0;
      $("preset-status").textContent = body.selected_preset ? `${body.selected_preset} (${n} overrides)` : n ? `${n} overrides` : "none";
    } catch {
      // shown as before
    }
  }

  function init() {
    $("keys").addEventListener("submit", (e) => {
      e.preventDefault();
      saveKeys();
      document.dispatchEvent(new Event("kodkod:keys"));
    });
    for (const id of ["api-key", "admin-key"]) {
      $(id).addEventListener("change", () => {
        saveKeys();
        document.dispatchEvent(new Event("kodkod:keys"));
      });
    }
    $("keys-forget").addEventListener("click", forgetKeys);
    $("chat-form").addEventListener("submit", (e) => {
      e.preventDefault();
      send();
    });
    $("chat-input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) {
        e.preventDefault();
        send();
      }
    });
    $("stop").addEventListener("click", stop);
    $("chat-clear").addEventListener("click", clearChat);
    document.addEventListener("kodkod:keys", showPreset);
    document.addEventListener("kodkod:preset", showPreset);
    showKeyStatus();
    showPreset();
    probeAuth();
  }

  document.addEventListener("DOMContentLoaded", init);
  const authOff = () => state.authOff;
  return { $, call, errorText, sseData, setStatus, apiKey, adminKey, authOff };
})();
