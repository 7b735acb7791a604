"""`muse_glimmer` (alias `glimmer`): the reply format of Meta's Muse Glimmer models.

Source of the syntax: the chat template of meta-models/Muse-Glimmer-30B on Hugging Face
(https://huggingface.co/meta-models/Muse-Glimmer-30B). A reply is a
sequence of messages addressed to a recipient, ATEM blocks for tool calls:

    <|start|>assistant to=self<|message|>reasoning<|eom|>
    <|start|>assistant to=get_weather<|message|><atem:function_calls>
    <atem:invoke name="get_weather">
    <atem:parameter name="city">Paris</atem:parameter>
    </atem:invoke>
    </atem:function_calls><|eot|>

`to=self` is reasoning, `to=user` (or no recipient) is content, any other recipient is a tool
call. `<|eom|>` and `<|eot|>` end a message. Parameter values are decoded as JSON when they
parse (numbers, lists, objects), else kept as the string written. The name in `<atem:invoke>`
is the call's name (the recipient repeats it).

The message tags are special tokens: the output is decoded with special tokens.
"""

from __future__ import annotations

import re
from typing import Any

from kodkod.chat.channels import Channel, SplitterConfig, TextSplitter
from kodkod.chat.tool_formats.addressed import AddressedSplitter, MessageSyntax
from kodkod.chat.tools import ToolFormat, json_value

START = "<|start|>"
MESSAGE = "<|message|>"
ENDS = ("<|eom|>", "<|eot|>")
# Special tokens that identify a Muse Glimmer vocabulary.
SIGNATURE = ("<|start|>", "<|message|>", "<|eom|>", "<|eot|>")

_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_INVOKE = re.compile(r'<atem:invoke name="([^"]+)">(.*?)(?:</atem:invoke>|(?=<atem:invoke )|$)', re.S)
_PARAM = re.compile(r'<atem:parameter name="([^"]+)">(.*?)</atem:parameter>', re.S)


def route(header: str) -> Channel:
    recipient = _RECIPIENT.search(header)
    if recipient is None or recipient.group(1) == "user":
        return Channel.CONTENT
    return Channel.REASONING if recipient.group(1) == "self" else Channel.TOOL


SYNTAX = MessageSyntax(START, MESSAGE, ENDS, route)


def splitter(config: SplitterConfig) -> TextSplitter:
    return AddressedSplitter(SYNTAX, config)


def parse(text: str) -> list[tuple[str, Any]]:
    """The `<atem:invoke>` blocks of one tool message (none when there is no block)."""
    return [
        (m.group(1), {k: json_value(v) for k, v in _PARAM.findall(m.group(2))})
        for m in _INVOKE.finditer(text)
    ]


FORMAT = ToolFormat("muse_glimmer", START, None, parse, special_tokens=True, splitter=splitter)
