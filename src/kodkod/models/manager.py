"""The model manager: what is loaded, and loading / unloading / switching it safely.

One main model (+ an optional draft) at a time. A load runs llama.cpp's blocking loader in a
worker thread (the HTTP loop keeps serving), sizes the context from the model's metadata
(`models/context.py`), finds its chat template and starts an engine thread for it. The order is
draft → model, as the progress stream reports it; a draft's vocabulary is
checked against the model's before any weights are read.

Who may use the model is decided by a `ModelGate` (`models/gate.py`): every request that
touches the model (generation, tokenization, templating) takes a lease with `acquire()`; an
inline switch (`acquire()` naming another model) waits until the old model's leases are
released and its engine is idle, then replaces it. Administrative `load()` and `unload()` follow
TabbyAPI: new requests are refused (503) from the moment they
start until the new model is installed; a load first lets the running generations finish
(`skip_queue` cancels them instead), an unload cancels them at once (their streams end with an
error event naming the reason).

Native handles are never freed under a lease (`models/lifetime.py`): after the engine has
stopped, the model is freed once its last lease is released. Requests normally end right after
their engine stream does; if some still hold a lease after `unload_grace_s`, the swap goes on
and the old model is freed when the last of them ends. Unloading frees every C handle and hands
freed heap back to the OS (`malloc_trim`), so the process's RSS returns near its pre-load
level. Native loads and frees are serialised by one thread lock. Each loaded model gets a
`LoraLibrary` for the adapters in `lora_dir` (`models/lora.py`); the adapters themselves belong
to the backend and are freed with it.

A plan's notes (GPU fields ignored on a CPU build, unknown keys: `LoadPlan.notes`) are logged
and sent as progress events with a `message` when its load starts, whatever started it
(startup, the admin API or an inline switch). `LoadedModel` and its helpers live in
`models/loaded.py`.

A model whose backend lost its process (an RPC-backed model's engine child ended because a
worker went away: the engine declares a fault caused by `BackendLostError`) is unloaded by the
manager itself; `lost` keeps the model's name and the reason (which workers no longer accept
connections) until the next load, for `/health` and for the 503 of requests that follow. A
draft for an RPC-backed model loads on the local CPU (it is small, and a worker serves one
client at a time).

The concrete backend is injected (`backend_loader`), so this module never imports llama.cpp.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kodkod.chat import find_template
from kodkod.core.backend_types import ModelInfo, ModelSource
from kodkod.engine.client import EngineClient
from kodkod.engine.loop import EngineConfig
from kodkod.models.context import ContextPlan, draft_context, plan_context, tiled_attention
from kodkod.models.draft import (
    BackendLoader,
    DraftModel,
    VocabProbe,
    check_same_vocab,
    load_draft,
    spec_config,
)
from kodkod.models.gate import Lease, ModelGate, SwitchRefused
from kodkod.models.lifetime import Retirer
from kodkod.models.loaded import (
    LoadedModel,
    LostModel,
    NoModelLoaded,
    available_threads,
    lost_backend,
    model_key,
    placement_kwargs,
    release_heap,
)
from kodkod.models.lora import attach_library
from kodkod.models.params import LoadPlan
from kodkod.models.progress import LoadProgress

__all__ = [
    "BackendLoader",
    "DraftModel",
    "Lease",
    "LoadedModel",
    "ModelManager",
    "NoModelLoaded",
    "SwitchRefused",
    "model_key",
]

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.05


class ModelManager:
    def __init__(
        self,
        backend_loader: BackendLoader,
        templates_dir: Path,
        on_fatal: Callable[[BaseException], None] | None = None,
        *,
        gpu_available: bool = False,
        lora_dir: Path | None = None,
        host_cache_mb: int = 0,
        unload_grace_s: float = 10.0,
        engine_stall_timeout_s: float = 300.0,
    ) -> None:
        self._loader = backend_loader
        self._native = threading.Lock()  # one native load or free at a time
        self._stall_timeout_s = engine_stall_timeout_s
        self._host_cache_bytes = max(0, host_cache_mb) * 1024 * 1024
        self._lora_dir = lora_dir
        self._templates_dir = templates_dir
        self._on_fatal = on_fatal
        self.gate: ModelGate[LoadedModel] = ModelGate(lambda m: m.key)
        self._retirer = Retirer(self.gate, unload_grace_s, self._free)
        self.vocab = VocabProbe(backend_loader)
        self.gpu_available = gpu_available  # the backend can place layers on a GPU
        self.loading: str | None = None
        self.lost: LostModel | None = None  # the last model unloaded because its backend ended
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- reading ----------------------------------------------------------------------------

    @property
    def current(self) -> LoadedModel | None:
        return self.gate.current

    @property
    def lock(self) -> asyncio.Lock:
        return self.gate.lock

    def require(self) -> LoadedModel:
        model = self.current
        if model is None:
            raise NoModelLoaded("No models are currently loaded")
        if not model.engine.alive:
            why = model.engine.problem or "its engine has stopped"
            raise NoModelLoaded(f"the model {model.name!r} cannot serve requests: {why}")
        return model

    def is_loaded(self, plan: LoadPlan, *, same_params: bool) -> bool:
        model = self.current
        if model is None or model.key != model_key(plan.entry):
            return False
        if not same_params:
            return True
        draft_key = model_key(model.draft.entry) if model.draft else None
        wanted = model_key(plan.draft_entry) if plan.draft_entry else None
        return model.params == plan.params and draft_key == wanted

    async def acquire(self, plan: LoadPlan | None, *, may_switch: bool) -> Lease[LoadedModel]:
        """A lease on plan's model (None: whatever is loaded); see `models/gate.py`.

        May switch models (inline loading) when `may_switch`; raises NoModelLoaded,
        SwitchRefused, or whatever the switch's load raised.
        """
        want = model_key(plan.entry) if plan is not None else None
        switch = None
        if plan is not None and may_switch:

            async def switch() -> None:
                await self._switch(plan)

        def no_model() -> Exception:
            lost = f" ({self.lost.message})" if self.lost is not None else ""
            return NoModelLoaded(self.gate.refusal or f"No models are currently loaded{lost}")

        return await self.gate.acquire(want, switch, no_model)

    async def check_draft(self, plan: LoadPlan) -> None:
        """DraftVocabError (400) if the plan's draft cannot draft for its model."""
        if plan.draft_entry is not None:
            await asyncio.to_thread(check_same_vocab, self.vocab, plan.entry, plan.draft_entry)

    # -- loading ----------------------------------------------------------------------------

    async def load(
        self,
        plan: LoadPlan,
        progress: LoadProgress | None = None,
        *,
        reason: str | None = None,
        skip_queue: bool = False,
    ) -> LoadedModel:
        """Replace whatever is loaded by plan's model. Its running generations finish first
        (`skip_queue`: they end with an error naming `reason`); new requests get 503 until
        the new model is installed."""
        refusal = f"the model {plan.entry.name!r} is being loaded; retry when it is ready"
        async with self.gate.exclusive():
            with self.gate.refusing(refusal):
                await self._unload_locked(
                    reason or f"the model was unloaded because {plan.entry.name!r} is being loaded",
                    wait=not skip_queue,
                )
                return await self._load_locked(plan, progress)

    async def _switch(self, plan: LoadPlan) -> None:
        """Inline switch (lock held, no leases left): let the old engine finish, then load."""
        old = self.current
        if old is not None:
            while old.engine.alive and (old.engine.stats.running or old.engine.stats.waiting):
                await asyncio.sleep(IDLE_POLL_S)  # requests submitted without a lease
            await self._unload_locked(f"the model was switched to {plan.entry.name!r}")
        log.info("inline switch to %s", plan.entry.name)
        await self._load_locked(plan, None)

    async def _load_locked(self, plan: LoadPlan, progress: LoadProgress | None) -> LoadedModel:
        progress = progress or LoadProgress(plan.entry.name)
        for note in plan.notes:  # what the load does instead of what was asked
            progress.note(note)
        self.loading = plan.entry.name
        self._loop = asyncio.get_running_loop()
        try:
            loaded = await asyncio.to_thread(self._load_blocking, plan, progress)
        finally:
            self.loading = None
        self.gate.install(loaded)
        self.lost = None
        progress.finish("model")
        return loaded

    def _load_blocking(self, plan: LoadPlan, progress: LoadProgress) -> LoadedModel:
        with self._native:
            return self._load_native(plan, progress)

    def _load_native(self, plan: LoadPlan, progress: LoadProgress) -> LoadedModel:
        t0 = time.perf_counter()
        params, entry = plan.params, plan.entry
        n_threads = params.n_threads or available_threads()
        placement = placement_kwargs(params)
        draft: DraftModel | None = None
        if plan.draft_entry is not None and params.draft is not None:
            target = check_same_vocab(self.vocab, entry, plan.draft_entry)
            main_plan = plan_context(params, target.info, n_threads)
            draft_params = params.draft
            draft = load_draft(
                self._loader,
                plan.draft_entry,
                draft_params,
                lambda info: draft_context(draft_params, info, main_plan, params.flash_attention),
                progress.callback("draft"),
                {} if placement.get("rpc_servers") else placement,
            )
            progress.finish("draft")
        plans: list[ContextPlan] = []
        on_fraction = progress.callback("model")

        def make_config(info: ModelInfo) -> Any:
            plans.append(plan_context(params, info, n_threads))
            return plans[-1].config

        def on_progress(value: float) -> bool:
            on_fraction(value)
            return True

        try:
            backend = self._loader(
                ModelSource(entry.gguf, entry.name, progress=on_progress), make_config, **placement
            )
        except BaseException:
            if draft is not None:
                draft.close()
            raise
        ctx = plans[-1]
        try:
            template = find_template(
                prompt_template=params.prompt_template,
                templates_dir=self._templates_dir,
                model_path=entry.folder or entry.gguf,
                gguf_template=backend.info.chat_template,
                gguf_named_templates=backend.info.named_chat_templates,
            )
            loras = attach_library(self._lora_dir, entry.gguf, backend)
            engine = EngineClient.start(
                backend,
                EngineConfig(
                    ctx.max_seq_len,
                    ctx.max_batch_size,
                    ctx.chunk_size,
                    spec_config(params.draft, draft is not None),
                    host_cache_bytes=self._host_cache_bytes,
                    stall_timeout_s=self._stall_timeout_s,
                    batch_invariant=params.batch_invariant,
                    tiled_attention=tiled_attention(ctx.config),
                ),
                self._report_fatal,
                draft.backend if draft is not None else None,  # speculative decoding
                adapter_check=loras.check_request if loras is not None else None,
            )
        except BaseException:
            backend.close()
            if draft is not None:
                draft.close()
            raise
        elapsed = time.perf_counter() - t0
        log.info(
            "loaded %s in %.1f s (max_seq_len %d, cache %d tokens, %s = %s/%s, flash attention %s, "
            "batch %d%s)",
            entry.name,
            elapsed,
            ctx.max_seq_len,
            ctx.cache_size,
            ctx.cache_mode,
            ctx.config.cache_type_k,
            ctx.config.cache_type_v,
            "on" if ctx.config.flash_attention else "off",
            ctx.max_batch_size,
            f", draft {draft.name}" if draft else "",
        )
        return LoadedModel(
            entry=entry,
            params=params,
            info=backend.info,
            tokenizer=backend.tokenizer,
            grammar=backend.capabilities.grammar,
            engine=engine,
            plan=ctx,
            template=template,
            draft=draft,
            loras=loras,
            load_time_s=elapsed,
        )

    # -- a backend that lost its process ---------------------------------------------------

    def _report_fatal(self, exc: BaseException) -> None:
        """An engine fault (engine thread): record it; a lost backend also unloads its model."""
        if self._on_fatal is not None:
            self._on_fatal(exc)
        lost = lost_backend(exc)
        if lost is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._unload_lost_soon, str(lost))

    def _unload_lost_soon(self, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self._unload_lost(reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unload_lost(self, reason: str) -> None:
        async with self.gate.exclusive():
            model = self.current
            if model is None or model.engine.problem is None:
                return  # already replaced by a working model
            lost = LostModel(model.name, reason)
            log.error("%s", lost.message)
            self.lost = lost
            await self._unload_locked(lost.message)

    # -- unloading --------------------------------------------------------------------------

    async def unload(self, message: str = "the model was unloaded") -> bool:
        """Unload the model: its running generations end with `message`."""
        async with self.gate.exclusive():
            with self.gate.refusing("the model is being unloaded"):
                return await self._unload_locked(message)

    async def _unload_locked(self, message: str, *, wait: bool = False) -> bool:
        """Stop and free the current model (lock held; `models/lifetime.py`). `wait`: let its
        generations finish first; else they end with an error event carrying `message`."""
        model = self.current
        if model is None:
            return False
        generation = self.gate.generation
        if wait:
            await self._retirer.wait_for_generations(model, generation)
        self.gate.install(None)
        await model.engine.shutdown(message)
        await self._retirer.free_when_released(model, generation)
        return True

    def _free(self, model: LoadedModel) -> None:
        with self._native:
            model.engine.close_backend()
            if model.draft is not None:
                model.draft.close()
            release_heap()

    def shutdown_sync(self) -> None:
        """Process exit: stop the engine and free the model without an event loop."""
        model = self.current
        if model is not None:
            self.gate.install(None)
            model.engine.shutdown_sync("the server is shutting down")
            model.engine.close_backend()
            if model.draft is not None:
                model.draft.close()
