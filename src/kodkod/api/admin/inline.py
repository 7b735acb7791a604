"""Which model a generation request runs on: inline loading and leases.

`model_for_request(request, name)` decides, following TabbyAPI's inline loading rules:

1. no name, or the loaded model's name → the loaded model;
2. `model.inline_model_loading` off → the loaded model (the name is ignored; logged for admins);
3. a `dummy_model_names` entry (with `use_dummy_models`) → the loaded model;
4. an API key naming another model → 401 (switching needs the admin key);
5. an admin key: a name that is not a model in model_dir → warning, the loaded model; else that
   model, switched to like an API load with no fields (`use_as_default` + `tabby_config.yml`).

Whatever it picks is held by a lease (`ModelManager.acquire`) until the HTTP exchange ends — the
streamed body included — so an inline switch never unloads a model under a running request,
and concurrent requests for different models are served one model at a time, never
interleaved. `LeaseMiddleware` (pure ASGI, installed by the app factory) gives each HTTP request
a `LeaseHolder` and releases its leases when the exchange is over, however it ends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from kodkod.api.errors import ApiError
from kodkod.api.state import AppState, get_models, get_state
from kodkod.auth import AuthError, Permission
from kodkod.models.gate import Lease, SwitchRefused
from kodkod.models.manager import LoadedModel
from kodkod.models.params import LoadPlan
from kodkod.models.registry import ModelNameError

log = logging.getLogger(__name__)

SCOPE_KEY = "kodkod.leases"


@dataclass(slots=True)
class LeaseHolder:
    """The leases one HTTP request holds."""

    leases: list[Lease[Any]] = field(default_factory=list)

    def release_all(self) -> None:
        leases, self.leases = self.leases, []
        for lease in leases:
            lease.release()


class LeaseMiddleware:
    """Releases a request's model leases when its HTTP exchange (body included) is over."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder = LeaseHolder()
        scope[SCOPE_KEY] = holder
        try:
            await self.app(scope, receive, send)
        finally:
            holder.release_all()


def _permission(state: AppState, request: Request) -> Permission:
    try:
        return state.keys.permission_of(request.headers)
    except AuthError:
        return Permission.API


async def hold_model(
    request: Request, plan: LoadPlan | None = None, *, may_switch: bool = False
) -> LoadedModel:
    """Lease plan's model (None: the loaded one) for the rest of this HTTP exchange."""
    manager = get_models(request)
    try:
        lease = await manager.acquire(plan, may_switch=may_switch)
    except SwitchRefused:
        name = plan.entry.name if plan is not None else "another model"
        raise ApiError(401, f"switching the model to {name!r} needs the admin key") from None
    holder = request.scope.get(SCOPE_KEY)
    if isinstance(holder, LeaseHolder):
        holder.leases.append(lease)
    else:  # no middleware (embedded use): nothing would release it, so do not keep it
        lease.release()
    return lease.model


def _plan_for(state: AppState, name: str) -> LoadPlan | None:
    """The inline load plan for `name`, or None (with a warning) if it is not a model."""
    try:
        return state.load_plan(name, {}, startup=False)
    except ModelNameError as exc:
        log.warning("inline model loading: %s; using the loaded model", exc)
        return None


async def model_for_request(request: Request, name: str | None) -> LoadedModel:
    """The model a generation request runs on (rules in the module docstring)."""
    state = get_state(request)
    current = state.models.current
    cfg = state.settings.model
    if not name or (cfg.use_dummy_models and name in cfg.dummy_model_names):
        return await hold_model(request)
    is_current = current is not None and name == current.name
    admin = _permission(state, request) is Permission.ADMIN
    if not cfg.inline_model_loading:
        if admin and not is_current:
            log.warning("request names model %r but inline_model_loading is off; ignored", name)
        return await hold_model(request)
    if not admin:
        if current is not None and is_current:
            # that model, not whatever a pending switch installs; refused if it goes away
            return await hold_model(request, LoadPlan(current.entry, current.params))
        raise ApiError(401, f"switching the model to {name!r} needs the admin key")
    plan = _plan_for(state, name)
    if plan is None:
        return await hold_model(request)
    return await hold_model(request, plan, may_switch=True)
