"""`POST /v1/embeddings`: OpenAI's embeddings request on the loaded embedding model.

`input` is a string, a list of strings, a list of token ids or a list of token-id lists (ids
are used as given); `encoding_format` is `float` (JSON numbers) or `base64` (little-endian
float32 bytes); `model` is ignored. Every input is checked before any work: an input longer
than the model takes is a 400 naming both numbers. The answer carries the prompt token count
in `usage`, and 503 means no embedding model is loaded. A client that disconnects stops its
request's remaining batches.
"""

from __future__ import annotations

import base64
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field
from pydantic_core import to_json

from kodkod.api.deps import API
from kodkod.api.errors import ApiError
from kodkod.api.state import AppSettings, Embeddings, Metrics
from kodkod.api.streaming import until_done
from kodkod.api.validation import REQUEST_CONFIG
from kodkod.models.embeddings import EmbeddingInputError, InputTooLong, NoEmbeddingModel

router = APIRouter()

TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class EmbeddingsRequest(BaseModel):
    model_config = REQUEST_CONFIG

    input: str | list[str] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    model: str | None = None


def _inputs(value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    ids = [v for v in value if isinstance(v, int)]
    if value and len(ids) == len(value):
        return [ids]  # one input given as token ids
    return [v for v in value if not isinstance(v, int)]


def _vectors(vectors: np.ndarray, fmt: str) -> list[list[float]] | list[str]:
    """The rows as JSON numbers (one `tolist()` for the whole array) or as base64 of their
    little-endian float32 bytes."""
    if fmt == "base64":
        rows = np.ascontiguousarray(vectors, dtype="<f4")
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    out: list[list[float]] = vectors.tolist()
    return out


def answer_body(vectors: np.ndarray, fmt: str, model: str, tokens: int) -> bytes:
    """The whole JSON answer, serialised in one pass (no response model to validate 256 rows of
    384 numbers against)."""
    data = [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(_vectors(vectors, fmt))]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}
    return to_json({"object": "list", "data": data, "model": model, "usage": usage})


@router.post("/v1/embeddings", dependencies=[API])
async def embeddings(
    req: EmbeddingsRequest, request: Request, service: Embeddings, settings: AppSettings, metrics: Metrics
) -> Response:
    inputs = _inputs(req.input)
    limit = settings.embeddings.max_embedding_inputs
    if not inputs:
        raise ApiError(400, "input is empty: give a string or a list of strings", param="input")
    if len(inputs) > limit:
        raise ApiError(400, f"{len(inputs)} inputs in one request; the limit is {limit}", param="input")
    try:
        # a client that goes away stops the request's remaining batches (→ 422, as generation)
        result = await until_done(request, service.embed(inputs))
    except NoEmbeddingModel:
        raise ApiError(503, "No embedding model is currently loaded", code="model_not_loaded") from None
    except EmbeddingInputError as exc:
        code = "context_length_exceeded" if isinstance(exc, InputTooLong) else None
        raise ApiError(400, str(exc), param="input", code=code) from None
    if metrics is not None:
        metrics.record_embeddings(result.model, len(inputs))
    body = answer_body(result.vectors, req.encoding_format, result.model, result.prompt_tokens)
    return Response(body, media_type="application/json")
