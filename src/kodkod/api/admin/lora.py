"""LoRA adapters at run time (config section `lora`): list, load with scaling, unload.

* `/v1/loras`, `/v1/lora/list`: admin key → every adapter in `lora.lora_dir` (discovery rules
  in `models/lora.py`); API key → the active adapters.
* `/v1/lora`: the active adapters with their `scaling` (needs a loaded model).
* `/v1/lora/load` `{loras: [{name, scaling}], skip_queue}`: replaces the active set. Every named
  adapter is checked first in a worker thread (found, same architecture, tensor names and
  shapes; PEFT adapters converted to GGUF), so a wrong one is a 400 and nothing changes.
  Entries without a name go to `failure` (TabbyAPI). Then, holding the model's lock (new
  requests wait, like upstream's load lock), the swap runs on the engine thread between steps
  once no generation is running — running ones are waited for, or cancelled with `skip_queue`.
* `/v1/lora/unload`: frees every adapter (same locking; optional `{skip_queue}` body).
* `lora.loras` in config.yml: loaded right after the startup model (`load_startup_loras`).

`scaling` is the user's number and is used as llama.cpp's adapter scale: the update added to
a weight is scaling·(alpha/rank)·B·A, which at scaling 1 is what PEFT merges. Listings report
it as given. Requests may also name their own adapters (`loras` field, engine/adapters.py);
those load on first use and are freed by the next load or unload here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from kodkod.api.deps import ADMIN, API, current_permission
from kodkod.api.errors import ApiError
from kodkod.api.state import AppState, Models, Paths, get_model
from kodkod.api.validation import REQUEST_CONFIG, Name
from kodkod.auth import Permission
from kodkod.core.backend_types import AdapterError
from kodkod.engine.backend import Backend
from kodkod.models.lora import LoraError, LoraLibrary, discover_loras
from kodkod.models.manager import LoadedModel, ModelManager

log = logging.getLogger(__name__)
router = APIRouter()

OWNER = "tabbyAPI"


class LoraItem(BaseModel):
    model_config = ConfigDict(**REQUEST_CONFIG, coerce_numbers_to_str=True)
    name: Name | None = None
    scaling: float = Field(1.0, ge=0)


class LoraLoadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    loras: list[LoraItem] = Field(default_factory=list)
    skip_queue: bool = False


class LoraUnloadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    skip_queue: bool = False


def lora_card(name: str, scaling: float | None) -> dict[str, Any]:
    return {"id": name, "object": "lora", "created": int(time.time()), "owned_by": OWNER, "scaling": scaling}


def _active_cards(model: LoadedModel | None) -> list[dict[str, Any]]:
    if model is None or model.loras is None:
        return []
    return [lora_card(name, scale) for name, scale in model.loras.active]


def _library(model: LoadedModel) -> LoraLibrary:
    if model.loras is None:
        raise ApiError(400, "this model backend does not support LoRA adapters")
    return model.loras


async def _swap(
    models: ModelManager, model: LoadedModel, specs: Sequence[tuple[str, Path, float]], skip_queue: bool
) -> None:
    """Make `specs` the active adapters (none: unload all) on the engine thread."""
    library = _library(model)

    def run(backend: Backend) -> tuple[tuple[str, float], ...]:
        host = backend.capabilities.adapters
        if host is None:
            raise AdapterError("this model backend does not support LoRA adapters")
        if specs:
            host.activate(specs)
        else:
            host.clear()
        return host.active

    async with models.gate.exclusive():
        if models.current is not model:
            raise ApiError(503, "the model was unloaded meanwhile", code="model_not_loaded")
        try:
            active = await model.engine.run_exclusive(run, cancel_running=skip_queue)
        except AdapterError as exc:
            raise ApiError(400, str(exc), param="loras") from None
        except RuntimeError as exc:  # the engine stopped (model unloaded)
            raise ApiError(503, str(exc), code="model_not_loaded") from None
        library.active = active


async def apply_loras(
    models: ModelManager, model: LoadedModel, items: Sequence[LoraItem], *, skip_queue: bool
) -> dict[str, list[str | None]]:
    """Check every named adapter, then replace the active set."""
    library = _library(model)
    if not items:
        raise ApiError(400, "loras must name at least one adapter", param="loras")
    if not library.lora_dir.is_dir():
        raise ApiError(400, f"the LoRA directory {library.lora_dir} does not exist")
    failure: list[str | None] = [item.name for item in items if not item.name]
    named = [(item.name, item.scaling) for item in items if item.name]
    names = [name for name, _ in named]
    for name in names:
        if names.count(name) > 1:
            raise ApiError(400, f"LoRA {name!r} is listed twice", param="loras")
    specs: list[tuple[str, Path, float]] = []
    for name, scaling in named:
        try:
            prepared = await asyncio.to_thread(library.prepare, name)
        except LoraError as exc:
            raise ApiError(400, str(exc), param="loras") from None
        specs.append((name, prepared.path, scaling))
    await _swap(models, model, specs, skip_queue)
    log.info("active LoRA adapters: %s", ", ".join(f"{n} ×{s:g}" for n, _, s in specs) or "none")
    return {"success": list(names), "failure": failure}


async def load_startup_loras(state: AppState) -> None:
    """`lora.loras` from config.yml, after the startup model (ApiError when one fails)."""
    specs = state.settings.lora.loras
    if not specs:
        return
    model = state.models.current
    if model is None:
        log.warning("lora.loras is set but no model is loaded: the adapters were not loaded")
        return
    items = [LoraItem(name=s.name, scaling=s.scaling) for s in specs]
    await apply_loras(state.models, model, items, skip_queue=False)


@router.get("/v1/loras", dependencies=[API])
@router.get("/v1/lora/list", dependencies=[API])
async def lora_list(
    paths: Paths, models: Models, perm: Permission = Depends(current_permission)
) -> dict[str, Any]:
    if perm is Permission.ADMIN:
        data = [lora_card(e.name, None) for e in discover_loras(paths.lora_dir)]
    else:
        data = _active_cards(models.current)
    return {"object": "list", "data": data}


@router.get("/v1/lora", dependencies=[API])
async def lora_active(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": _active_cards(get_model(request))}


@router.post("/v1/lora/load", dependencies=[ADMIN])
async def lora_load(req: LoraLoadRequest, request: Request, models: Models) -> dict[str, list[str | None]]:
    return await apply_loras(models, get_model(request), req.loras, skip_queue=req.skip_queue)


@router.post("/v1/lora/unload", dependencies=[ADMIN])
async def lora_unload(request: Request, models: Models, req: LoraUnloadRequest | None = None) -> None:
    model = get_model(request)
    await _swap(models, model, [], req.skip_queue if req is not None else False)
    log.info("LoRA adapters unloaded")
    return None
