"""The embedding model endpoints: list, current, load and unload.

`/v1/model/embedding/list` shows an admin key every folder of `embeddings.embedding_model_dir`
and an API key the loaded model only; `/v1/model/embedding` is the loaded model's card (503
when none is loaded). A load names a folder (`embedding_model_name`, alias `name`); a missing
folder, an architecture the converter does not know and the model that is already loaded are
400 answers; a different model replaces the loaded one. Success is TabbyAPI's plain JSON
`{"model_type": "embedding_model", "module": 1, "modules": 1, "status": "finished"}`.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import AliasChoices, BaseModel, Field

from kodkod.api.core.models import card
from kodkod.api.deps import ADMIN, API, current_permission
from kodkod.api.errors import ApiError
from kodkod.api.state import Embeddings
from kodkod.api.validation import REQUEST_CONFIG, Name
from kodkod.auth import Permission
from kodkod.models.embeddings import EmbeddingLoadError

router = APIRouter()

NOT_LOADED = "No embedding model is currently loaded"


class EmbeddingLoadRequest(BaseModel):
    model_config = REQUEST_CONFIG

    embedding_model_name: Name = Field(
        min_length=1,
        max_length=255,
        validation_alias=AliasChoices("embedding_model_name", "name"),
    )
    embeddings_device: Literal["cpu", "auto", "cuda"] | None = None  # CPU only: accepted, unused


@router.get("/v1/model/embedding/list", dependencies=[API])
async def embedding_list(
    service: Embeddings, perm: Permission = Depends(current_permission)
) -> dict[str, Any]:
    loaded = [service.name] if service.name else []
    names = service.names() if perm is Permission.ADMIN else loaded
    return {"object": "list", "data": [card(n) for n in names]}


@router.get("/v1/model/embedding", dependencies=[API])
async def embedding_current(service: Embeddings) -> dict[str, Any]:
    if service.name is None:
        raise ApiError(503, NOT_LOADED, code="model_not_loaded")
    return card(service.name)


@router.post("/v1/model/embedding/load", dependencies=[ADMIN])
async def embedding_load(req: EmbeddingLoadRequest, service: Embeddings) -> dict[str, Any]:
    try:
        await service.load(req.embedding_model_name)
    except EmbeddingLoadError as exc:
        raise ApiError(400, str(exc)) from None
    return {"model_type": "embedding_model", "module": 1, "modules": 1, "status": "finished"}


@router.post("/v1/model/embedding/unload", dependencies=[ADMIN])
async def embedding_unload(service: Embeddings) -> None:
    if not await service.unload():
        raise ApiError(503, NOT_LOADED, code="model_not_loaded")
    return None
