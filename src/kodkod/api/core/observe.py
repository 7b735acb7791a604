"""What the server is doing: `GET /metrics` (Prometheus, API key) and `GET /slots` (admin).

`/metrics` is mounted only when `logging.metrics` is on (`kodkod.api.metrics`). `/slots` shows
the engine's live sequences, KV cells, cached prefixes and host-RAM tier, read on the engine
thread between steps; a sequence's prompt text only when `logging.log_prompt` is on.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from kodkod.api.admin.inline import hold_model
from kodkod.api.deps import ADMIN, API
from kodkod.api.errors import ApiError
from kodkod.api.state import AppSettings, State
from kodkod.engine.client import EngineUnavailableError
from kodkod.engine.slots import EngineSlots, SequenceView

metrics_router = APIRouter()
slots_router = APIRouter()


@metrics_router.get("/metrics", dependencies=[API])
async def metrics(state: State) -> Response:
    if state.metrics is None:  # the route is only mounted with metrics on
        raise ApiError(404, "metrics are off (logging.metrics)")
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def _sequence(v: SequenceView, prompt: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": v.request_id,
        "state": v.state,
        "slot": v.slot,
        "prompt_tokens": v.prompt_tokens,
        "generated_tokens": v.generated_tokens,
        "cached_tokens": v.cached_tokens,
        "computed_tokens": v.computed_tokens,
        "age_s": round(v.age_s, 3),
        "preemptions": v.preemptions,
        "speculative": {
            "drafted_tokens": v.drafted_tokens,
            "accepted_tokens": v.accepted_draft_tokens,
            "acceptance_rate": v.acceptance_rate,
        },
    }
    if prompt is not None:
        out["prompt"] = prompt
    return out


@slots_router.get("/slots", dependencies=[ADMIN])
async def slots(request: Request, settings: AppSettings) -> dict[str, Any]:
    model = await hold_model(request)
    with_prompt = settings.logging.log_prompt
    try:
        view: EngineSlots = await model.engine.slots(with_prompt=with_prompt)
    except EngineUnavailableError as exc:
        raise ApiError(503, exc.message, code="engine_unavailable") from None

    def prompt_of(v: SequenceView) -> str | None:
        if v.prompt_ids is None:
            return None
        return model.tokenizer.detokenize(v.prompt_ids, special=True)

    return {
        "model": model.name,
        "sequences": [_sequence(v, prompt_of(v)) for v in view.sequences],
        "num_running": sum(v.state == "running" for v in view.sequences),
        "num_waiting": sum(v.state == "waiting" for v in view.sequences),
        "kv": {
            "capacity_cells": view.kv_capacity,
            "used_cells": view.kv_used_cells,
            "free_cells": view.kv_free_cells,
            "num_slots": view.num_slots,
        },
        "cached_prefixes": [{"slot": c.slot, "tokens": c.tokens} for c in view.cached_prefixes],
        "host_cache": {
            "entries": view.host_cache_entries,
            "bytes": view.host_cache_bytes,
            "budget_bytes": view.host_cache_budget_bytes,
        },
    }
