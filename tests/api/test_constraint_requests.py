"""How OpenAI requests choose their output constraint, logprobs and tool handling (no model)."""

from __future__ import annotations

import json

import pytest

from kodkod.api.convert import grammar_spec
from kodkod.api.errors import ApiError
from kodkod.api.openai.chat_output import ChoiceOutput
from kodkod.api.openai.common import requested_logprobs
from kodkod.api.openai.constrain import output_spec, response_format_spec, tool_choice
from kodkod.api.openai.schemas import ResponseFormat, ToolSpec
from kodkod.chat.channels import SplitterConfig
from kodkod.chat.tool_formats import tool_format
from kodkod.core.constraints import GrammarKind

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}
TOOLS = [ToolSpec.model_validate({"type": "function", "function": {"name": "f", "parameters": SCHEMA}})]


def test_response_format_unwraps_openai_envelope() -> None:
    env = ResponseFormat(type="json_schema", json_schema={"name": "x", "schema": SCHEMA, "strict": True})
    spec = response_format_spec(env)
    assert spec is not None and spec.kind is GrammarKind.JSON_SCHEMA
    assert json.loads(spec.text) == SCHEMA
    bare = response_format_spec(ResponseFormat(type="json_schema", json_schema=SCHEMA))
    assert bare is not None and json.loads(bare.text) == SCHEMA  # TabbyAPI style: as-is
    for kind in ("json_object", "json"):
        spec = response_format_spec(ResponseFormat(type=kind))
        assert spec is not None and json.loads(spec.text) == {"type": "object"}
    assert response_format_spec(ResponseFormat(type="text")) is None
    assert response_format_spec(None) is None
    with pytest.raises(ApiError):
        response_format_spec(ResponseFormat(type="yaml"))
    with pytest.raises(ApiError):
        response_format_spec(ResponseFormat(type="json_schema"))


def test_tabby_grammar_fields() -> None:
    assert grammar_spec({"regex_pattern": "a+"}).kind is GrammarKind.REGEX  # type: ignore[union-attr]
    assert grammar_spec({"grammar_string": 'root ::= "a"'}).kind is GrammarKind.GBNF  # type: ignore[union-attr]
    assert grammar_spec({"grammar_string": 'start: "a"'}).kind is GrammarKind.LARK  # type: ignore[union-attr]
    assert grammar_spec({"json_schema": None, "regex_pattern": "", "grammar_string": ""}) is None
    with pytest.raises(ApiError):
        grammar_spec({"json_schema": SCHEMA, "regex_pattern": "a"})


def test_only_one_constraint_per_request() -> None:
    fmt = ResponseFormat(type="json_object")
    assert output_spec({}, fmt) is not None
    with pytest.raises(ApiError) as exc:
        output_spec({"regex_pattern": "a"}, fmt)
    assert exc.value.status == 400
    with pytest.raises(ApiError):
        output_spec({}, fmt, (TOOLS, tool_choice(TOOLS, "required")))


def test_forced_tool_grammar() -> None:
    spec = output_spec({}, None, (TOOLS, tool_choice(TOOLS, {"type": "function", "function": {"name": "f"}})))
    assert spec is not None and spec.kind is GrammarKind.LARK
    assert spec.text.startswith('start: "<tool_call>\\n" call "\\n</tool_call>"')
    assert '"const": "f"' in spec.text


@pytest.mark.parametrize(
    ("value", "mode", "name"),
    [
        (None, "auto", None),
        ("none", "none", None),
        ("auto", "auto", None),
        ("required", "required", None),
        ({"type": "function", "function": {"name": "f"}}, "function", "f"),
    ],
)
def test_tool_choice(value: object, mode: str, name: str | None) -> None:
    choice = tool_choice(TOOLS, value)  # type: ignore[arg-type]
    assert (choice.mode, choice.name) == (mode, name)
    assert tool_choice(None, None).mode == "none"


@pytest.mark.parametrize(
    "value", ["sometimes", {"type": "function", "function": {"name": "g"}}, {"type": "other"}]
)
def test_bad_tool_choice(value: object) -> None:
    with pytest.raises(ApiError):
        tool_choice(TOOLS, value)  # type: ignore[arg-type]
    with pytest.raises(ApiError):
        tool_choice(None, "required")


def test_requested_logprobs() -> None:
    assert requested_logprobs(0, 0, chat=False) is None
    assert requested_logprobs(3, 0, chat=False) == 3
    assert requested_logprobs(1, 0, chat=True) == 0  # logprobs: true, no alternatives
    assert requested_logprobs(1, 5, chat=True) == 5
    assert requested_logprobs(4, 0, chat=True) == 4  # legacy integer logprobs in chat
    assert requested_logprobs(0, 0, chat=True) is None


def test_choice_output_stream_and_message() -> None:
    cfg = SplitterConfig(reasoning=("<think>", "</think>"), tool=("<tool_call>", "</tool_call>"))
    out = ChoiceOutput(cfg, tool_format(None))
    text = '<think>hm</think>Sure.<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    deltas = [d for ch in text for d in out.feed(ch)] + out.finish()
    kinds = [next(iter(d)) for d in deltas]
    assert kinds[0] == "reasoning_content" and kinds[-1] == "tool_calls"
    call = deltas[-1]["tool_calls"][0]
    assert call["index"] == 0 and call["function"] == {"name": "f", "arguments": '{"a": 1}'}
    msg = out.message()
    assert msg["reasoning_content"] == "hm" and msg["content"] == "Sure."
    assert msg["tool_calls"][0]["id"] == call["id"]
    assert out.finish_reason("stop") == "tool_calls"


def test_unparseable_tool_text_stays_content() -> None:
    out = ChoiceOutput(SplitterConfig(tool=("<tool_call>", "</tool_call>")), tool_format(None))
    out.feed('<tool_call>oops</tool_call> and <tool_call>{"na')
    out.finish()
    assert out.message()["content"] == '<tool_call>oops</tool_call> and <tool_call>{"na'
    assert out.message()["tool_calls"] is None and out.finish_reason("length") == "length"


def test_chat_logprobs_cover_the_content_phase_only() -> None:
    from kodkod.api.openai.chat_output import content_logprobs_of
    from kodkod.core.types import TokenLogprob

    pieces = [
        "<think>",
        "hm",
        "m",
        "</",
        "think>",
        "\n\nThe",
        " sky",
        " <tool_call>",
        '{"name": "f",',
        ' "arguments": {}}',
        "</tool_call>",
        " ok",
    ]
    lps = [TokenLogprob(i, p, -0.1 * i, []) for i, p in enumerate(pieces)]
    cfg = SplitterConfig(reasoning=("<think>", "</think>"), tool=("<tool_call>", "</tool_call>"))
    kept = content_logprobs_of(cfg, tool_format(None), lps)
    # " <tool_call>" made content too (its space); the tag, reasoning and call tokens did not
    assert [lp.token for lp in kept] == ["\n\nThe", " sky", " <tool_call>", " ok"]
