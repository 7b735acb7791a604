"""Admin model management: /v1/model/load (SSE progress) and /v1/model/unload.

A load request is checked completely before the stream starts — name inside model_dir, every
field (pydantic, from the load-parameter table: `api/admin/load_request.py`), the merged
parameters (`models/loading.py`: use_as_default < request < tabby_config.yml), the draft's
vocabulary — so mistakes are plain 400/422 answers. Then the stream reports progress events
(`models/progress.py`) and closes after the main model's `finished` event, or with an error
event if the load fails. Notes about the load (GPU fields ignored on a CPU build, unknown
fields) are progress events with a `message`, and log warnings. The load runs as its
own task: a client that goes away does not stop it (as in TabbyAPI since July 2026).

Loading a different model, or the same one with different parameters, replaces the loaded one:
its running generations finish first, or with `skip_queue: true` end at once with an error
event naming the reason (upstream ignores `skip_queue` for model loads; kodkod honours it as
for LoRA loads: docs/compatibility.md). From the start of a load or unload until the new model
is installed, new requests are answered 503. An unload cancels the running generations. The
same model with the same parameters is "already loaded": two 1/1 events and nothing else (as in
TabbyAPI since July 2026).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import traceback
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter

from kodkod.api.admin.load_request import ModelLoadRequest, request_notes, request_values
from kodkod.api.deps import ADMIN
from kodkod.api.errors import ApiError, stream_error
from kodkod.api.generation import sse, sse_response
from kodkod.api.state import AppState, Models, State
from kodkod.models.params import LoadPlan
from kodkod.models.progress import LoadProgress, ProgressEvent

log = logging.getLogger(__name__)
router = APIRouter()


def make_plan(state: AppState, name: str, fields: dict[str, Any], *, startup: bool) -> LoadPlan:
    if not name or not name.strip():
        raise ApiError(400, "model_name is required")
    return state.load_plan(name, fields, startup=startup)


async def load_startup_model(state: AppState, name: str) -> None:
    """The config's `model.model_name`, with the whole model/draft_model sections."""
    plan = make_plan(state, name, {}, startup=True)
    await state.models.check_draft(plan)
    await state.models.load(plan)


def _event(ev: ProgressEvent) -> str:
    return sse(ev.as_dict())


@router.post("/v1/model/load", dependencies=[ADMIN])
async def load(req: ModelLoadRequest, state: State) -> Any:
    plan = make_plan(state, req.model_name, request_values(req), startup=False)
    plan = dataclasses.replace(plan, notes=(*request_notes(req), *plan.notes))
    await state.models.check_draft(plan)  # 400 naming both models before the stream starts
    if state.models.is_loaded(plan, same_params=True):

        async def already() -> AsyncIterator[str]:
            for note in plan.notes:
                log.warning("loading %s: %s", plan.entry.name, note)
                yield _event(ProgressEvent("model", 0, 1, "processing", note))
            yield _event(ProgressEvent("model", 1, 1, "processing"))
            yield _event(ProgressEvent("model", 1, 1, "finished"))

        return sse_response(already())
    return sse_response(_load_stream(state, plan, req.skip_queue))


def _log_outcome(name: str, task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        log.warning("loading %s was cancelled", name)
    elif task.exception() is not None:
        log.error("loading %s failed: %s", name, task.exception())


async def _load_stream(state: AppState, plan: LoadPlan, skip_queue: bool) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[ProgressEvent | None] = asyncio.Queue()

    def emit(ev: ProgressEvent) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, ev)

    progress = LoadProgress(plan.entry.name, emit)
    current = state.models.current
    reason = None
    if current is not None:
        reason = f"the model {current.name!r} was unloaded: an administrator is loading {plan.entry.name!r}"
    # The load continues even if this client goes away (as in TabbyAPI since July 2026).
    task = asyncio.ensure_future(state.models.load(plan, progress, reason=reason, skip_queue=skip_queue))
    task.add_done_callback(lambda t: _log_outcome(plan.entry.name, t))
    task.add_done_callback(lambda _: loop.call_soon(queue.put_nowait, None))
    while (ev := await queue.get()) is not None:
        yield _event(ev)
    exc = None if task.cancelled() else task.exception()
    if task.cancelled() or exc is not None:
        trace = None
        if exc is not None and state.settings.network.send_tracebacks:
            trace = "".join(traceback.format_exception(exc))
        message = f"loading {plan.entry.name} failed: {exc or 'cancelled'}"
        yield sse(stream_error(message, trace))


@router.post("/v1/model/unload", dependencies=[ADMIN])
async def unload(models: Models) -> None:
    if not await models.unload("the model was unloaded by an administrator"):
        raise ApiError(503, "No models are currently loaded", code="model_not_loaded")
    return None
