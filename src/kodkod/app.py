"""The app factory: services, routers, error handlers, and the lifespan that loads the model.

`create_app()` is the one place concrete classes are chosen (the llama.cpp backend loader is
passed in by the CLI or by tests) and the one place services are built: `build_state()` makes
every service (model manager, sampler presets, templates, Kobold job table, health log) into
the typed `AppState` that routes reach through the dependencies of `kodkod.api.state`.
Routers are mounted per `network.api_servers`: the core and admin routes always, the OpenAI
ones for `oai`, the Kobold ones for `kobold`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from kodkod import __version__
from kodkod.api.admin import lora as admin_lora
from kodkod.api.admin import model as admin_model
from kodkod.api.admin import overrides as admin_overrides
from kodkod.api.admin import templates as admin_templates
from kodkod.api.admin import unavailable
from kodkod.api.admin.inline import LeaseMiddleware
from kodkod.api.auth_gate import AuthGate
from kodkod.api.body_limit import BodySizeLimitMiddleware
from kodkod.api.core import misc, models, observe
from kodkod.api.errors import install_error_handlers
from kodkod.api.guard import HostOriginGuard, HostPolicy, PolicyCORSMiddleware
from kodkod.api.kobold.jobs import JobTable
from kodkod.api.metrics.http import RequestErrorsMiddleware
from kodkod.api.metrics.service import ServerMetrics
from kodkod.api.openai import chat, completions
from kodkod.api.presets import PresetError, SamplerPresets
from kodkod.api.request_log import RequestLogMiddleware
from kodkod.api.state import AppState, HealthLog, ServerPaths, TemplateLibrary
from kodkod.auth import KeyStore
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
    return AppState(
        settings=settings,
        paths=paths,
        keys=keys,
        models=manager,
        presets=SamplerPresets(paths.overrides_dir),
        templates=TemplateLibrary(paths.templates_dir),
        kobold_jobs=JobTable(),
        health=health,
        metrics=ServerMetrics(manager) if settings.logging.metrics else None,
    )


def create_app(
    settings: Settings,
    *,
    keys: KeyStore,
    backend_loader: BackendLoader,
    gpu_available: bool = False,
    base_dir: Path | None = None,
    on_startup_error: Callable[[str], None] | None = None,
) -> FastAPI:
    """The app. If the startup model fails to load, `on_startup_error(message)` is called (the
    CLI stops the server and prints the one-line message); without it, StartupError is raised.
    `backend_loader` and `gpu_available` (its backend can offload layers to a GPU) come from the
    caller, which picks the concrete backend."""
    state = build_state(
        settings, keys, backend_loader, (base_dir or Path.cwd()).resolve(), gpu_available=gpu_available
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
        try:
            yield
        finally:
            await state.models.unload("the server is shutting down")

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
    if state.metrics is not None:  # outermost: sees every answer and every client that left
        app.add_middleware(RequestErrorsMiddleware, metrics=state.metrics)
    install_error_handlers(app)
    for module in (misc, models, admin_model, admin_lora, admin_templates, admin_overrides, unavailable):
        app.include_router(module.router)
    app.include_router(observe.slots_router)
    if state.metrics is not None:
        app.include_router(observe.metrics_router)
    servers = settings.network.api_server_set()
    if "oai" in servers:
        app.include_router(completions.router)
        app.include_router(chat.router)
    if "kobold" in servers:
        from kodkod.api.kobold import router as kobold_router

        kobold_router.mount(app)
    return app
