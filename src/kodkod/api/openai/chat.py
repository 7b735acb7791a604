"""POST /v1/chat/completions (reference §7.3–7.4, §8): template → prompt → engine → chunks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from kodkod.api.convert import build_generation, new_request_id, resolve_fields
from kodkod.api.deps import API
from kodkod.api.errors import ApiError
from kodkod.api.generation import SSE_DONE, collect, fan_in, sse, sse_ping, sse_response
from kodkod.api.openai.common import (
    finish_reason,
    inline_model,
    logprobs_chat,
    submit_all,
    usage_dict,
)
from kodkod.api.openai.schemas import ChatCompletionRequest
from kodkod.api.state import get_state
from kodkod.chat import strip_leading_bos
from kodkod.engine.types import ErrorEvent, FinishEvent, TokenEvent, Usage
from kodkod.models.manager import LoadedModel

router = APIRouter()


def template_variables(req: ChatCompletionRequest, model: LoadedModel) -> dict[str, Any]:
    """Template variables, low → high precedence (reference §8.2, E3 2026-07)."""
    extra = model.params.extra
    out: dict[str, Any] = dict(extra.get("template_vars_default") or {})
    if req.reasoning is not None:
        if req.reasoning.enabled is not None:
            out["enable_thinking"] = req.reasoning.enabled
        if req.reasoning.effort is not None:
            out["reasoning_effort"] = req.reasoning.effort
    for key in ("reasoning_effort", "enable_thinking", "verbosity"):
        value = getattr(req, key)
        if value is not None:
            out[key] = value
    out.update(req.template_vars)
    if extra.get("force_enable_thinking"):
        out["enable_thinking"] = True
    out.update(extra.get("template_vars_force") or {})
    return out


def render_prompt(req: ChatCompletionRequest, model: LoadedModel) -> tuple[str, list[int], list[str]]:
    """(prompt text, prompt ids, template stop strings) for a chat request."""
    template = model.template
    if template is None:
        raise ApiError(422, "no prompt template is set for the loaded model; switch one in with "
                            "/v1/template/switch or load the model with prompt_template")
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    info = model.info
    kwargs = dict(
        bos_token=info.bos_text, eos_token=info.eos_text, tools=tools, functions=req.functions,
        template_vars=template_variables(req, model),
    )
    if req.continue_final_message:
        if req.add_generation_prompt:
            raise ApiError(422, "continue_final_message needs add_generation_prompt: false")
        text = template.render_continuation(messages, **kwargs)
    else:
        text = template.render(messages, add_generation_prompt=req.add_generation_prompt, **kwargs)
    if req.response_prefix and (req.add_generation_prompt or req.continue_final_message):
        text += req.response_prefix
    text = strip_leading_bos(text, info.bos_text, add_bos_token=info.add_bos)
    ids = model.tokenizer.tokenize(text, add_bos=info.add_bos, parse_special=True)
    return text, ids, list(template.metadata().stop_strings)


@router.post("/v1/chat/completions", dependencies=[API])
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
    state = get_state(request)
    model = await inline_model(request, req.model)
    _, ids, template_stops = render_prompt(req, model)
    values = resolve_fields(req, state.overrides)
    want = bool(values["logprobs"]) or bool(values["top_logprobs"])
    logprobs = max(int(values["top_logprobs"] or 0), int(values["logprobs"] or 0) if values["logprobs"] > 1 else 0) if want else None
    rid = new_request_id()
    gens = [
        build_generation(f"{rid}-{k}", ids, values, model.info.n_vocab, logprobs=logprobs,
                         extra_stop=template_stops)
        for k in range(req.n)
    ]
    streams = submit_all(model, gens)
    created = int(time.time())
    if req.stream and not state.settings.developer.disable_request_streaming:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        ping_s = state.settings.network.sse_ping_interval or None
        return sse_response(_stream(streams, f"chatcmpl-{rid}", created, model.name, include_usage, ping_s))
    results = await collect(request, streams)
    choices = []
    total = Usage(0, 0)
    for i, (tokens, final) in enumerate(results):
        content = tokens.text
        choices.append({
            "index": i,
            "finish_reason": finish_reason(final),
            "stop_str": final.stop_str,
            "eos_reason": final.eos_reason.value,
            "message": {
                "role": "assistant",
                "content": content if content.strip() else None,
                "tool_calls": None,
                "reasoning_content": None,
                "tool_call_id": None,
            },
            "logprobs": logprobs_chat(tokens.logprobs) if logprobs is not None else None,
        })
        if i == 0:
            total.prompt_tokens = final.usage.prompt_tokens
            total.cached_tokens = final.usage.cached_tokens
            total.prompt_time_s = final.usage.prompt_time_s
        total.completion_tokens += final.usage.completion_tokens
        total.completion_time_s = max(total.completion_time_s, final.usage.completion_time_s)
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion",
        "created": created,
        "model": model.name,
        "choices": choices,
        "usage": usage_dict(total),
    }


async def _stream(
    streams: list, cid: str, created: int, model_name: str, include_usage: bool, ping_s: float | None
) -> AsyncIterator[str]:
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name}
    total = Usage(0, 0)
    for i in range(len(streams)):
        yield sse({**base, "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
        ]})
    async for index, events in fan_in(streams, ping_s):
        if index < 0:
            yield sse_ping()
            continue
        for ev in events:
            if isinstance(ev, TokenEvent):
                if ev.text or ev.logprobs:
                    yield sse({**base, "choices": [{
                        "index": index, "delta": {"content": ev.text}, "finish_reason": None,
                        "logprobs": logprobs_chat(ev.logprobs),
                    }]})
            elif isinstance(ev, FinishEvent):
                if index == 0:
                    total.prompt_tokens = ev.usage.prompt_tokens
                    total.cached_tokens = ev.usage.cached_tokens
                    total.prompt_time_s = ev.usage.prompt_time_s
                total.completion_tokens += ev.usage.completion_tokens
                total.completion_time_s = max(total.completion_time_s, ev.usage.completion_time_s)
                yield sse({**base, "choices": [{
                    "index": index, "delta": {}, "finish_reason": finish_reason(ev),
                    "stop_str": ev.stop_str, "logprobs": None,
                }]})
            elif isinstance(ev, ErrorEvent):
                yield sse({"error": {"message": ev.message, "trace": None}})
                return
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage_dict(total)})
    yield SSE_DONE
