"""The app factory: services, routers, error handlers, and the lifespan that loads the model.

`create_app()` is the one place concrete classes are chosen (the llama.cpp backend loader is
passed in by the CLI or by tests) and the one place services are built: `build_state()` makes
every service (model manager, sampler presets, templates, Kobold job table, health log) into
the typed `AppState` that routes reach through the dependencies of `kodkod.api.state`.
Routers are mounted per `network.api_servers`: the core and admin routes and the web page at
`/` always, the OpenAI ones for `oai`, the Kobold ones for `kobold`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from kodkod import __version__
from kodkod.api.admin import download as admin_download
from kodkod.api.admin import embedding as admin_embedding
from kodkod.api.admin import lora as admin_lora
from kodkod.api.admin import model as admin_model
from kodkod.api.admin import overrides as admin_overrides
from kodkod.api.admin import templates as admin_templates
from kodkod.api.admin.inline import LeaseMiddleware
from kodkod.api.auth_gate import AuthGate
from kodkod.api.body_limit import BodySizeLimitMiddleware
from kodkod.api.core import misc, models, observe
from kodkod.api.errors import install_error_handlers
from kodkod.api.guard import HostOriginGuard, HostPolicy, PolicyCORSMiddleware
from kodkod.api.instance_header import InstanceHeaderMiddleware
from kodkod.api.kobold.jobs import JobTable
from kodkod.api.metrics.http import RequestErrorsMiddleware
from kodkod.api.metrics.service import ServerMetrics
from kodkod.api.openai import chat, completions, embeddings
from kodkod.api.presets import PresetError, SamplerPresets
from kodkod.api.request_log import RequestLogMiddleware
from kodkod.api.state import AppState, HealthLog, ServerPaths, TemplateLibrary
from kodkod.api.web_page import router as web_page_router
from kodkod.auth import KeyStore
from kodkod.core.encoder_types import EncoderLoader
from kodkod.models.embeddings import EmbeddingService
from kodkod.models.manager import BackendLoader, ModelManager
from kodkod.settings import Settings

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The startup model (or its `lora.loras` adapters) could not be loaded (one-line message)."""


def build_state(
    settings: Settings,
    keys: KeyStore,
    backend_loader: BackendLoader,
    base_dir: Path,
    *,
    gpu_available: bool = False,
    encoder_loader: EncoderLoader | None = None,
) -> AppState:
    """Every service of one server (nothing runs yet: the lifespan loads the model)."""
    paths = ServerPaths.resolve_all(settings, base_dir)
    health = HealthLog()
    manager = ModelManager(
        backend_loader,
        paths.templates_dir,
        on_fatal=health.record_fatal,
        gpu_available=gpu_available,
        lora_dir=paths.lora_dir,
        host_cache_mb=settings.memory.sysmem_kv_cache,
        unload_grace_s=settings.model.unload_grace_s,
        engine_stall_timeout_s=settings.limits.engine_stall_timeout_s,
    )

    def chat_busy() -> bool:
        current = manager.current
        return current is not None and current.engine.stats.running > 0

    embedder = EmbeddingService(
        encoder_loader,
        paths.embedding_model_dir,
        n_threads=settings.model.effective_n_threads(),
        chat_busy=chat_busy,
        nice=settings.embeddings.embedding_nice,
    )
    return AppState(
        settings=settings,
        paths=paths,
        keys=keys,
        models=manager,
        presets=SamplerPresets(paths.overrides_dir),
        templates=TemplateLibrary(paths.templates_dir),
        kobold_jobs=JobTable(),
        health=health,
        embeddings=embedder,
        metrics=ServerMetrics(manager) if settings.logging.metrics else None,
    )


def create_app(
    settings: Settings,
    *,
    keys: KeyStore,
    backend_loader: BackendLoader,
    gpu_available: bool = False,
    encoder_loader: EncoderLoader | None = None,
    base_dir: Path | None = None,
    on_startup_error: Callable[[str], None] | None = None,
) -> FastAPI:
    """The app. If the startup model fails to load, `on_startup_error(message)` is called (the
    CLI stops the server and prints the one-line message); without it, StartupError is raised.
    `backend_loader`, `gpu_available` (its backend can offload layers to a GPU) and
    `encoder_loader` (embedding models; None: loads answer 400) come from the caller, which
    picks the concrete backend."""
    state = build_state(
        settings,
        keys,
        backend_loader,
        (base_dir or Path.cwd()).resolve(),
        gpu_available=gpu_available,
        encoder_loader=encoder_loader,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        preset = settings.sampling.override_preset
        if preset:
            try:
                state.presets.select(preset)
            except PresetError as exc:
                log.warning("sampler override preset not applied: %s", exc)
        name = settings.model.model_name
        if name:
            message = None
            try:
                await admin_model.load_startup_model(state, name)
            except Exception as exc:
                message = f"could not load the startup model {name!r}: {exc}"
            else:
                try:
                    await admin_lora.load_startup_loras(state)  # lora.loras, after the model
                except Exception as exc:
                    message = f"could not load the startup LoRA adapters: {exc}"
            if message is not None:
                if on_startup_error is None:
                    raise StartupError(message)
                on_startup_error(message)
        embedding_name = settings.embeddings.embedding_model_name
        if embedding_name:
            try:
                await state.embeddings.load(embedding_name)
            except Exception as exc:  # as upstream: a failed embedding load only logs
                log.error("could not load the startup embedding model %r: %s", embedding_name, exc)
        try:
            yield
        finally:
            await state.models.unload("the server is shutting down")
            await asyncio.to_thread(state.embeddings.shutdown)

    app = FastAPI(title="kodkod", version=__version__, lifespan=lifespan)
    app.state.kodkod = state
    app.state.keys = keys  # the auth dependencies (kodkod.api.deps) read it here
    policy = HostPolicy.from_settings(settings.network)
    app.add_middleware(AuthGate, keys=keys, routes_app=app)  # keys before the body is read
    app.add_middleware(PolicyCORSMiddleware, policy=policy)  # no credentials, see api/guard.py
    app.add_middleware(LeaseMiddleware)  # model leases end with the HTTP exchange
    if settings.logging.log_requests:
        app.add_middleware(RequestLogMiddleware)  # method, URL, headers (keys redacted)
    app.add_middleware(HostOriginGuard, policy=policy)  # DNS rebinding, foreign pages
    # added last = outermost: an oversized body is refused before auth or anything reads it
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.limits.max_request_body_bytes)
    if state.metrics is not None:  # sees every answer and every client that left
        app.add_middleware(RequestErrorsMiddleware, metrics=state.metrics)
    # outermost of all: every answer, refusals included, names the replica that gave it
    app.add_middleware(InstanceHeaderMiddleware, name=settings.network.instance_name)
    install_error_handlers(app)
    routers = (misc, models, admin_model, admin_lora, admin_templates, admin_overrides, admin_download)
    for module in (*routers, admin_embedding):
        app.include_router(module.router)
    app.include_router(web_page_router)  # the page at / (no key; what it calls needs one)
    app.include_router(observe.slots_router)
    if state.metrics is not None:
        app.include_router(observe.metrics_router)
    servers = settings.network.api_server_set()
    if "oai" in servers:
        app.include_router(completions.router)
        app.include_router(chat.router)
        app.include_router(embeddings.router)
    if "kobold" in servers:
        from kodkod.api.kobold import router as kobold_router

        kobold_router.mount(app)
    return app
