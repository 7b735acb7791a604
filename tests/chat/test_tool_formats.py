"""The newer tool-call formats (deepseek_v4, hy3, gemma4, harmony, muse_glimmer) without a model.

Sample outputs are written to each format's published syntax (the sources are named in the
format modules). Every sample is parsed whole, then streamed split at every position and one
character at a time: the streamed content, reasoning and calls must equal the whole-text result,
so no tag (or piece of one) leaks whatever the chunking. Malformed outputs give no calls and no
error. Whole-reply formats are found from the tokenizer's special tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from kodkod.api.openai import chat_prompt
from kodkod.api.openai.chat_output import ChoiceOutput
from kodkod.api.openai.chat_prompt import model_tool_format
from kodkod.api.openai.constrain import ToolChoice
from kodkod.chat.channels import SplitterConfig
from kodkod.chat.tool_formats import has_special_token, reply_format, tool_format
from kodkod.chat.tools import ToolFormat


@dataclass(frozen=True, slots=True)
class Result:
    content: str | None
    reasoning: str | None
    calls: list[tuple[str, Any]]
    finish_reason: str


def split_config(fmt: ToolFormat, *, parse: bool = True) -> SplitterConfig:
    """What chat_prompt builds for a model with `reasoning: true` and this format."""
    tool = (fmt.start, fmt.end) if parse else None
    if fmt.splitter is not None:
        return SplitterConfig(tool=tool)
    return SplitterConfig(reasoning=fmt.reasoning, tool=tool)


def run(name: str, chunks: list[str], *, parse: bool = True) -> Result:
    fmt = tool_format(name)
    out = ChoiceOutput(split_config(fmt, parse=parse), fmt)
    streamed: dict[str, str] = {"content": "", "reasoning_content": ""}
    calls: list[dict[str, Any]] = []
    for delta in [d for chunk in chunks for d in out.feed(chunk)] + out.finish():
        for key in streamed:
            streamed[key] += delta.get(key, "")
        calls += delta.get("tool_calls", [])
    message = out.message()
    # the streamed deltas add up to the whole message
    assert streamed["content"] == "".join(out.content)
    assert (streamed["reasoning_content"] or None) == message["reasoning_content"]
    assert [c["index"] for c in calls] == list(range(len(calls)))
    parsed = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    whole = [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"] or []
    ]
    assert parsed == whole
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
    return Result(message["content"], message["reasoning_content"], parsed, out.finish_reason("stop"))


def every_split(name: str, text: str, **kw: Any) -> Result:
    """Parse `text` whole, then split at every position and char by char: all must agree."""
    whole = run(name, [text], **kw)
    for i in range(len(text) + 1):
        assert run(name, [text[:i], text[i:]], **kw) == whole, f"split at {i}: {text[:i]!r}|{text[i:]!r}"
    assert run(name, list(text), **kw) == whole
    return whole


# -- samples written to each format's specification -----------------------------------------

DSV4 = (
    "<think>The user wants weather.</think>Checking."
    "<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="lookup">\n'
    '<｜DSML｜parameter name="zip" string="true">007</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="opts" string="false">{"raw": true, "n": [1, 2]}</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>"
)

HY3 = (
    "<think:opensource>Two cities.</think:opensource>"
    "<tool_calls:opensource>\n"
    "<tool_call:opensource>get_weather<tool_sep:opensource>\n"
    "<arg_key:opensource>city</arg_key:opensource>\n"
    "<arg_value:opensource>Paris</arg_value:opensource>\n"
    "<arg_key:opensource>days</arg_key:opensource>\n"
    "<arg_value:opensource>3</arg_value:opensource>\n"
    "</tool_call:opensource>\n"
    "<tool_call:opensource>get_weather<tool_sep:opensource>\n"
    "<arg_key:opensource>city</arg_key:opensource>\n"
    "<arg_value:opensource>Tokyo</arg_value:opensource>\n"
    "</tool_call:opensource>\n"
    "</tool_calls:opensource>"
)

GEMMA4 = (
    "<|channel>thought\nNeed the weather.<channel|>Let me look."
    '<|tool_call>call:get_weather{city:<|"|>Paris, "FR"<|"|>,days:3,metric:true,'
    'extra:null,opts:{tags:[<|"|>a<|"|>,2,-1.5],deep:{x:<|"|>{not:an object}<|"|>}}}<tool_call|>'
    "<|tool_call>call:get_time{}<tool_call|>"
)

HARMONY_CALL = (
    "<|channel|>analysis<|message|>User asks weather; call the tool.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    '<|message|>{"city": "Paris", "days": 3}<|call|>'
)

HARMONY_ANSWER = (
    "<|channel|>analysis<|message|>Simple sum.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>"
)

GLIMMER_CALL = (
    " to=self<|message|>Use the weather tool.<|eom|>"
    "<|start|>assistant to=get_weather<|message|><atem:function_calls>\n"
    '<atem:invoke name="get_weather">\n'
    '<atem:parameter name="city">Paris</atem:parameter>\n'
    '<atem:parameter name="days">3</atem:parameter>\n'
    '<atem:parameter name="units">["C", "F"]</atem:parameter>\n'
    "</atem:invoke>\n"
    "</atem:function_calls><|eot|>"
)

GLIMMER_ANSWER = " to=self<|message|>Reason briefly.<|eom|><|start|>assistant to=user<|message|>Paris.<|eot|>"


def test_deepseek_v4_calls_typed_parameters_and_reasoning() -> None:
    got = every_split("deepseek_v4", DSV4)
    assert got.reasoning == "The user wants weather."
    assert got.content == "Checking."
    assert got.calls == [
        ("get_weather", {"city": "Paris", "days": 3}),
        ("lookup", {"zip": "007", "opts": {"raw": True, "n": [1, 2]}}),
    ]
    assert got.finish_reason == "tool_calls"


def test_hy3_parallel_calls_and_suffixed_reasoning() -> None:
    got = every_split("hy3", HY3)
    assert got.reasoning == "Two cities."
    assert got.content is None
    assert got.calls == [("get_weather", {"city": "Paris", "days": 3}), ("get_weather", {"city": "Tokyo"})]


def test_gemma4_calls_with_quote_tokens_nested_values_and_thought_channel() -> None:
    got = every_split("gemma4", GEMMA4)
    assert got.reasoning == "\nNeed the weather."
    assert got.content == "Let me look."
    assert got.calls == [
        (
            "get_weather",
            {
                "city": 'Paris, "FR"',
                "days": 3,
                "metric": True,
                "extra": None,
                "opts": {"tags": ["a", 2, -1.5], "deep": {"x": "{not:an object}"}},
            },
        ),
        ("get_time", {}),
    ]


def test_harmony_analysis_is_reasoning_and_a_recipient_is_a_call() -> None:
    got = every_split("harmony", HARMONY_CALL)
    assert got.reasoning == "User asks weather; call the tool."
    assert got.content is None
    assert got.calls == [("get_weather", {"city": "Paris", "days": 3})]
    assert got.finish_reason == "tool_calls"


def test_harmony_final_channel_is_content() -> None:
    got = every_split("harmony", HARMONY_ANSWER)
    assert (got.reasoning, got.content, got.calls) == ("Simple sum.", "2 + 2 = 4.", [])
    assert got.finish_reason == "stop"


def test_harmony_call_ended_by_its_stop_token_and_recipient_before_channel() -> None:
    # `<|call|>` is an end-of-generation token: its text never reaches the parser.
    text = 'assistant to=functions.lookup<|channel|>commentary json<|message|>{"q": "x"}'
    assert every_split("harmony", text).calls == [("lookup", {"q": "x"})]
    # a commentary message without a recipient is a preamble for the user
    text = "<|channel|>commentary<|message|>Let me look.<|end|>"
    got = every_split("harmony", text)
    assert (got.content, got.calls) == ("Let me look.", [])


def test_muse_glimmer_self_is_reasoning_and_atem_block_is_a_call() -> None:
    got = every_split("muse_glimmer", GLIMMER_CALL)
    assert got.reasoning == "Use the weather tool."
    assert got.content is None
    assert got.calls == [("get_weather", {"city": "Paris", "days": 3, "units": ["C", "F"]})]


def test_muse_glimmer_user_message_is_content() -> None:
    got = every_split("glimmer", GLIMMER_ANSWER)
    assert (got.reasoning, got.content, got.calls) == ("Reason briefly.", "Paris.", [])


def test_aliases_and_format_properties() -> None:
    assert tool_format("dsv4").name == "deepseek_v4"
    assert tool_format("HY_V3").name == "hy3"
    assert tool_format("glimmer").name == "muse_glimmer"
    assert tool_format("gemma4").start == "<|tool_call>" and tool_format("gemma4").end == "<tool_call|>"
    for name in ("deepseek_v4", "hy3", "gemma4", "harmony", "muse_glimmer"):
        assert tool_format(name).special_tokens  # decoded with special tokens


# -- tool parsing off, malformed and hostile outputs -----------------------------------------


def test_tool_choice_none_leaves_whole_reply_tool_messages_as_content() -> None:
    got = every_split("harmony", HARMONY_CALL, parse=False)
    assert got.calls == [] and got.reasoning == "User asks weather; call the tool."
    assert got.content is not None and '{"city": "Paris", "days": 3}' in got.content
    got = every_split("hy3", HY3, parse=False)
    assert got.calls == [] and got.content is not None and "<tool_calls:opensource>" in got.content


MALFORMED = [
    ("deepseek_v4", '<｜DSML｜tool_calls><｜DSML｜invoke name="">x</｜DSML｜invoke></｜DSML｜tool_calls>'),
    ("deepseek_v4", "<｜DSML｜tool_calls>no invoke at all</｜DSML｜tool_calls>"),
    (
        "hy3",
        "<tool_calls:opensource><tool_call:opensource><tool_sep:opensource></tool_call:opensource></tool_calls:opensource>",
    ),
    ("gemma4", '<|tool_call>call:get_weather{city:<|"|>Paris}<tool_call|>'),
    ("gemma4", "<|tool_call>call:get_weather{city:Paris}<tool_call|>"),
    ("gemma4", "<|tool_call>get_weather(city=1)<tool_call|>"),
    ("gemma4", "<|tool_call>call:f{a:" + "[" * 5000 + "<tool_call|>"),
    ("harmony", "<|channel|>commentary to=functions.get_weather<|message|>{not json<|call|>"),
    ("harmony", '<|channel|>commentary to=functions.get_weather<|message|>["a list"]<|call|>'),
    ("muse_glimmer", " to=get_weather<|message|>no atem block here<|eot|>"),
    ("muse_glimmer", ' to=get_weather<|message|><atem:invoke bad="x"><|eot|>'),
]


@pytest.mark.parametrize(("name", "text"), MALFORMED)
def test_malformed_calls_give_no_calls_and_no_error(name: str, text: str) -> None:
    got = run(name, [text])
    assert got.calls == [] and got.finish_reason == "stop"
    assert got.content  # the text is not lost: it is shown as content


@pytest.mark.parametrize("name", ["deepseek_v4", "hy3", "gemma4"])
def test_unclosed_block_at_the_end_is_content_not_a_call(name: str) -> None:
    fmt = tool_format(name)
    got = every_split(name, "ok " + fmt.start + "half a call")
    assert got.calls == [] and got.content == "ok " + fmt.start + "half a call"


def test_hostile_text_without_structure() -> None:
    # NUL bytes and text that never forms a harmony header: shown as content, nothing parsed
    text = "\x00plain\x00 answer <|message" + "x" * 300
    got = run("harmony", [text])
    assert got.calls == [] and got.content == text
    got = every_split("muse_glimmer", "just text\x00")
    assert (got.content, got.reasoning, got.calls) == ("just text\x00", None, [])


# -- auto-detection from special tokens ------------------------------------------------------


class VocabTokenizer:
    """Bytes are tokens; the listed strings are single special tokens (when parsed as such)."""

    n_vocab = 1 << 16

    def __init__(self, specials: tuple[str, ...]) -> None:
        self.specials = {text: 256 + i for i, text in enumerate(specials)}

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]:
        if parse_special and text in self.specials:
            return [self.specials[text]]
        return list(text.encode())


HARMONY_VOCAB = (
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|constrain|>",
    "<|return|>",
    "<|call|>",
)
GLIMMER_VOCAB = ("<|start|>", "<|message|>", "<|eom|>", "<|eot|>", "<|end_of_text|>")


def test_has_special_token_needs_one_token_of_its_own() -> None:
    tok = VocabTokenizer(HARMONY_VOCAB)
    assert has_special_token(tok, "<|channel|>")
    assert not has_special_token(tok, "<|eom|>")  # spelled with several tokens
    assert not has_special_token(VocabTokenizer(()), "<|channel|>")


@pytest.mark.parametrize(
    ("vocab", "settings", "expected"),
    [
        (HARMONY_VOCAB, {}, "harmony"),
        (GLIMMER_VOCAB, {}, "muse_glimmer"),
        ((), {}, None),
        (HARMONY_VOCAB, {"harmony": False}, None),  # detection turned off
        ((), {"muse_glimmer": True}, "muse_glimmer"),  # forced without the tokens
        (GLIMMER_VOCAB, {"harmony": True}, "harmony"),
        (GLIMMER_VOCAB, {"harmony": None, "muse_glimmer": None}, "muse_glimmer"),
    ],
)
def test_reply_format_from_settings_and_special_tokens(
    vocab: tuple[str, ...], settings: dict[str, Any], expected: str | None
) -> None:
    tok = VocabTokenizer(vocab)
    assert reply_format(settings, lambda text: has_special_token(tok, text)) == expected


def test_detected_reply_format_supersedes_tool_format() -> None:
    def model(vocab: tuple[str, ...], **extra: Any) -> Any:
        return SimpleNamespace(params=SimpleNamespace(extra=extra), tokenizer=VocabTokenizer(vocab))

    assert model_tool_format(model(HARMONY_VOCAB, tool_format="hermes")).name == "harmony"
    assert model_tool_format(model(GLIMMER_VOCAB)).name == "muse_glimmer"
    assert model_tool_format(model((), tool_format="dsv4")).name == "deepseek_v4"
    assert model_tool_format(model(HARMONY_VOCAB, harmony=False, tool_format="gemma4")).name == "gemma4"


def test_reasoning_uses_the_formats_own_tags_unless_configured() -> None:
    def split(prompt: str, fmt: str, **extra: Any) -> SplitterConfig:
        model = SimpleNamespace(params=SimpleNamespace(extra={"reasoning": True, **extra}))
        chosen = tool_format(fmt)
        return chat_prompt.split_config(model, prompt, chosen, chosen, ToolChoice("auto"))  # type: ignore[arg-type]

    # hy3 with the default tags: its suffixed tags, and a template-opened block is noticed
    cfg = split("<｜hy_Assistant:opensource｜><think:opensource>", "hy3")
    assert cfg.reasoning == ("<think:opensource>", "</think:opensource>") and cfg.start_in_reasoning
    assert cfg.tool == ("<tool_calls:opensource>", "</tool_calls:opensource>")
    # tags set in config win
    cfg = split("x", "gemma4", reasoning_start_token="<r>", reasoning_end_token="</r>")
    assert cfg.reasoning == ("<r>", "</r>") and not cfg.start_in_reasoning
    # a whole-reply format splits reasoning itself
    assert split("x", "harmony").reasoning is None
