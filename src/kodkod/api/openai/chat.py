"""POST /v1/chat/completions: template → prompt → engine → chunks.

Flow: normalise `tool_choice` → render the prompt (`chat_prompt`) → pick and compile the output
constraint (`constrain`: response_format, json_schema / regex_pattern / grammar_string, or a
forced tool call; else the reasoning budget, `reasoning`) → submit `n` engine requests (one
parser per choice) → split each choice's text into content, reasoning and tool calls
(`chat_output`) → one JSON body, or SSE chunks: a role chunk per choice, content / reasoning /
tool-call deltas, a finish chunk per choice (`finish_reason`, `stop_str`, `eos_reason`), the
usage chunk if asked, then `[DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request

from kodkod.api.convert import (
    build_generation,
    new_request_id,
    resolve_fields,
    run_sized,
)
from kodkod.api.deps import API
from kodkod.api.errors import stream_error
from kodkod.api.generation import SSE_DONE, sse
from kodkod.api.metrics.http import track_streams
from kodkod.api.openai.chat_output import ChoiceOutput, content_logprobs, content_logprobs_of
from kodkod.api.openai.chat_prompt import ChatPrompt, build_prompt
from kodkod.api.openai.common import (
    add_usage,
    finish_reason,
    inline_model,
    logprobs_chat,
    requested_logprobs,
    submit_all,
    usage_dict,
)
from kodkod.api.openai.constrain import output_spec, plan_constraint, tool_choice
from kodkod.api.openai.reasoning import budget_factory
from kodkod.api.openai.schemas import ChatCompletionRequest
from kodkod.api.state import AppSettings, Presets
from kodkod.api.streaming import collect, event_stream
from kodkod.api.validation import check_choices, check_generation_limits
from kodkod.core.types import ErrorEvent, FinishEvent, TokenEvent, TokenLogprob, Usage

router = APIRouter()


@router.post("/v1/chat/completions", dependencies=[API])
async def chat_completions(
    req: ChatCompletionRequest, request: Request, settings: AppSettings, presets: Presets
) -> Any:
    limits = settings.limits
    check_choices(req.n, limits)
    model = await inline_model(request, req.model)
    choice = tool_choice(req.tools, req.tool_choice)
    values = resolve_fields(req, presets.active)
    check_generation_limits(values, limits)
    prompt = await run_sized(
        _size_chars(req), limits.offload_tokenize_chars, lambda: build_prompt(req, model, choice)
    )
    if prompt.special_tokens:  # the format's tags are special tokens: they must come out as text
        values["skip_special_tokens"] = False
    spec = output_spec(values, req.response_format, (req.tools or [], choice) if choice.forced else None)
    split = prompt.split  # a reply that starts inside reasoning is constrained after it
    wait_for = split.reasoning[1] if split.reasoning and split.start_in_reasoning else None
    plan = await plan_constraint(model.tokenizer, model.grammar, spec, wait_for=wait_for)
    budget = budget_factory(req, model, split, constrained=plan is not None)
    logprobs = requested_logprobs(values["logprobs"], values["top_logprobs"], chat=True)
    rid = new_request_id()
    gens = [
        build_generation(
            f"{rid}-{k}",
            prompt.ids,
            values,
            model.info.n_vocab,
            logprobs=logprobs,
            extra_stop=prompt.stop_strings,
            constraint=plan.new() if plan is not None else None,
            processors=[budget()] if budget is not None else None,
            choice=k,
        )
        for k in range(req.n)
    ]
    streams = await submit_all(model, gens, limits, settings.logging)
    track_streams(request, model.name, streams)
    created = int(time.time())
    head = {"id": f"chatcmpl-{rid}", "created": created, "model": model.name}
    if req.stream and not settings.developer.disable_request_streaming:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        ping_s = settings.network.sse_ping_interval or None
        frames = _ChatFrames(head, prompt, len(streams), include_usage)
        return event_stream(streams, frames, ping_s)
    results = await collect(request, streams)
    choices = []
    total = Usage(0, 0)
    for i, (tokens, final) in enumerate(results):
        out = ChoiceOutput(prompt.split, prompt.tool_format, prompt.echo)
        out.feed(tokens.text)
        out.finish()
        choices.append(
            {
                "index": i,
                "finish_reason": out.finish_reason(finish_reason(final)),
                "stop_str": final.stop_str,
                "eos_reason": final.eos_reason.value,
                "message": out.message(),
                "logprobs": logprobs_chat(
                    content_logprobs_of(prompt.split, prompt.tool_format, tokens.logprobs or [])
                )
                if logprobs is not None
                else None,
            }
        )
        add_usage(total, final.usage, first=i == 0)
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage_dict(total)}


def _size_chars(req: ChatCompletionRequest) -> int:
    """Roughly how much text the template will render (decides where it runs)."""
    size = 0
    for m in req.messages:
        content = m.content
        size += len(content) if isinstance(content, str) else len(str(content or ""))
    return size + len(str(req.tools or ""))


class _ChatFrames:
    """The SSE chunks of a streamed chat completion (a `StreamSurface`): a role chunk per
    choice, deltas, a finish chunk per choice, the usage chunk if asked, then `[DONE]`."""

    __slots__ = ("_head", "_include_usage", "_outs", "_pending", "_prompt", "_total")

    def __init__(self, head: dict[str, Any], prompt: ChatPrompt, n: int, include_usage: bool) -> None:
        self._head = head
        self._prompt = prompt
        self._include_usage = include_usage
        self._outs = [ChoiceOutput(prompt.split, prompt.tool_format) for _ in range(n)]
        self._pending: list[list[TokenLogprob]] = [[] for _ in range(n)]  # of held-back text
        self._total = Usage(0, 0)

    def opening(self) -> Iterator[str]:
        for i, out in enumerate(self._outs):
            yield self._chunk(i, {"role": "assistant", "content": ""})
            if self._prompt.echo:
                out.content.append(self._prompt.echo)
                yield self._chunk(i, {"content": self._prompt.echo})

    def _deltas(self, index: int, deltas: list[dict[str, Any]]) -> Iterator[str]:
        for delta in deltas:
            yield self._chunk(index, delta, logprobs=content_logprobs(delta, self._pending[index]))
            self._pending[index] = []

    def on_token(self, index: int, ev: TokenEvent) -> Iterator[str]:
        if ev.logprobs:
            self._pending[index].extend(ev.logprobs)
        yield from self._deltas(index, self._outs[index].feed(ev.text))

    def on_finish(self, index: int, ev: FinishEvent) -> Iterator[str]:
        out = self._outs[index]
        yield from self._deltas(index, out.finish())
        add_usage(self._total, ev.usage, first=index == 0)
        yield self._chunk(
            index,
            {},
            finish=out.finish_reason(finish_reason(ev)),
            logprobs=self._pending[index],
            extra={"stop_str": ev.stop_str, "eos_reason": ev.eos_reason.value},
        )

    def on_error(self, index: int, ev: ErrorEvent) -> str:
        return sse(stream_error(ev.message))

    def closing(self) -> Iterator[str]:
        if self._include_usage:
            yield sse(
                {
                    **self._head,
                    "object": "chat.completion.chunk",
                    "choices": [],
                    "usage": usage_dict(self._total),
                }
            )
        yield SSE_DONE

    def _chunk(
        self,
        index: int,
        delta: dict[str, Any],
        *,
        finish: str | None = None,
        logprobs: list[TokenLogprob] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        choice: dict[str, Any] = {
            "index": index,
            "delta": delta,
            "finish_reason": finish,
            "logprobs": logprobs_chat(logprobs) if logprobs else None,
        }
        if extra:
            choice.update(extra)
        return sse({**self._head, "object": "chat.completion.chunk", "choices": [choice]})
