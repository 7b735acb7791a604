// The admin panel: model load (progress from the load stream) and unload, LoRA adapters,
// prompt template, sampler preset, and the embedding model when the server has embeddings.
"use strict";

(() => {
  const { $, call, errorText, sseData, setStatus, adminKey, authOff } = window.Kodkod;

  function result(text, kind = "") {
    setStatus($("admin-result"), text, kind);
  }

  function fillSelect(select, names, selected, empty) {
    const options = [];
    if (empty !== undefined) {
      const option = document.createElement("option");
      option.value = "";
      option.textContent = empty;
      options.push(option);
    }
    for (const name of names) {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      option.selected = name === selected;
      options.push(option);
    }
    select.replaceChildren(...options);
  }

  async function getJson(path) {
    const resp = await call(path, { admin: true });
    if (!resp.ok) throw new Error(await errorText(resp));
    return resp.json();
  }

  async function post(path, body) {
    const resp = await call(path, { admin: true, method: "POST", body: body === undefined ? {} : body });
    if (!resp.ok) throw new Error(await errorText(resp));
    const text = await resp.text();
    return text ? JSON.parse(text) : null;
  }

  async function currentModel() {
    const resp = await call("/v1/model", { admin: true });
    return resp.ok ? (await resp.json()).id : null;
  }

  async function refreshModels() {
    const [list, current] = await Promise.all([getJson("/v1/model/list"), currentModel()]);
    fillSelect($("model-select"), list.data.map((c) => c.id), current);
    if (current) $("model-name").textContent = current;
  }

  async function refreshLoras() {
    const list = await getJson("/v1/loras");
    const names = list.data.map((c) => c.id);
    fillSelect($("lora-select"), names, undefined, names.length ? undefined : "(no adapters in lora_dir)");
    const resp = await call("/v1/lora", { admin: true });
    const active = resp.ok ? (await resp.json()).data || [] : [];
    $("lora-active").textContent = active.length
      ? `active: ${active.map((c) => `${c.id} × ${c.scaling}`).join(", ")}`
      : "no adapter active";
  }

  async function refreshTemplates() {
    const list = await getJson("/v1/template/list");
    const resp = await call("/v1/model", { admin: true });
    const card = resp.ok ? await resp.json() : null;
    const current = card && card.parameters ? card.parameters.prompt_template : null;
    const names = current && !list.data.includes(current) ? [current, ...list.data] : list.data;
    fillSelect($("template-select"), names, current);
  }

  async function refreshPresets() {
    const body = await getJson("/v1/sampling/override/list");
    fillSelect($("admin-preset-select"), body.presets || [], body.selected_preset, "(no preset)");
  }

  // shown only when the server answers the embedding endpoints with something other than 501
  async function refreshEmbeddings() {
    const panel = $("embedding-panel");
    const [list, current] = await Promise.all([
      call("/v1/model/embedding/list", { admin: true }),
      call("/v1/model/embedding", { admin: true }),
    ]);
    if (list.status === 501 || current.status === 501 || !list.ok) {
      panel.hidden = true;
      return;
    }
    panel.hidden = false;
    const loaded = current.ok ? (await current.json()).id : null;
    fillSelect($("embedding-select"), (await list.json()).data.map((c) => c.id), loaded);
  }

  async function refreshAll() {
    const jobs = [refreshModels, refreshLoras, refreshTemplates, refreshPresets, refreshEmbeddings];
    const outcomes = await Promise.allSettled(jobs.map((job) => job()));
    const failed = outcomes.filter((o) => o.status === "rejected");
    if (failed.length) result(String(failed[0].reason.message || failed[0].reason), "error");
  }

  async function checkAdmin() {
    const controls = $("admin-controls");
    const status = $("admin-status");
    if (!adminKey() && !authOff()) {
      controls.disabled = true;
      setStatus(status, "Enter the admin key to manage models.");
      return;
    }
    const resp = await call("/v1/auth/permission", { admin: true });
    const permission = resp.ok ? (await resp.json()).permission : null;
    if (permission !== "admin") {
      controls.disabled = true;
      setStatus(status, resp.ok ? "That key is not an admin key." : await errorText(resp), "error");
      return;
    }
    controls.disabled = false;
    setStatus(status, adminKey() ? "Admin key accepted." : "Admin: this server needs no key.", "ok");
    await refreshAll();
  }

  function busy(on) {
    for (const id of ["model-load", "model-unload", "lora-load", "lora-unload", "template-switch"]) {
      $(id).disabled = on;
    }
  }

  async function loadModel() {
    const name = $("model-select").value;
    if (!name) return;
    const bar = $("load-progress");
    const status = $("load-status");
    bar.value = 0;
    busy(true);
    setStatus(status, `loading ${name}…`);
    try {
      const resp = await call("/v1/model/load", { admin: true, method: "POST", body: { model_name: name } });
      if (!resp.ok) throw new Error(await errorText(resp));
      let finished = false;
      for await (const data of sseData(resp)) {
        let event;
        try {
          event = JSON.parse(data);
        } catch {
          continue;
        }
        if (event.error) throw new Error(event.error.message || "the load failed");
        const percent = event.modules ? Math.round((100 * event.module) / event.modules) : 0;
        if (event.model_type === "model") bar.value = percent;
        setStatus(status, `${event.model_type}: ${percent} % ${event.status}`);
        if (event.model_type === "model" && event.status === "finished") finished = true;
      }
      if (!finished) throw new Error("the load stream ended before the model was ready");
      bar.value = 100;
      setStatus(status, `${name} loaded`, "ok");
      $("model-name").textContent = name;
    } catch (err) {
      setStatus(status, String(err.message || err), "error");
    } finally {
      busy(false);
    }
    await refreshAll();
  }

  // run an admin action, report its outcome, refresh the lists
  async function action(label, fn) {
    busy(true);
    try {
      const text = await fn();
      result(text || `${label}: done`, "ok");
    } catch (err) {
      result(`${label}: ${err.message || err}`, "error");
    } finally {
      busy(false);
      await refreshAll();
      document.dispatchEvent(new Event("kodkod:preset"));
    }
  }

  function init() {
    $("model-load").addEventListener("click", loadModel);
    $("model-unload").addEventListener("click", () =>
      action("unload", async () => {
        await post("/v1/model/unload");
        $("load-progress").value = 0;
        $("model-name").textContent = "none loaded";
        return "model unloaded";
      }),
    );
    $("lora-load").addEventListener("click", () =>
      action("LoRA load", async () => {
        const name = $("lora-select").value;
        const scaling = parseFloat($("lora-scaling").value);
        if (!name) throw new Error("no adapter selected");
        const body = await post("/v1/lora/load", { loras: [{ name, scaling: Number.isFinite(scaling) ? scaling : 1 }] });
        return `loaded: ${(body.success || []).join(", ") || "none"}; failed: ${(body.failure || []).join(", ") || "none"}`;
      }),
    );
    $("lora-unload").addEventListener("click", () => action("LoRA unload", () => post("/v1/lora/unload")));
    $("template-switch").addEventListener("click", () =>
      action("template", async () => {
        const name = $("template-select").value;
        await post("/v1/template/switch", { prompt_template_name: name });
        return `template: ${name}`;
      }),
    );
    $("preset-switch").addEventListener("click", () =>
      action("preset", async () => {
        const name = $("admin-preset-select").value;
        if (!name) {
          await post("/v1/sampling/override/unload");
          return "preset cleared";
        }
        await post("/v1/sampling/override/switch", { preset: name });
        return `preset: ${name}`;
      }),
    );
    $("preset-clear").addEventListener("click", () => action("preset", () => post("/v1/sampling/override/unload")));
    $("embedding-load").addEventListener("click", () =>
      action("embedding load", async () => {
        const name = $("embedding-select").value;
        await post("/v1/model/embedding/load", { embedding_model_name: name });
        return `embedding model: ${name}`;
      }),
    );
    $("embedding-unload").addEventListener("click", () => action("embedding unload", () => post("/v1/model/embedding/unload")));
    document.addEventListener("kodkod:keys", checkAdmin);
    checkAdmin();
  }

  document.addEventListener("DOMContentLoaded", init);
})();
