"""`deepseek_v4` (alias `dsv4`): DeepSeek-V4's DSML tool calls.

Source of the syntax: the chat encoding published with the model,
https://huggingface.co/deepseek-ai/DeepSeek-V4-Pro, `encoding/encoding_dsv4.py` and
`encoding/README.md`. A reply's calls come in one block:

    <｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

`string="true"` values are taken as written; `string="false"` values are JSON (kept as text
if they do not parse). Reasoning sits between `<think>` and `</think>`.
"""

from __future__ import annotations

import re
from typing import Any

from kodkod.chat.tools import ToolFormat, json_value

START = "<｜DSML｜tool_calls>"
END = "</｜DSML｜tool_calls>"

_INVOKE = re.compile(r'<｜DSML｜invoke name="([^"]*)">(.*?)</｜DSML｜invoke>', re.S)
_PARAM = re.compile(
    r'<｜DSML｜parameter name="([^"]*)" string="(true|false)">(.*?)</｜DSML｜parameter>', re.S
)


def parse(inner: str) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []
    for invoke in _INVOKE.finditer(inner):
        name = invoke.group(1).strip()
        if not name:
            continue
        args = {
            key: value if is_string == "true" else json_value(value)
            for key, is_string, value in _PARAM.findall(invoke.group(2))
        }
        calls.append((name, args))
    return calls


FORMAT = ToolFormat("deepseek_v4", START, END, parse, reasoning=("<think>", "</think>"), special_tokens=True)
