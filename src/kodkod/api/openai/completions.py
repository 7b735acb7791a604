"""POST /v1/completions, streamed or not.

A prompt may be a string, a list of strings (each its own prompt, E3 behaviour), a list of
token ids or a list of token-id lists. Each prompt gets `n` choices; choice index is
prompt_index × n + k. Every choice is one engine request; they run concurrently in the batch and
share their prompt's KV through the prefix cache.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request

from kodkod.api.convert import (
    build_generation,
    new_request_id,
    resolve_fields,
    run_sized,
    tokenize_prompt,
)
from kodkod.api.deps import API
from kodkod.api.errors import stream_error
from kodkod.api.generation import SSE_DONE, sse
from kodkod.api.metrics.http import track_streams
from kodkod.api.openai.common import (
    add_usage,
    finish_reason,
    inline_model,
    logprobs_legacy,
    requested_logprobs,
    submit_all,
    usage_dict,
)
from kodkod.api.openai.constrain import output_spec, plan_constraint
from kodkod.api.openai.schemas import CompletionRequest
from kodkod.api.state import AppSettings, Presets
from kodkod.api.streaming import collect, event_stream
from kodkod.api.validation import check_choices, check_generation_limits
from kodkod.core.types import ErrorEvent, FinishEvent, TokenEvent, Usage

router = APIRouter()


def _items(req: CompletionRequest) -> list[Any]:
    """The prompts of a request: each a string or a list of token ids."""
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if p and all(isinstance(x, int) for x in p):
        return [p]
    return list(p)


def _prompts(req: CompletionRequest, model: Any, items: list[Any]) -> list[tuple[str, list[int]]]:
    """(text, ids) per prompt."""
    tok = model.tokenizer
    out = []
    for item in items:
        if isinstance(item, str):
            ids = tokenize_prompt(tok, item, add_bos=req.add_bos_token, bos_id=model.info.bos_id)
            out.append((item, ids))
        else:
            ids = [int(x) for x in item]
            out.append((tok.detokenize(ids, special=True), ids))
    return out


@router.post("/v1/completions", dependencies=[API])
async def completions(
    req: CompletionRequest, request: Request, settings: AppSettings, presets: Presets
) -> Any:
    limits = settings.limits
    items = _items(req)
    check_choices(len(items) * req.n, limits)
    model = await inline_model(request, req.model)
    values = resolve_fields(req, presets.active)
    check_generation_limits(values, limits)
    logprobs = requested_logprobs(values["logprobs"], values["top_logprobs"], chat=False)
    plan = await plan_constraint(model.tokenizer, model.grammar, output_spec(values, req.response_format))
    rid = new_request_id()
    size = sum(len(x) for x in items)
    prompts = await run_sized(size, limits.offload_tokenize_chars, lambda: _prompts(req, model, items))
    gens = []
    for pi, (_, ids) in enumerate(prompts):
        for k in range(req.n):
            gens.append(
                build_generation(
                    f"{rid}-{pi * req.n + k}",
                    ids,
                    values,
                    model.info.n_vocab,
                    logprobs=logprobs,
                    constraint=plan.new() if plan is not None else None,
                    choice=k,
                )
            )
    streams = await submit_all(model, gens, limits, settings.logging)
    track_streams(request, model.name, streams, choices_per_prompt=req.n)
    created = int(time.time())
    prefix = {i: (prompts[i // req.n][0] if req.echo else "") for i in range(len(gens))}
    if req.stream and not settings.developer.disable_request_streaming:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        ping_s = settings.network.sse_ping_interval or None
        base = {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model.name}
        return event_stream(streams, _CompletionFrames(base, prefix, include_usage, req.n), ping_s)
    results = await collect(request, streams)
    choices = []
    total = Usage(0, 0)
    for i, (tokens, final) in enumerate(results):
        choices.append(
            {
                "index": i,
                "text": prefix[i] + tokens.text,
                "finish_reason": finish_reason(final),
                "stop_str": final.stop_str,
                "eos_reason": final.eos_reason.value,
                "logprobs": logprobs_legacy(tokens.logprobs, len(prefix[i])) if logprobs else None,
            }
        )
        add_usage(total, final.usage, first=i % req.n == 0)
    return {
        "id": f"cmpl-{rid}",
        "object": "text_completion",
        "created": created,
        "model": model.name,
        "choices": choices,
        "usage": usage_dict(total),
    }


@dataclass(slots=True)
class _CompletionFrames:
    """The SSE chunks of a streamed completion (a `StreamSurface`)."""

    base: dict[str, Any]  # id, object, created, model
    prefix: dict[int, str]  # choice → echoed prompt
    include_usage: bool
    n: int  # choices per prompt
    offsets: dict[int, int] = field(default_factory=dict)  # choice → text offset (logprobs)
    total: Usage = field(default_factory=lambda: Usage(0, 0))

    def opening(self) -> Iterator[str]:
        for i, p in self.prefix.items():
            self.offsets[i] = len(p)
            if p:
                yield self._chunk({"index": i, "text": p, "finish_reason": None, "logprobs": None})

    def on_token(self, index: int, ev: TokenEvent) -> Iterator[str]:
        lp = logprobs_legacy(ev.logprobs, self.offsets[index]) if ev.logprobs else None
        self.offsets[index] += len(ev.text)
        if ev.text or lp:
            yield self._chunk({"index": index, "text": ev.text, "finish_reason": None, "logprobs": lp})

    def on_finish(self, index: int, ev: FinishEvent) -> Iterator[str]:
        add_usage(self.total, ev.usage, first=index % self.n == 0)
        yield self._chunk(
            {
                "index": index,
                "text": "",
                "finish_reason": finish_reason(ev),
                "stop_str": ev.stop_str,
                "eos_reason": ev.eos_reason.value,
                "logprobs": None,
            }
        )

    def on_error(self, index: int, ev: ErrorEvent) -> str:
        return sse(stream_error(ev.message))

    def closing(self) -> Iterator[str]:
        if self.include_usage:
            yield sse({**self.base, "choices": [], "usage": usage_dict(self.total)})
        yield SSE_DONE

    def _chunk(self, choice: dict[str, Any]) -> str:
        return sse({**self.base, "choices": [choice]})
