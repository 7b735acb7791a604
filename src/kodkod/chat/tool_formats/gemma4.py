"""`gemma4`: Google Gemma 4 tool calls.

Source of the syntax: the chat template published with the models (e.g.
https://huggingface.co/google/gemma-4-E2B-it, its `format_argument` macro) and Google's guide
https://ai.google.dev/gemma/docs/capabilities/text/function-calling-gemma4. Each call is
one block; the pipes are part of the (special-token) tags:

    <|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3,units:[<|"|>C<|"|>]}<tool_call|>

Arguments are written like JSON with bare keys and strings quoted by the `<|"|>` token; numbers,
`true`, `false`, `null`, lists and nested objects as in JSON. Reasoning sits between
`<|channel>thought` and `<channel|>`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from kodkod.chat.tools import ToolFormat

START = "<|tool_call>"
END = "<tool_call|>"
QUOTE = '<|"|>'

_CALL = re.compile(r"\s*call:\s*([^\s{]+)\s*\{")
_BARE = re.compile(r"[^\s,:{}\[\]]+")
_WORDS = {"true": True, "false": False, "null": None}


class _Syntax(ValueError):
    pass


class _Reader:
    """A recursive-descent reader of one argument object."""

    __slots__ = ("text", "pos")

    def __init__(self, text: str, pos: int) -> None:
        self.text = text
        self.pos = pos

    def _skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _peek(self) -> str:
        self._skip()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _expect(self, char: str) -> None:
        if self._peek() != char:
            raise _Syntax(f"expected {char!r} at {self.pos}")
        self.pos += 1

    def _quoted(self) -> str | None:
        self._skip()
        if self.text.startswith(QUOTE, self.pos):
            end = self.text.find(QUOTE, self.pos + len(QUOTE))
            if end < 0:
                raise _Syntax("unterminated string")
            value = self.text[self.pos + len(QUOTE) : end]
            self.pos = end + len(QUOTE)
            return value
        if self.text.startswith('"', self.pos):
            value, self.pos = json.JSONDecoder().raw_decode(self.text, self.pos)
            return str(value)
        return None

    def _bare(self) -> str:
        self._skip()
        m = _BARE.match(self.text, self.pos)
        if m is None:
            raise _Syntax(f"expected a value at {self.pos}")
        self.pos = m.end()
        return m.group(0)

    def value(self) -> Any:
        char = self._peek()
        if char == "{":
            return self.object_body(opened=False)
        if char == "[":
            self.pos += 1
            items: list[Any] = []
            while self._peek() != "]":
                items.append(self.value())
                if self._peek() == ",":
                    self.pos += 1
            self.pos += 1
            return items
        quoted = self._quoted()
        if quoted is not None:
            return quoted
        word = self._bare()
        if word in _WORDS:
            return _WORDS[word]
        try:
            return json.loads(word)
        except ValueError:
            raise _Syntax(f"not a value: {word!r}") from None

    def object_body(self, *, opened: bool) -> dict[str, Any]:
        if not opened:
            self._expect("{")
        out: dict[str, Any] = {}
        while self._peek() != "}":
            if not self._peek():
                raise _Syntax("unterminated object")
            quoted = self._quoted()
            key = quoted if quoted is not None else self._bare()
            self._expect(":")
            out[key] = self.value()
            if self._peek() == ",":
                self.pos += 1
        self.pos += 1
        return out


def parse(inner: str) -> list[tuple[str, Any]]:
    """One block's `call:NAME{...}` (none when it does not read)."""
    m = _CALL.match(inner)
    if m is None:
        return []
    try:
        args = _Reader(inner, m.end()).object_body(opened=True)
    except (_Syntax, ValueError):
        return []
    return [(m.group(1), args)]


FORMAT = ToolFormat(
    "gemma4",
    START,
    END,
    parse,
    reasoning=("<|channel>thought", "<channel|>"),
    special_tokens=True,
)
