"""Pieces shared by the OpenAI endpoints: response fragments, logprobs shapes, model choice."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request

from kodkod.api.admin.inline import model_for_request
from kodkod.api.request_log import log_generation
from kodkod.api.validation import check_queue
from kodkod.core.types import (
    FinishEvent,
    FinishReason,
    GenerationRequest,
    TokenLogprob,
    Usage,
)
from kodkod.engine.client import RequestError
from kodkod.engine.stream import RequestStream
from kodkod.models.manager import LoadedModel
from kodkod.settings import LimitsSettings
from kodkod.settings.sections import LoggingSettings

log = logging.getLogger(__name__)

LOGPROB_FLOOR = -1000.0  # how -inf is reported (a JSON number, as TabbyAPI does)


def finish_reason(ev: FinishEvent) -> str:
    if ev.reason is FinishReason.LENGTH:
        return "length"
    if ev.reason is FinishReason.TOOL_CALLS:
        return "tool_calls"
    return "stop"


def _per_sec(tokens: int, seconds: float) -> float | str:
    return round(tokens / seconds, 2) if seconds > 0 else "Indeterminate"


def usage_dict(u: Usage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "prompt_time": round(u.prompt_time_s, 4),
        "prompt_tokens_per_sec": _per_sec(u.prompt_tokens - u.cached_tokens, u.prompt_time_s),
        "completion_time": round(u.completion_time_s, 4),
        "completion_tokens_per_sec": _per_sec(u.completion_tokens, u.completion_time_s),
        "total_time": round(u.prompt_time_s + u.completion_time_s, 4),
    }
    if u.drafted_tokens:
        out["drafted_tokens"] = u.drafted_tokens
        out["accepted_draft_tokens"] = u.accepted_draft_tokens
    return out


def add_usage(total: Usage, u: Usage, *, first: bool) -> None:
    """Sum one choice into a request's usage. `first`: the first choice of its prompt — each
    prompt counts once (n>1 choices share it; a completions list of prompts sums them)."""
    if first:
        total.prompt_tokens += u.prompt_tokens
        total.cached_tokens += u.cached_tokens
        total.prompt_time_s = max(total.prompt_time_s, u.prompt_time_s)
    total.completion_tokens += u.completion_tokens
    total.completion_time_s = max(total.completion_time_s, u.completion_time_s)
    total.drafted_tokens += u.drafted_tokens
    total.accepted_draft_tokens += u.accepted_draft_tokens


def requested_logprobs(logprobs: int | None, top_logprobs: int | None, *, chat: bool) -> int | None:
    """How many alternatives per token the engine should report (None: no logprobs).

    Completions: `logprobs: N` (N > 0) asks for N alternatives. Chat: `logprobs: true` turns
    them on with `top_logprobs` alternatives; an integer `logprobs` > 1 counts as top_logprobs.
    """
    n_log = int(logprobs or 0)
    n_top = int(top_logprobs or 0)
    if not chat:
        return max(n_log, n_top) if n_log > 0 else None
    if n_log <= 0 and n_top <= 0:
        return None
    return max(n_top, n_log if n_log > 1 else 0)


def _clamp(v: float) -> float:
    return v if v > LOGPROB_FLOOR else LOGPROB_FLOOR


def logprobs_legacy(items: list[TokenLogprob] | None, offset: int) -> dict[str, Any] | None:
    """The completions logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    if not items:
        return None
    tokens, values, tops, offsets = [], [], [], []
    pos = offset
    for it in items:
        tokens.append(it.token)
        values.append(it.logprob)
        tops.append({text: _clamp(lp) for _, text, lp in it.top} if it.top else None)
        offsets.append(pos)
        pos += len(it.token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def logprobs_chat(items: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if not items:
        return None
    return {
        "content": [
            {
                "token": it.token,
                "token_id": it.token_id,
                "logprob": it.logprob,
                "bytes": list(it.token.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": text,
                        "token_id": tid,
                        "logprob": _clamp(lp),
                        "bytes": list(text.encode("utf-8")),
                    }
                    for tid, text, lp in it.top
                ],
            }
            for it in items
        ]
    }


async def submit_all(
    model: LoadedModel,
    gens: list[GenerationRequest],
    limits: LimitsSettings,
    log_settings: LoggingSettings | None = None,
) -> list[RequestStream]:
    """Submit every choice; if one is refused, the others are withdrawn. 429 when the engine's
    waiting queue is full (checked and submitted with no await in between). Each is logged as
    `log_settings` ask (kodkod.api.request_log)."""
    for g in gens[:1]:
        await model.engine.prepare(g)  # slow checks (first use of an adapter) off the loop
    check_queue(model.engine, len(gens), limits)
    streams: list[RequestStream] = []
    try:
        for g in gens:
            streams.append(model.engine.submit(g, stall_timeout_s=limits.stalled_stream_timeout_s))
    except RequestError:
        for s in streams:
            s.close()
        raise
    if log_settings is not None:
        for g, s in zip(gens, streams, strict=True):
            log_generation(log_settings, g, s, model.tokenizer)
    return streams


async def inline_model(request: Request, name: str | None) -> LoadedModel:
    """The model a request runs on (inline loading by the `model` field),
    leased until the HTTP exchange ends (see kodkod.api.admin.inline)."""
    return await model_for_request(request, name)
