"""`harmony`: the reply format of OpenAI's gpt-oss models.

Source of the syntax: "OpenAI Harmony Response Format",
https://cookbook.openai.com/articles/openai-harmony (openai/openai-cookbook,
articles/openai-harmony.md). A reply is a sequence of messages:

    <|channel|>analysis<|message|>chain of thought<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>
    {"city": "Paris"}<|call|>
    <|start|>assistant<|channel|>final<|message|>The answer.<|return|>

(the call is one line, broken here to fit). The `analysis` channel is reasoning; `final` (and
`commentary` without a recipient, a preamble meant for the user) is content; a message with a
recipient (`to=functions.NAME`, also allowed before the channel: `assistant to=functions.NAME
<|channel|>commentary json<|message|>`) is a tool call whose body is the JSON arguments.
`<|call|>`, `<|return|>` and `<|end|>` end a message.

These tags are special tokens: the output is decoded with special tokens so they can be seen.
The channel syntax is parsed here directly; the `openai-harmony` package would need to download
its tokenizer file at run time.
"""

from __future__ import annotations

import json
import re
from typing import Any

from kodkod.chat.channels import Channel, SplitterConfig, TextSplitter
from kodkod.chat.tool_formats.addressed import AddressedSplitter, MessageSyntax
from kodkod.chat.tools import ToolFormat

START = "<|start|>"
MESSAGE = "<|message|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>")
# Special tokens that identify a harmony vocabulary.
SIGNATURE = ("<|channel|>", "<|message|>", "<|call|>", "<|return|>")

_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_CHANNEL = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")


def route(header: str) -> Channel:
    if _RECIPIENT.search(header):
        return Channel.TOOL
    channel = _CHANNEL.search(header)
    if channel is not None and channel.group(1) == "analysis":
        return Channel.REASONING
    return Channel.CONTENT


SYNTAX = MessageSyntax(START, MESSAGE, ENDS, route)


def splitter(config: SplitterConfig) -> TextSplitter:
    return AddressedSplitter(SYNTAX, config)


def parse(text: str) -> list[tuple[str, Any]]:
    """`HEADER<|message|>JSON` → one call (none when the body is not a JSON object)."""
    header, sep, body = text.partition(MESSAGE)
    recipient = _RECIPIENT.search(header)
    if not sep or recipient is None:
        return []
    name = recipient.group(1).removeprefix("functions.")
    try:
        args = json.loads(body.strip())
    except ValueError:
        return []
    return [(name, args)] if name and isinstance(args, dict) else []


FORMAT = ToolFormat("harmony", START, None, parse, special_tokens=True, splitter=splitter)
