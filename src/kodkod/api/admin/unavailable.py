"""Endpoints of features this build does not provide. They answer 501 with a clear reason
instead of pretending."""

from __future__ import annotations

from fastapi import APIRouter, Request

from kodkod.api.deps import ADMIN
from kodkod.api.errors import ApiError

router = APIRouter()


@router.post("/v1/download", dependencies=[ADMIN])
async def download(_: Request) -> None:
    raise ApiError(
        501,
        "downloading from Hugging Face is not available: this server loads models only from "
        "model_dir (use `kodkod models fetch` for the bundled models)",
        code="not_implemented",
    )
