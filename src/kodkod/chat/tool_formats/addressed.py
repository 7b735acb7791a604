"""Streaming splitter for replies made of addressed messages (harmony, muse_glimmer).

Some models write their whole reply as a sequence of messages, each with a header that says
where it goes, a body, and an end marker:

    <|start|>HEADER<|message|>BODY<|end|>

(the first `<|start|>` and the role are usually in the prompt already, so the output starts
inside the first header). `AddressedSplitter` follows that structure as text streams in: a
header is held until its `<|message|>` tag, then `MessageSyntax.route` decides from it whether
the body is REASONING, CONTENT or a TOOL call. Reasoning and content bodies stream out as they
come (holding back only what could still be the start of an end tag); a tool message is
collected and comes out whole as one TOOL piece whose text is `HEADER<|message|>BODY`, for the
format's `parse()`. Tags never appear in the output.

A tool message may end without its end tag, because that tag is often an end-of-generation
token whose text never reaches us: `finish()` releases it as a complete call. When tool calls
are not parsed (`tool_choice: "none"`), a tool message is shown as content, header included.
Text that never forms a header (`MAX_HEADER_CHARS` without a `<|message|>` tag) is shown as
content, so output from a model that does not follow the format is not lost.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from kodkod.chat.channels import Channel, Piece, SplitterConfig, holdback

# How long a header may grow before the text is taken to be plain content instead.
MAX_HEADER_CHARS = 256


@dataclass(frozen=True, slots=True)
class MessageSyntax:
    start: str  # opens a message: "<|start|>"
    message: str  # ends the header and opens the body: "<|message|>"
    ends: tuple[str, ...]  # end a body
    route: Callable[[str], Channel]  # header (start tag removed) → where the body goes


class _Mode(enum.Enum):
    HEADER = "header"
    BODY = "body"


class AddressedSplitter:
    """A `TextSplitter` for one reply in an addressed-message format."""

    __slots__ = ("_syntax", "_parse_tools", "_mode", "_held", "_header", "_body", "_route", "_seen", "_out")

    def __init__(self, syntax: MessageSyntax, config: SplitterConfig) -> None:
        self._syntax = syntax
        self._parse_tools = config.tool is not None
        self._mode = _Mode.HEADER
        self._held = ""  # text that could still be the start of a tag
        self._header = ""
        self._body = ""  # a tool message's body so far
        self._route = Channel.CONTENT
        self._seen = False  # a header has been completed
        self._out: list[Piece] = []

    def _emit(self, channel: Channel, text: str) -> None:
        if not text:
            return
        last = self._out[-1] if self._out else None
        if last is not None and last.channel is channel and channel is not Channel.TOOL:
            last.text += text
        else:
            self._out.append(Piece(channel, text))

    def _end_tool(self, closed: bool) -> None:
        text = self._header + self._syntax.message + self._body
        if self._parse_tools:
            self._out.append(Piece(Channel.TOOL, text, self._syntax.start + text, closed))
        else:
            self._emit(Channel.CONTENT, text)
        self._body = ""

    def _feed_header(self, buf: str) -> str:
        syntax = self._syntax
        buf = self._header + buf
        self._header = ""
        i = buf.find(syntax.message)
        if i >= 0:
            self._header = buf[:i].replace(syntax.start, "")
            self._route = syntax.route(self._header)
            self._mode = _Mode.BODY
            self._seen = True
            return buf[i + len(syntax.message) :]
        keep = holdback(buf, [syntax.message])
        header = buf[: len(buf) - keep]
        if len(header) > MAX_HEADER_CHARS:  # not this format: plain text
            self._route = Channel.CONTENT
            self._mode = _Mode.BODY
            self._header = ""
            return buf.replace(syntax.start, "")
        self._header = header
        self._held = buf[len(buf) - keep :]
        return ""

    def _feed_body(self, buf: str) -> str:
        tags = [*self._syntax.ends, self._syntax.start]
        hit_at, hit = -1, ""
        for tag in tags:
            i = buf.find(tag)
            if i >= 0 and (hit_at < 0 or i < hit_at):
                hit_at, hit = i, tag
        if hit_at < 0:
            keep = holdback(buf, tags)
            self._body_text(buf[: len(buf) - keep])
            self._held = buf[len(buf) - keep :]
            return ""
        self._body_text(buf[:hit_at])
        if self._route is Channel.TOOL:
            self._end_tool(closed=True)
        self._mode = _Mode.HEADER
        self._header = ""
        return buf[hit_at + len(hit) :]

    def _body_text(self, text: str) -> None:
        if self._route is Channel.TOOL:
            self._body += text
        else:
            self._emit(self._route, text)

    def feed(self, text: str) -> list[Piece]:
        buf = self._held + text
        self._held = ""
        while buf:
            buf = self._feed_header(buf) if self._mode is _Mode.HEADER else self._feed_body(buf)
        out, self._out = self._out, []
        return out

    def finish(self) -> list[Piece]:
        """Everything still held, at the end of generation."""
        held, self._held = self._held, ""
        if self._mode is _Mode.BODY:
            self._body_text(held)
            if self._route is Channel.TOOL:
                self._end_tool(closed=True)  # its end tag was the stop token
        elif not self._seen:  # never a complete header: the text was plain content
            self._emit(Channel.CONTENT, (self._header + held).replace(self._syntax.start, ""))
        self._header = ""
        out, self._out = self._out, []
        return out
