"""Tool calling pieces without a model: formats, parsing, streaming channel split, prompting."""

from __future__ import annotations

import json
import re

import pytest

from kodkod.chat.channels import Channel, ChannelSplitter, SplitterConfig
from kodkod.chat.tool_formats import tool_format
from kodkod.chat.tools import (
    add_tools_system_prompt,
    call_schema,
    inline_tool_history,
    new_tool_call_id,
    parse_tool_calls,
    template_renders,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now", "description": "Time"}},
]


def test_tool_call_id_shape() -> None:
    ids = {new_tool_call_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)


@pytest.mark.parametrize(
    ("fmt", "inner", "expected"),
    [
        (
            "hermes",
            '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n',
            [("get_weather", {"city": "Paris"})],
        ),
        (
            "hermes",
            '{"name": "a", "parameters": {"x": 1}} {"name": "b", "arguments": {}}',
            [("a", {"x": 1}), ("b", {})],
        ),
        ("hermes", '[{"name": "a", "arguments": {"x": [1, 2]}}]', [("a", {"x": [1, 2]})]),
        (
            "qwen3_coder",
            "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
            "<parameter=days>\n3\n</parameter>\n</function>",
            [("get_weather", {"city": "Paris", "days": 3})],
        ),
        (
            "glm4_6",
            "get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>",
            [("get_weather", {"city": "Paris"})],
        ),
        (
            "minimax_m2",
            '<invoke name="get_weather"><parameter name="city">Paris</parameter></invoke>',
            [("get_weather", {"city": "Paris"})],
        ),
        (
            "mistral",
            '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
            [("get_weather", {"city": "Paris"})],
        ),
        ("mistral", 'get_weather[ARGS]{"city": "Paris"}', [("get_weather", {"city": "Paris"})]),
    ],
)
def test_parse_formats(fmt: str, inner: str, expected: list[tuple[str, dict]]) -> None:
    calls = parse_tool_calls(tool_format(fmt), inner)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == expected


@pytest.mark.parametrize("inner", ["", "not json", '{"arguments": {}}', "{broken"])
def test_parse_failures_give_no_calls(inner: str) -> None:
    assert parse_tool_calls(tool_format(None), inner) == []


def test_unknown_format_falls_back_to_hermes() -> None:
    assert tool_format("no-such-format").name == "hermes"
    assert tool_format("qwen3_5").name == "qwen3_coder"


def _split(cfg: SplitterConfig, pieces: list[str]) -> list[tuple[Channel, str]]:
    splitter = ChannelSplitter(cfg)
    out = []
    for p in [*pieces, None]:
        got = splitter.feed(p) if p is not None else splitter.finish()
        out.extend(got)
    merged: list[tuple[Channel, str]] = []
    for piece in out:
        if merged and merged[-1][0] is piece.channel and piece.channel is not Channel.TOOL:
            merged[-1] = (piece.channel, merged[-1][1] + piece.text)
        else:
            merged.append((piece.channel, piece.text))
    return merged


TEXT = '<think>hmm, weather</think>Let me check.<tool_call>\n{"name": "x"}\n</tool_call>Done'
CFG = SplitterConfig(reasoning=("<think>", "</think>"), tool=("<tool_call>", "</tool_call>"))
EXPECTED = [
    (Channel.REASONING, "hmm, weather"),
    (Channel.CONTENT, "Let me check."),
    (Channel.TOOL, '\n{"name": "x"}\n'),
    (Channel.CONTENT, "Done"),
]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, len(TEXT)])
def test_splitter_handles_tags_split_anywhere(size: int) -> None:
    pieces = [TEXT[i : i + size] for i in range(0, len(TEXT), size)]
    assert _split(CFG, pieces) == EXPECTED


def test_splitter_holds_back_only_possible_tags() -> None:
    splitter = ChannelSplitter(CFG)
    assert [p.text for p in splitter.feed("a <thi")] == ["a "]
    assert [p.text for p in splitter.feed("s is")] == ["<this is"]


def test_splitter_start_in_reasoning_and_unclosed_tool() -> None:
    cfg = SplitterConfig(
        reasoning=("<think>", "</think>"), start_in_reasoning=True, tool=("<tool_call>", "</tool_call>")
    )
    splitter = ChannelSplitter(cfg)
    out = splitter.feed('plan</think>ok<tool_call>{"na') + splitter.finish()
    assert [(p.channel, p.text) for p in out][:2] == [(Channel.REASONING, "plan"), (Channel.CONTENT, "ok")]
    assert out[2].channel is Channel.TOOL and not out[2].closed
    assert out[2].raw == '<tool_call>{"na'


def test_splitter_without_tags_is_plain_content() -> None:
    assert _split(SplitterConfig(), ["<think>a", "</think><tool_call>"]) == [
        (Channel.CONTENT, "<think>a</think><tool_call>")
    ]


def test_tools_system_prompt_is_added() -> None:
    msgs = add_tools_system_prompt([{"role": "user", "content": "hi"}], TOOLS)
    assert msgs[0]["role"] == "system" and "<tools>" in msgs[0]["content"]
    assert '"get_weather"' in msgs[0]["content"] and msgs[1] == {"role": "user", "content": "hi"}
    msgs = add_tools_system_prompt([{"role": "system", "content": "Be brief."}], TOOLS)
    assert msgs[0]["content"].startswith("Be brief.\n\n# Tools")


def test_inline_tool_history() -> None:
    msgs = inline_tool_history(
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]
    )
    assert "tool_calls" not in msgs[0]
    assert msgs[0]["content"] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    assert msgs[1]["content"] == "<tool_response>\nsunny\n</tool_response>"


def test_template_renders() -> None:
    assert template_renders("{% if tools %}{% endif %}", "tools")
    assert not template_renders("{{ message['content'] }} toolset", "tools")


def test_call_schema() -> None:
    one = call_schema(TOOLS, "get_weather")
    assert one["properties"]["name"] == {"const": "get_weather"}
    assert one["properties"]["arguments"]["required"] == ["city"]
    assert one["properties"]["arguments"]["additionalProperties"] is False
    both = call_schema(TOOLS, None)
    assert [o["properties"]["name"]["const"] for o in both["anyOf"]] == ["get_weather", "now"]
    assert both["anyOf"][1]["properties"]["arguments"] == {"type": "object"}
    with pytest.raises(ValueError):
        call_schema(TOOLS, "nope")
