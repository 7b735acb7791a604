"""`hy3` (alias `hy_v3`): Tencent Hunyuan 3 tool calls.

Source of the syntax: the chat template published with the model,
https://huggingface.co/tencent/Hy3 (`chat_template.jinja`; its `HYTK` suffix is `:opensource`).
Every tag is one added token carrying that suffix:

    <tool_calls:opensource>
    <tool_call:opensource>get_weather<tool_sep:opensource>
    <arg_key:opensource>city</arg_key:opensource>
    <arg_value:opensource>Paris</arg_value:opensource>
    </tool_call:opensource>
    </tool_calls:opensource>

Parallel calls are several `<tool_call:opensource>` blocks in one `<tool_calls:opensource>`.
String values are written raw, other types as JSON: values are decoded as JSON when they parse,
else kept as strings. Reasoning sits between `<think:opensource>` and `</think:opensource>`.
"""

from __future__ import annotations

import re
from typing import Any

from kodkod.chat.tools import ToolFormat, json_value

START = "<tool_calls:opensource>"
END = "</tool_calls:opensource>"

_CALL = re.compile(r"<tool_call:opensource>(.*?)</tool_call:opensource>", re.S)
_ARG = re.compile(
    r"<arg_key:opensource>(.*?)</arg_key:opensource>\s*<arg_value:opensource>(.*?)</arg_value:opensource>",
    re.S,
)


def parse(inner: str) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []
    for call in _CALL.finditer(inner):
        body = call.group(1)
        name, sep, _ = body.partition("<tool_sep:opensource>")
        if not sep:
            name = body.split("<arg_key:opensource>", 1)[0]
        name = name.strip()
        if not name:
            continue
        calls.append((name, {k.strip(): json_value(v) for k, v in _ARG.findall(body)}))
    return calls


FORMAT = ToolFormat(
    "hy3",
    START,
    END,
    parse,
    reasoning=("<think:opensource>", "</think:opensource>"),
    special_tokens=True,
)
