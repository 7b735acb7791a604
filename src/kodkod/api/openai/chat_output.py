"""One chat choice's output: text → content / reasoning_content / tool_calls, streamed or whole.

`ChoiceOutput.feed(text)` runs new text through a `ChannelSplitter` (or the tool format's own
splitter, for whole-reply formats such as harmony) and returns OpenAI `delta`
dicts (`{"content"}`, `{"reasoning_content"}`, `{"tool_calls": [...]}`); `finish()` flushes
what was held back. A completed tool block is parsed with the model's tool format and streamed
as one `tool_calls` delta per call (`index`, `id`, `type`, full `function`); tool text that
does not parse is shown as content. The accumulated results make the non-streamed `message`.

Logprobs cover the content phase only (as in current TabbyAPI): a token's logprob waits
until its text comes out, goes with a content delta, and is dropped with reasoning or tool text.
"""

from __future__ import annotations

from typing import Any

from kodkod.chat.channels import Channel, ChannelSplitter, Piece, SplitterConfig, TextSplitter
from kodkod.chat.tools import ToolCall, ToolFormat, parse_tool_calls
from kodkod.core.types import TokenLogprob


class ChoiceOutput:
    __slots__ = ("_splitter", "_fmt", "content", "reasoning", "tool_calls")

    def __init__(self, split: SplitterConfig, fmt: ToolFormat, echo: str = "") -> None:
        self._splitter: TextSplitter = fmt.splitter(split) if fmt.splitter else ChannelSplitter(split)
        self._fmt = fmt
        self.content: list[str] = [echo] if echo else []
        self.reasoning: list[str] = []
        self.tool_calls: list[ToolCall] = []

    def _deltas(self, pieces: list[Piece]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for piece in pieces:
            if piece.channel is Channel.REASONING:
                self.reasoning.append(piece.text)
                out.append({"reasoning_content": piece.text})
                continue
            if piece.channel is Channel.TOOL:
                calls = parse_tool_calls(self._fmt, piece.text) if piece.closed else []
                if calls:
                    first = len(self.tool_calls)
                    self.tool_calls.extend(calls)
                    out.append({"tool_calls": [c.to_openai(first + k) for k, c in enumerate(calls)]})
                    continue
                text = piece.raw
            else:
                text = piece.text
            self.content.append(text)
            if out and "content" in out[-1]:
                out[-1]["content"] += text
            else:
                out.append({"content": text})
        return out

    def feed(self, text: str) -> list[dict[str, Any]]:
        return self._deltas(self._splitter.feed(text)) if text else []

    def finish(self) -> list[dict[str, Any]]:
        return self._deltas(self._splitter.finish())

    def finish_reason(self, engine_reason: str) -> str:
        return "tool_calls" if self.tool_calls else engine_reason

    def message(self) -> dict[str, Any]:
        """The non-streamed `message` (content null when empty or whitespace)."""
        content = "".join(self.content)
        reasoning = "".join(self.reasoning)
        return {
            "role": "assistant",
            "content": content if content.strip() else None,
            "reasoning_content": reasoning or None,
            "tool_calls": [c.to_openai() for c in self.tool_calls] or None,
            "tool_call_id": None,
        }


def content_logprobs(delta: dict[str, Any], pending: list[TokenLogprob]) -> list[TokenLogprob] | None:
    """The logprobs that go with `delta`: for content, the pending tokens that made its text
    (the last ones; earlier pending tokens were tags or reasoning); else none."""
    text = delta.get("content")
    if not text:
        return None
    covered, keep = 0, 0
    for lp in reversed(pending):
        if covered >= len(text):
            break
        covered += len(lp.token)
        keep += 1
    return pending[len(pending) - keep :]


def content_logprobs_of(
    split: SplitterConfig, fmt: ToolFormat, logprobs: list[TokenLogprob]
) -> list[TokenLogprob]:
    """A whole choice's content-phase logprobs, replaying its tokens through the splitter."""
    out = ChoiceOutput(split, fmt)
    kept: list[TokenLogprob] = []
    pending: list[TokenLogprob] = []
    for lp in logprobs:
        pending.append(lp)
        for delta in out.feed(lp.token):
            kept += content_logprobs(delta, pending) or []
            pending = []
    for delta in out.finish():
        kept += content_logprobs(delta, pending) or []
        pending = []
    return kept + pending  # tokens that showed no text at the end (a stop token)
