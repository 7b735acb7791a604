"""Splitting generated text into reasoning, content and tool-call channels as it streams.

`ChannelSplitter.feed(text)` takes each new piece of output and returns what can be shown now,
labelled by channel:

* REASONING: text between the reasoning start and end tags, or from the start
  of the output when the reply starts inside reasoning;
* CONTENT: everything else;
* TOOL: one complete tool-call block (the text between the tool format's start and end tags,
  plus the raw text with tags so a call that fails to parse can be shown as content).

Tags may arrive split over several pieces: text that could still be the beginning of a tag is
held back until it can't. `finish()` releases what is held at the end of generation (an
unclosed tool block comes out as a TOOL piece with `closed=False`). Tags themselves never
appear in REASONING or CONTENT.

Whole-reply formats (harmony, muse_glimmer) have their own splitters with the same two methods
(`TextSplitter`); see `kodkod.chat.tool_formats.addressed`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class Channel(enum.Enum):
    CONTENT = "content"
    REASONING = "reasoning"
    TOOL = "tool"


@dataclass(slots=True)
class Piece:
    channel: Channel
    text: str  # for TOOL: the text inside the tags
    raw: str = ""  # for TOOL: the block as generated, tags included
    closed: bool = True


@dataclass(frozen=True, slots=True)
class SplitterConfig:
    reasoning: tuple[str, str] | None = None  # (start tag, end tag); None: no reasoning split
    start_in_reasoning: bool = False
    tool: tuple[str, str | None] | None = None  # (start tag, end tag or None); None: no parsing
    tools_in_reasoning: bool = True


class TextSplitter(Protocol):
    """What turns one choice's output into labelled pieces as it streams."""

    def feed(self, text: str) -> list[Piece]: ...

    def finish(self) -> list[Piece]: ...


def holdback(buf: str, tags: list[str]) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of one of `tags`."""
    best = 0
    for tag in tags:
        for n in range(min(len(buf), len(tag) - 1), best, -1):
            if buf.endswith(tag[:n]):
                best = n
                break
    return best


class ChannelSplitter:
    __slots__ = ("_cfg", "_mode", "_return", "_held", "_tool", "_out")

    def __init__(self, config: SplitterConfig) -> None:
        self._cfg = config
        reasoning = config.reasoning is not None and config.start_in_reasoning
        self._mode = Channel.REASONING if reasoning else Channel.CONTENT
        self._return = Channel.CONTENT
        self._held = ""
        self._tool = ""
        self._out: list[Piece] = []

    def _tags(self) -> list[tuple[str, Channel]]:
        """Tags that change the channel from the current one, with where each leads."""
        cfg = self._cfg
        tags: list[tuple[str, Channel]] = []
        if self._mode is Channel.CONTENT:
            if cfg.reasoning is not None:
                tags.append((cfg.reasoning[0], Channel.REASONING))
            if cfg.tool is not None:
                tags.append((cfg.tool[0], Channel.TOOL))
        elif self._mode is Channel.REASONING:
            assert cfg.reasoning is not None
            tags.append((cfg.reasoning[1], Channel.CONTENT))
            if cfg.tool is not None and cfg.tools_in_reasoning:
                tags.append((cfg.tool[0], Channel.TOOL))
        return tags

    def _emit(self, channel: Channel, text: str) -> None:
        if not text:
            return
        last = self._out[-1] if self._out else None
        if last is not None and last.channel is channel and channel is not Channel.TOOL:
            last.text += text
        else:
            self._out.append(Piece(channel, text))

    def feed(self, text: str) -> list[Piece]:
        buf = self._held + text
        while buf:
            if self._mode is Channel.TOOL:
                assert self._cfg.tool is not None
                start, end = self._cfg.tool
                if end is None:
                    self._tool += buf
                    buf = ""
                    break
                i = buf.find(end)
                if i >= 0:
                    inner = self._tool + buf[:i]
                    self._out.append(Piece(Channel.TOOL, inner, start + inner + end))
                    self._tool = ""
                    buf = buf[i + len(end) :]
                    self._mode = self._return
                    continue
                keep = holdback(buf, [end])
                self._tool += buf[: len(buf) - keep]
                buf = buf[len(buf) - keep :]
                break
            tags = self._tags()
            hit_at, hit = -1, None
            for tag, target in tags:
                i = buf.find(tag)
                if i >= 0 and (hit_at < 0 or i < hit_at):
                    hit_at, hit = i, (tag, target)
            if hit is not None:
                self._emit(self._mode, buf[:hit_at])
                buf = buf[hit_at + len(hit[0]) :]
                if hit[1] is Channel.TOOL:
                    self._return = self._mode
                self._mode = hit[1]
                continue
            keep = holdback(buf, [t for t, _ in tags])
            self._emit(self._mode, buf[: len(buf) - keep])
            buf = buf[len(buf) - keep :]
            break
        self._held = buf
        out, self._out = self._out, []
        return out

    def finish(self) -> list[Piece]:
        """Everything still held, at the end of generation."""
        held, self._held = self._held, ""
        if self._mode is Channel.TOOL:
            assert self._cfg.tool is not None
            inner = self._tool + held
            self._tool = ""
            end = self._cfg.tool[1]
            closed = end is None  # a format without an end tag runs to the end
            self._out.append(Piece(Channel.TOOL, inner, self._cfg.tool[0] + inner, closed))
        else:
            self._emit(self._mode, held)
        out, self._out = self._out, []
        return out
