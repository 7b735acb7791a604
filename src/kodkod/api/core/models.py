"""Model listing and information: /v1/models, /v1/model, /v1/model/list, drafts, /props.

Lists follow TabbyAPI: an admin key sees every model in model_dir (minus the draft
directory when it sits inside it) or draft_model_dir; an API key sees only what is loaded (the
model, or its draft). `/v1/model` is the loaded model's card with its effective parameters,
including the nested draft card.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request

from kodkod.api.deps import API, current_permission
from kodkod.api.errors import ApiError
from kodkod.api.state import AppSettings, Models, Paths, get_model
from kodkod.auth import Permission
from kodkod.models.manager import DraftModel, LoadedModel
from kodkod.models.registry import discover
from kodkod.settings import Settings

router = APIRouter()

OWNER = "tabbyAPI"  # what TabbyAPI clients see in owned_by


def card(name: str, **extra: Any) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": OWNER, **extra}


def draft_card(draft: DraftModel) -> dict[str, Any]:
    """The nested draft card of /v1/model."""
    return card(
        draft.name,
        parameters={
            "max_seq_len": draft.plan.max_seq_len,
            "rope_scale": draft.plan.rope.scale,
            "rope_alpha": draft.plan.rope.alpha,
            "cache_mode": draft.plan.cache_mode,
        },
    )


def batch_limit(model: LoadedModel) -> int:
    """How many requests the engine really runs at once: its `max_batch_size`, or fewer when
    llama.cpp gave the context fewer sequence slots than were asked for."""
    limit = model.engine.config.max_batch_size
    slots = model.engine.stats.num_slots
    return min(limit, slots) if slots > 0 else limit


def model_parameters(model: LoadedModel) -> dict[str, Any]:
    plan = model.plan
    out: dict[str, Any] = {
        "max_seq_len": plan.max_seq_len,
        "cache_size": plan.cache_size,
        "cache_mode": plan.cache_mode,
        "rope_scale": plan.rope.scale,
        "rope_alpha": plan.rope.alpha,
        "max_batch_size": batch_limit(model),
        "chunk_size": plan.chunk_size,
        "prompt_template": model.template.name if model.template else None,
        "prompt_template_content": model.template.source if model.template else None,
        "use_vision": False,
        "draft": draft_card(model.draft) if model.draft is not None else None,
        # kodkod extensions
        "cache_types": [plan.config.cache_type_k, plan.config.cache_type_v],
        "flash_attention": plan.config.flash_attention,
        "batch_invariant": model.engine.config.batch_invariant,
        "kv_layout": "unified" if plan.config.kv_unified else "per_slot",
        "kv_cells_per_slot": plan.cells_per_slot,
        "architecture": model.info.architecture,
        "n_params": model.info.n_params,
        "n_ctx_train": model.info.n_ctx_train,
        "load_time": round(model.load_time_s, 3),
    }
    stats = model.engine.stats
    out["engine"] = {
        "running": stats.running,
        "waiting": stats.waiting,
        "cached_tokens": stats.cached_tokens,
        "free_kv_cells": stats.free_cells,
        "kv_capacity": stats.kv_capacity,
        "drafted_tokens": stats.drafted_tokens,
        "accepted_draft_tokens": stats.accepted_draft_tokens,
        "draft_acceptance_rate": round(stats.acceptance_rate, 4),
        "mean_draft_tokens": round(stats.mean_draft_len, 3),  # per drafting sequence-step
    }
    return out


def _directory_list(directory: Path) -> list[dict[str, Any]]:
    return [card(e.name) for e in discover(directory)]


def _dummies(settings: Settings) -> list[dict[str, Any]]:
    m = settings.model
    return [card(n) for n in m.dummy_model_names] if m.use_dummy_models else []


@router.get("/v1/models", dependencies=[API])
@router.get("/v1/model/list", dependencies=[API])
async def list_models(
    settings: AppSettings,
    paths: Paths,
    models: Models,
    perm: Permission = Depends(current_permission),
) -> dict[str, Any]:
    if perm is Permission.ADMIN:
        data = _directory_list(paths.model_dir)
        draft_dir = paths.draft_model_dir.resolve()
        if draft_dir != paths.model_dir.resolve():
            data = [c for c in data if (paths.model_dir / c["id"]).resolve() != draft_dir]
    else:
        current = models.current
        data = [card(current.name)] if current is not None else []
    return {"object": "list", "data": _dummies(settings) + data}


@router.get("/v1/models/{model_id:path}", dependencies=[API])
async def retrieve_model(model_id: str, settings: AppSettings, models: Models) -> dict[str, Any]:
    """OpenAI's model retrieval: the loaded model (or a configured dummy name), else 404."""
    current = models.current
    if current is not None and model_id == current.name:
        return card(current.name)
    if any(c["id"] == model_id for c in _dummies(settings)):
        return card(model_id)
    raise ApiError(404, f"The model '{model_id}' does not exist or is not loaded", code="model_not_found")


@router.get("/v1/model", dependencies=[API])
async def current_model(request: Request) -> dict[str, Any]:
    model = get_model(request)
    return card(model.name, parameters=model_parameters(model), logging=None)


@router.get("/v1/model/draft/list", dependencies=[API])
async def list_drafts(
    paths: Paths, models: Models, perm: Permission = Depends(current_permission)
) -> dict[str, Any]:
    if perm is Permission.ADMIN:
        data = _directory_list(paths.draft_model_dir)
    else:
        current = models.current
        draft = current.draft if current is not None else None
        data = [card(draft.name)] if draft is not None else []
    return {"object": "list", "data": data}


@router.get("/props", dependencies=[API])
async def props(request: Request) -> dict[str, Any]:
    model = get_model(request)
    return {
        "total_slots": batch_limit(model),
        "chat_template": model.template.source if model.template else "",
        "default_generation_settings": {"n_ctx": model.max_seq_len},
    }
