"""Admin model management: /v1/model/load (SSE progress), /v1/model/unload (reference §11)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from kodkod.api.deps import ADMIN
from kodkod.api.errors import ApiError, stream_error
from kodkod.api.generation import sse, sse_response
from kodkod.api.state import AppState, get_state
from kodkod.models.loading import build_params, load_model
from kodkod.models.registry import resolve

log = logging.getLogger(__name__)
router = APIRouter()

PROGRESS_MODULES = 100  # llama.cpp reports a fraction; we report it as percent "modules"


class DraftLoadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    draft_model_name: str = Field(validation_alias=AliasChoices("draft_model_name", "name"))
    draft_rope_scale: float | None = None
    draft_rope_alpha: float | str | None = None
    draft_cache_mode: str | None = None
    draft_gpu_split: list[float] | None = None
    draft_mode: str | None = None
    draft_num_tokens: int | None = Field(None, ge=1, le=32)
    dynamic_draft: bool | None = None
    ngram_match_min: int | None = Field(None, ge=1)


class ModelLoadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    model_name: str = Field(validation_alias=AliasChoices("model_name", "name"))
    backend: str | None = None
    max_seq_len: int | None = Field(None, ge=-1)
    cache_size: int | None = Field(None, gt=0)
    cache_mode: str | None = None
    chunk_size: int | None = Field(None, gt=0)
    max_batch_size: int | None = Field(None, ge=1, le=128)
    rope_scale: float | None = Field(None, gt=0)
    rope_alpha: float | str | None = None
    prompt_template: str | None = None
    vision: bool | None = None
    tensor_parallel: bool | None = None
    tensor_parallel_backend: str | None = None
    gpu_split_auto: bool | None = None
    gpu_split: list[float] | None = None
    autosplit_reserve: list[float] | None = None
    output_chunking: bool | None = None
    num_experts_per_token: int | None = None
    draft_model: DraftLoadRequest | None = Field(
        None, validation_alias=AliasChoices("draft_model", "draft")
    )
    skip_queue: bool = False


def _event(status: str, module: int, modules: int = PROGRESS_MODULES, kind: str = "model") -> str:
    return sse({"model_type": kind, "module": module, "modules": modules, "status": status})


@router.post("/v1/model/load", dependencies=[ADMIN])
async def load(req: ModelLoadRequest, request: Request) -> Any:
    state = get_state(request)
    entry = resolve(state.model_dir, req.model_name)  # 400 before the stream starts
    params = build_params(state.settings, entry, req.model_dump(exclude_none=True, exclude={"model_name"}), startup=False)
    current = state.models.current
    if current is not None and current.entry.gguf.resolve() == entry.gguf.resolve():
        async def already() -> AsyncIterator[str]:
            yield _event("processing", 1, 1)
            yield _event("finished", 1, 1)
        return sse_response(already())
    return sse_response(_load_stream(state, entry, params))


async def _load_stream(state: AppState, entry: Any, params: Any) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[int] = asyncio.Queue()
    last = [-1]

    def progress(value: float) -> None:
        module = max(1, min(PROGRESS_MODULES, int(round(value * PROGRESS_MODULES))))
        if module != last[0]:
            last[0] = module
            loop.call_soon_threadsafe(queue.put_nowait, module)

    # The load continues even if this client goes away (reference §11.3, E3 2026-07).
    task = asyncio.ensure_future(load_model(state.models, entry, params, progress))
    while True:
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            yield _event("processing", getter.result())
            continue
        getter.cancel()
        break
    while not queue.empty():
        yield _event("processing", queue.get_nowait())
    exc = task.exception()
    if exc is not None:
        log.warning("loading %s failed: %s", entry.name, exc)
        yield sse(stream_error(f"loading {entry.name} failed: {exc}"))
        return
    yield _event("processing", PROGRESS_MODULES)
    yield _event("finished", PROGRESS_MODULES)


@router.post("/v1/model/unload", dependencies=[ADMIN])
async def unload(request: Request) -> None:
    state = get_state(request)
    if not await state.models.unload("the model was unloaded by an administrator"):
        raise ApiError(503, "No models are currently loaded", code="model_not_loaded")
    return None
