"""Endpoints of features this build does not provide yet. They answer 501 with a clear reason
instead of pretending (listing endpoints answer an honest empty list)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from kodkod.api.deps import ADMIN, API
from kodkod.api.errors import ApiError

router = APIRouter()

_EMBED = (
    "embedding models are not supported by this server yet (no embedding engine is built in); "
    "/v1/embeddings and the embedding-model endpoints answer 501"
)


def _empty() -> dict[str, Any]:
    return {"object": "list", "data": []}


@router.get("/v1/model/embedding/list", dependencies=[API])
async def embedding_list() -> dict[str, Any]:
    return _empty()


@router.get("/v1/model/embedding", dependencies=[API])
async def embedding_current() -> None:
    raise ApiError(501, _EMBED, code="not_implemented")


@router.post("/v1/model/embedding/load", dependencies=[ADMIN])
async def embedding_load(_: Request) -> None:
    raise ApiError(501, _EMBED, code="not_implemented")


@router.post("/v1/model/embedding/unload", dependencies=[ADMIN])
async def embedding_unload() -> None:
    raise ApiError(501, _EMBED, code="not_implemented")


@router.post("/v1/embeddings", dependencies=[API])
async def embeddings(_: Request) -> None:
    raise ApiError(501, _EMBED, code="not_implemented")
