"""Small core endpoints: /health, /.well-known/serviceinfo, /v1/auth/permission, tokens.

The token endpoints lease the model (`api/admin/inline.py`) like generations do, so an unload
never frees the vocabulary they are reading.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from kodkod import __version__
from kodkod.api.admin.inline import hold_model
from kodkod.api.convert import run_sized
from kodkod.api.deps import API, get_keys
from kodkod.api.errors import ApiError
from kodkod.api.state import AppSettings, Health, Models
from kodkod.auth import AuthError
from kodkod.chat import TemplateError, strip_leading_bos
from kodkod.models.manager import LoadedModel

router = APIRouter()


@router.get("/health")
async def health(models: Models, health_log: Health) -> JSONResponse:
    current = models.current
    # a fault belongs to the engine it happened in: one whose model was unloaded because its
    # backend's process ended (an RPC worker went away) is resolved by that unload
    lost = models.lost if current is None else None
    since = current.loaded_at if current is not None else (lost.at if lost is not None else None)
    current_issues, resolved_issues = health_log.split(since)
    issues = [{"time": i.time, "description": i.description} for i in current_issues]
    resolved = [{"time": i.time, "description": i.description} for i in resolved_issues]
    problem = current.engine.problem if current is not None else None
    if problem is not None and not any(problem in i["description"] for i in issues):
        # the watchdog records it within a second; say it now
        issues.append({"time": datetime.now(UTC).isoformat(), "description": problem})
    body: dict[str, Any] = {"status": "unhealthy" if issues else "healthy", "issues": issues}
    if resolved:
        body["resolved_issues"] = resolved
    if lost is not None:
        body["unloaded"] = {
            "model": lost.name,
            "time": datetime.fromtimestamp(lost.at, UTC).isoformat(),
            "reason": lost.reason,
        }
    if current is not None:
        s = current.engine.stats
        body["engine"] = {
            "model": current.name,
            "running": s.running,
            "waiting": s.waiting,
            "cached_tokens": s.cached_tokens,
            "free_kv_cells": s.free_cells,
            "kv_capacity": s.kv_capacity,
            "steps": s.steps,
            "generated_tokens": s.generated_tokens,
            "prompt_tokens_computed": s.prompt_tokens_computed,
            "preemptions": s.preemptions,
            "decode_steps": s.decode_steps,
            "prefill_steps": s.prefill_steps,
            "decode_time_s": round(s.decode_time_s, 6),
            "step_time_s": round(s.step_time_s, 6),
            "host_cache_entries": s.host_cache_entries,
            "host_cache_bytes": s.host_cache_bytes,
            "host_cache_restores": s.host_cache_restores,
            "kv_compactions": s.compactions,
            "drafted_tokens": s.drafted_tokens,
            "accepted_draft_tokens": s.accepted_draft_tokens,
            "draft_steps": s.draft_steps,
            "draft_time_s": round(s.draft_time_s, 6),
            "speculation_costs": [
                {
                    "num_seqs": c.num_seqs,
                    "plain_step_ms": round(1000 * c.plain_s, 3),
                    "verified_row_ms": round(1000 * c.row_s, 3),
                    "draft_call_ms": round(1000 * c.draft_call_s, 3),
                    "breakeven_acceptance": None
                    if c.breakeven_alpha is None
                    else round(c.breakeven_alpha, 3),
                    "acceptance": round(c.alpha, 3),
                    "best_k": c.best_k,
                    "best_speedup": round(c.best_speedup, 3),
                }
                for c in s.spec_costs
            ],
        }
    return JSONResponse(body, status_code=503 if issues else 200)


@router.get("/.well-known/serviceinfo")
async def serviceinfo() -> dict[str, Any]:
    return {
        "version": 0.1,
        "software": {"name": "kodkod", "version": __version__},
        "api": {
            "openai": {"name": "OpenAI API", "relative_url": "/v1", "version": 1},
            "koboldai": {"name": "KoboldAI API", "relative_url": "/api", "version": 1},
        },
    }


@router.get("/v1/auth/permission", dependencies=[API])
async def auth_permission(request: Request) -> dict[str, str]:
    try:
        perm = get_keys(request).permission_of(request.headers)
    except AuthError as exc:
        raise ApiError(400, exc.message) from None
    return {"permission": perm.value}


class TokenFlags(BaseModel):
    model_config = ConfigDict(extra="ignore")
    add_bos_token: bool = True
    encode_special_tokens: bool = True
    decode_special_tokens: bool = True


class EncodeRequest(TokenFlags):
    text: str | list[dict[str, Any]]
    template_vars: dict[str, Any] = Field(default_factory=dict, alias="template_vars")


class DecodeRequest(TokenFlags):
    tokens: list[int]


@router.post("/v1/token/encode", dependencies=[API])
async def encode(req: EncodeRequest, request: Request, settings: AppSettings) -> dict[str, Any]:
    model = await hold_model(request)  # leased: a worker thread may tokenize under the lease
    offload_chars = settings.limits.offload_tokenize_chars
    size = len(req.text) if isinstance(req.text, str) else len(str(req.text))
    return await run_sized(size, offload_chars, lambda: _encode(req, model))


def _encode(req: EncodeRequest, model: LoadedModel) -> dict[str, Any]:
    info = model.info
    text = req.text
    if isinstance(text, list):
        if model.template is None:
            raise ApiError(422, "no prompt template is set, so messages cannot be encoded")
        try:
            text = model.template.render(
                text,
                add_generation_prompt=False,
                bos_token=info.bos_text,
                eos_token=info.eos_text,
                template_vars=req.template_vars,
            )
        except TemplateError as exc:
            raise ApiError(400, f"TemplateError: {exc}") from None
        text = strip_leading_bos(text, info.bos_text, add_bos_token=info.add_bos)
    # add_bos_token: let the tokenizer add BOS if the model uses one (never twice)
    ids = model.tokenizer.tokenize(text, add_bos=req.add_bos_token, parse_special=req.encode_special_tokens)
    if info.bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == info.bos_id:
        ids = ids[1:]
    return {"tokens": ids, "length": len(ids)}


@router.post("/v1/token/decode", dependencies=[API])
async def decode(req: DecodeRequest, request: Request) -> dict[str, str]:
    model = await hold_model(request)  # leased: not unloaded while it is used
    n_vocab = model.info.n_vocab
    bad = [t for t in req.tokens if not 0 <= t < n_vocab]
    if bad:
        raise ApiError(400, f"token ids out of range 0..{n_vocab - 1}: {bad[:5]}")
    return {"text": model.tokenizer.detokenize(req.tokens, special=req.decode_special_tokens)}
