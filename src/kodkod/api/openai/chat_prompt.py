"""From a chat request to a prompt: template variables, tools, rendering, BOS, reasoning start.

`build_prompt()` renders the conversation with the model's chat template:
template variables by precedence, `tools` handed to the template — and, when the
template ignores them, a hermes-style tools block in the system prompt plus earlier calls and
results written into the messages (`chat.tools`) — `continue_final_message`, `response_prefix`,
BOS stripping and tokenization. It also decides how the output is split: the tool-call format
(a whole-reply format -- harmony, muse_glimmer -- when the model's settings or its special tokens
say so; it supersedes `reasoning` and `tool_format`), reasoning tags (the format's own when
`reasoning` is on with the default tags) and whether the reply starts inside reasoning, and
whether output is decoded with special tokens (formats whose tags are special tokens).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kodkod.api.errors import ApiError
from kodkod.api.openai.constrain import ToolChoice
from kodkod.api.openai.schemas import ChatCompletionRequest
from kodkod.chat import strip_leading_bos
from kodkod.chat.channels import SplitterConfig
from kodkod.chat.messages import dropped_parts, flatten_content
from kodkod.chat.tool_formats import has_special_token, reply_format, tool_format
from kodkod.chat.tools import (
    ToolFormat,
    add_tools_system_prompt,
    inline_tool_history,
    template_renders,
)
from kodkod.models.manager import LoadedModel

log = logging.getLogger(__name__)

# How far from the end of the prompt an unclosed reasoning start tag still counts (reasoning `auto` mode).
REASONING_LOOKBACK_CHARS = 512
DEFAULT_REASONING_TAGS = ("<think>", "</think>")


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    text: str
    ids: list[int]
    stop_strings: list[str]
    split: SplitterConfig
    tool_format: ToolFormat
    echo: str  # what `echo` puts before the generated content
    special_tokens: bool = False  # decode the output with special tokens (the format's tags are)


def template_variables(req: ChatCompletionRequest, model: LoadedModel) -> dict[str, Any]:
    """Template variables, low → high precedence (TabbyAPI's order since July 2026)."""
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


def _messages(req: ChatCompletionRequest, source: str, choice: ToolChoice) -> list[dict[str, Any]]:
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    uses_tools = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if uses_tools and not template_renders(source, "tool_calls"):
        messages = inline_tool_history(messages)
    if req.tools and choice.mode != "none" and not template_renders(source, "tools"):
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
        messages = add_tools_system_prompt(messages, tools)
    return messages


def _starts_in_reasoning(prompt: str, start: str, end: str, mode: str) -> bool:
    if mode == "always":
        return True
    if mode == "never":
        return False
    tail = prompt[-REASONING_LOOKBACK_CHARS:]
    opened = tail.rfind(start)
    return opened >= 0 and tail.rfind(end) < opened


def model_tool_format(model: LoadedModel) -> ToolFormat:
    """The format the model writes: harmony / muse_glimmer when set or detected, else `tool_format`."""
    extra = model.params.extra
    reply = reply_format(extra, lambda text: has_special_token(model.tokenizer, text))
    return tool_format(reply or extra.get("tool_format"))


def split_config(
    model: LoadedModel, prompt: str, fmt: ToolFormat, model_fmt: ToolFormat, choice: ToolChoice
) -> SplitterConfig:
    """How a reply is split: `fmt` parses calls; `model_fmt` (the model's own) gives reasoning tags."""
    extra = model.params.extra
    reasoning: tuple[str, str] | None = None
    starts_inside = False
    if extra.get("reasoning") and model_fmt.splitter is None:
        start = str(extra.get("reasoning_start_token") or "<think>")
        end = str(extra.get("reasoning_end_token") or "</think>")
        if model_fmt.reasoning is not None and (start, end) == DEFAULT_REASONING_TAGS:
            start, end = model_fmt.reasoning
        reasoning = (start, end)
        starts_inside = _starts_in_reasoning(
            prompt, start, end, str(extra.get("start_in_reasoning") or "auto")
        )
    return SplitterConfig(
        reasoning=reasoning,
        start_in_reasoning=starts_inside,
        tool=None if not choice.parse else (fmt.start, None if choice.forced else fmt.end),
        tools_in_reasoning=bool(extra.get("tool_calls_in_reasoning", True)),
    )


def _warn_dropped(messages: list[dict[str, Any]]) -> None:
    """Non-text parts (image_url, …) are left out, as TabbyAPI does without vision — said in
    the log once per request, never silently (the parts themselves are not logged)."""
    dropped = dropped_parts(messages)
    if dropped:
        parts = ", ".join(f"{n} {kind}" for kind, n in sorted(dropped.items()))
        log.warning(
            "chat request: dropped content parts the model cannot read (%s): this server has no "
            "vision or audio input; only the text parts reach the model",
            parts,
        )


def build_prompt(req: ChatCompletionRequest, model: LoadedModel, choice: ToolChoice) -> ChatPrompt:
    template = model.template
    if template is None:
        raise ApiError(
            422,
            "no prompt template is set for the loaded model; switch one in with "
            "/v1/template/switch or load the model with prompt_template",
        )
    if req.continue_final_message and req.add_generation_prompt:
        raise ApiError(422, "continue_final_message needs add_generation_prompt: false")
    _warn_dropped([{"content": m.content} for m in req.messages])
    messages = _messages(req, template.source, choice)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    info = model.info
    kwargs: dict[str, Any] = dict(
        bos_token=info.bos_text,
        eos_token=info.eos_text,
        tools=tools,
        functions=req.functions,
        template_vars=template_variables(req, model),
    )
    if req.continue_final_message:
        text = template.render_continuation(messages, **kwargs)
    else:
        text = template.render(messages, add_generation_prompt=req.add_generation_prompt, **kwargs)
    if req.response_prefix and (req.add_generation_prompt or req.continue_final_message):
        text += req.response_prefix
    text = strip_leading_bos(text, info.bos_text, add_bos_token=info.add_bos)
    ids = model.tokenizer.tokenize(text, add_bos=info.add_bos, parse_special=True)
    # A forced call is generated by our grammar in hermes syntax; it runs to the end of the
    # output, so an end tag inside a JSON string cannot cut it short.
    model_fmt = model_tool_format(model)
    fmt = tool_format(None) if choice.forced else model_fmt
    echo = ""
    if req.echo and req.messages and req.messages[-1].role == "assistant":
        echo = str(flatten_content(req.messages[-1].content))
    return ChatPrompt(
        text=text,
        ids=ids,
        stop_strings=list(template.metadata().stop_strings),
        split=split_config(model, text, fmt, model_fmt, choice),
        tool_format=fmt,
        echo=echo,
        special_tokens=model_fmt.special_tokens,
    )
