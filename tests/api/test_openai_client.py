"""The OpenAI API driven by the official `openai` package against a real kodkod process.

Covers completions and chat (sync, async, streamed), n, logprobs, usage, echo, token-id
prompts, structured output (json_schema on 20 prompts checked with jsonschema, regex on 20
prompts, GBNF), forced tool calls (plain and streamed), tool results going back through the
template, reasoning split, error mapping to the client's exception classes, and TabbyAPI's
usage-page curl example.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import jsonschema
import openai
import pytest

from kodkod.chat.tools import tools_system_prompt
from tests.server import DEFAULT_MODEL, KodkodServer

pytestmark = pytest.mark.model

# reasoning on: the default model never writes <think> by itself, so only tests that force the
# tags (with a regex) see a split.
T = TypeVar("T")
CONFIG = {"model": {"max_seq_len": 2048, "reasoning": True}}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time",
        "parameters": {"type": "object", "properties": {}},
    },
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "hobbies": {
            "type": "array",
            "items": {"type": "string", "maxLength": 12},
            "minItems": 1,
            "maxItems": 2,
        },
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}
TOPICS = [
    "a pilot",
    "a baker",
    "a painter",
    "a sailor",
    "a doctor",
    "a farmer",
    "a poet",
    "a chemist",
    "a teacher",
    "a dancer",
    "a judge",
    "a miner",
    "a nurse",
    "a chef",
    "a diver",
    "a monk",
    "a tailor",
    "a spy",
    "a gardener",
    "a clown",
]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    s = KodkodServer.start(tmp_path_factory.mktemp("openai"), CONFIG)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv: KodkodServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key=srv.api_key, max_retries=0, timeout=300)


def run_async(srv: KodkodServer, fn: Callable[[openai.AsyncOpenAI], Awaitable[T]]) -> T:
    """Run fn(async client) in a fresh event loop (the client's connections live in it)."""

    async def go() -> T:
        async with openai.AsyncOpenAI(
            base_url=srv.base_url + "/v1", api_key=srv.api_key, max_retries=0, timeout=300
        ) as aclient:
            return await fn(aclient)

    return asyncio.run(go())


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- completions ----------------------------------------------------------------------------


def test_completion_sync_usage_and_model(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert r.object == "text_completion" and r.model == DEFAULT_MODEL
    assert r.choices[0].text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_list_prompts_n3_logprobs_echo(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="x", prompt=["Once upon a time", [19556, 28, 957]], n=3, max_tokens=4, logprobs=2, echo=True
    )
    assert [c.index for c in r.choices] == list(range(6))
    assert all(c.text.startswith("Once upon a time") for c in r.choices[:3])
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) >= 1
        assert all(len(top) == 2 for top in lp.top_logprobs)
        assert c.text[lp.text_offset[0] :].startswith(lp.tokens[0])
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)


def test_completion_stream_with_usage(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="x", prompt="Water boils at", max_tokens=10, temperature=0)
    chunks = list(
        client.completions.create(
            model="x",
            prompt="Water boils at",
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_tabby_usage_page_curl_example(srv: KodkodServer) -> None:
    body = {
        "model": DEFAULT_MODEL,
        "prompt": "Once upon a time,",
        "max_tokens": 400,
        "stream": False,
        "min_p": 0.05,
        "repetition_penalty": 1.05,
    }
    r = httpx.post(srv.base_url + "/v1/completions", json=body, headers=srv.headers(), timeout=300)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["choices"][0]["text"] and data["usage"]["completion_tokens"] > 0


# -- chat -------------------------------------------------------------------------------------


def test_chat_sync_stream_and_usage_agree(client: openai.OpenAI) -> None:
    msgs = [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}],
        },
    ]
    whole = client.chat.completions.create(model="x", messages=msgs, max_tokens=12, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="x",
        messages=msgs,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_async_concurrent_and_n3(srv: KodkodServer) -> None:
    async def go(aclient: openai.AsyncOpenAI) -> list:
        return await asyncio.gather(
            *(
                aclient.chat.completions.create(model="x", messages=user(f"Count to {k}."), max_tokens=8, n=3)
                for k in (3, 4, 5)
            )
        )

    for r in run_async(srv, go):
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert 3 <= r.usage.completion_tokens <= 24


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="x", messages=user("Say hello."), max_tokens=6, logprobs=True, top_logprobs=3, temperature=0
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert item.token == item.top_logprobs[0].token  # greedy: the best one was chosen
    assert "".join(i.token for i in content).startswith(r.choices[0].message.content or "")


def test_continue_final_message_and_echo(client: openai.OpenAI) -> None:
    msgs = [*user("Tell me a fact."), {"role": "assistant", "content": "Here is a fact:"}]
    r = client.chat.completions.create(
        model="x",
        messages=msgs,
        max_tokens=6,
        temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False, "echo": True},
    )
    assert r.choices[0].message.content.startswith("Here is a fact:")
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(
            model="x", messages=msgs, max_tokens=4, extra_body={"continue_final_message": True}
        )


# -- structured output ------------------------------------------------------------------------


def test_json_schema_20_prompts_validate_batched_with_free_neighbours(srv: KodkodServer) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    async def go(aclient: openai.AsyncOpenAI) -> tuple[list, list]:
        constrained = [
            aclient.chat.completions.create(
                model="x",
                messages=user(f"Describe {t} as JSON."),
                max_tokens=120,
                temperature=0.3,
                response_format=fmt,
            )
            for t in TOPICS
        ]
        free = [
            aclient.chat.completions.create(model="x", messages=user(f"Describe {t}."), max_tokens=16)
            for t in TOPICS[:4]
        ]
        results = await asyncio.gather(*constrained, *free)
        return results[:20], results[20:]

    constrained, free = run_async(srv, go)
    outputs = [r.choices[0].message.content for r in constrained]
    assert len(set(outputs)) > 1
    for r, text in zip(constrained, outputs, strict=True):
        jsonschema.validate(json.loads(text), PERSON)
        assert r.choices[0].finish_reason == "stop"
    assert all(r.choices[0].message.content for r in free)


def test_regex_20_prompts_match(srv: KodkodServer) -> None:
    pattern = r"[A-Z][a-z]{2,9} (is|was) [0-9]{1,3} years old\."

    async def go(aclient: openai.AsyncOpenAI) -> list:
        return await asyncio.gather(
            *(
                aclient.completions.create(
                    model="x",
                    prompt=f"Q: How old is {t}?\nA:",
                    max_tokens=24,
                    extra_body={"regex_pattern": pattern},
                )
                for t in TOPICS
            )
        )

    texts = [r.choices[0].text for r in run_async(srv, go)]
    assert all(re.fullmatch(pattern, t) for t in texts), texts


def test_json_object_gbnf_and_tabby_json_schema(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="x",
        messages=user("Give me JSON."),
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_object"},
    )
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")
    r = client.completions.create(
        model="x",
        prompt="Is the sky blue?",
        max_tokens=5,
        extra_body={"grammar_string": 'root ::= " yes" | " no"'},
    )
    assert r.choices[0].text in (" yes", " no")
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model="x", messages=user("ok?"), max_tokens=10, extra_body={"json_schema": schema}
    )
    assert json.loads(r.choices[0].message.content) in ({"ok": True}, {"ok": False})


# -- tools ------------------------------------------------------------------------------------


def test_forced_tool_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="x",
        messages=user("What's the weather in Oslo?"),
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=100,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert re.fullmatch(r"call_[0-9a-f]{24}", call.id) and call.type == "function"
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_tool_call_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="x",
        messages=user("What time is it?"),
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=100,
        stream=True,
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    name, args = calls[0]["name"], json.loads(calls[0]["arguments"])
    spec = {"get_weather": WEATHER, "get_time": TIME}[name]
    jsonschema.validate(args, spec["function"]["parameters"])


def test_auto_tool_calls_are_parsed_from_the_text(client: openai.OpenAI) -> None:
    # A regex makes the model write a hermes call after some text, as a capable model would.
    call = '{"name": "get_time", "arguments": {}}'
    regex = re.escape(f"Let me check.<tool_call>\n{call}\n</tool_call>")
    kw = dict(
        model="x",
        messages=user("What time is it?"),
        tools=[WEATHER, TIME],
        max_tokens=40,
        extra_body={"regex_pattern": regex},
    )
    r = client.chat.completions.create(**kw)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.content == "Let me check."
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [("get_time", "{}")]
    deltas = [c.choices[0].delta for c in client.chat.completions.create(**kw, stream=True)]
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    (streamed,) = [tc for d in deltas for tc in d.tool_calls or []]
    assert streamed.index == 0 and streamed.function.name == "get_time"
    plain = client.chat.completions.create(**{**kw, "tool_choice": "none"}).choices[0]
    assert plain.message.tool_calls is None and "<tool_call>" in plain.message.content


def test_tool_results_go_back_through_the_template(client: openai.OpenAI, srv: KodkodServer) -> None:
    args = '{"city": "Oslo", "unit": "celsius"}'
    msgs = [
        *user("Weather in Oslo?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_0123456789abcdef01234567",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": args},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0123456789abcdef01234567", "content": "-3 C, snow"},
    ]
    r = client.chat.completions.create(
        model="x", messages=msgs, tools=[WEATHER], max_tokens=12, temperature=0
    )
    # The model's own template renders neither tools nor tool calls: the server writes them
    # in hermes style. The prompt is exactly this hand-written ChatML:
    expected = (
        f"<|im_start|>system\n{tools_system_prompt([WEATHER])}<|im_end|>\n"
        "<|im_start|>user\nWeather in Oslo?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        f"{args}}}\n</tool_call><|im_end|>\n"
        "<|im_start|>tool\n<tool_response>\n-3 C, snow\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    enc = httpx.post(
        srv.base_url + "/v1/token/encode",
        headers=srv.headers(),
        timeout=60,
        json={"text": expected, "add_bos_token": False},
    ).json()
    assert r.usage.prompt_tokens == enc["length"]
    none = client.chat.completions.create(
        model="x", messages=msgs, tools=[WEATHER], max_tokens=4, tool_choice="none"
    )
    assert none.usage.prompt_tokens < r.usage.prompt_tokens  # no tools block for "none"


# -- reasoning --------------------------------------------------------------------------------


def test_reasoning_is_split_out(client: openai.OpenAI) -> None:
    pattern = r"<think>[a-z ]{3,20}</think>[A-Z][a-z ]{2,20}\."
    kw = dict(
        model="x", messages=user("Think, then answer."), max_tokens=40, extra_body={"regex_pattern": pattern}
    )
    message = client.chat.completions.create(**kw).choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert re.fullmatch(r"[a-z ]{3,20}", reasoning) and re.fullmatch(r"[A-Z][a-z ]{2,20}\.", message.content)
    parts = {"reasoning_content": "", "content": ""}
    for chunk in client.chat.completions.create(**kw, stream=True):
        delta = chunk.choices[0].delta
        parts["content"] += delta.content or ""
        parts["reasoning_content"] += (delta.model_extra or {}).get("reasoning_content") or ""
    assert re.fullmatch(r"[a-z ]{3,20}", parts["reasoning_content"])
    assert "<think>" not in parts["content"] and parts["content"].endswith(".")


def test_reasoning_budget_closes_the_reasoning_block(client: openai.OpenAI) -> None:
    message = " Time to answer."
    kw = dict(
        model="x",
        messages=user("Describe the sea."),
        max_tokens=24,
        temperature=0,
        logprobs=True,
        extra_body={
            "response_prefix": "<think>",
            "ban_eos_token": True,
            "reasoning_budget_tokens": 5,
            "reasoning_budget_message": message,
        },
    )
    choice = client.chat.completions.create(**kw).choices[0]
    reasoning = choice.message.model_extra["reasoning_content"]
    assert reasoning.endswith(message)  # forced once the budget was spent, then the end tag
    free = reasoning[: -len(message)]
    assert (
        len(client.post("/token/encode", cast_to=dict, body={"text": free, "add_bos_token": False})["tokens"])
        == 5
    )
    content = choice.message.content
    assert content and "</think>" not in content
    # logprobs cover the content phase only (reference §7.7)
    assert "".join(t.token for t in choice.logprobs.content) == content
    # streamed, with the budget given as reasoning.max_tokens and the message left out
    extra = {"response_prefix": "<think>", "ban_eos_token": True, "reasoning": {"max_tokens": 3}}
    parts = {"reasoning_content": "", "content": ""}
    for chunk in client.chat.completions.create(**{**kw, "extra_body": extra}, stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            parts["content"] += delta.content or ""
            parts["reasoning_content"] += (delta.model_extra or {}).get("reasoning_content") or ""
    assert (
        len(
            client.post(
                "/token/encode",
                cast_to=dict,
                body={"text": parts["reasoning_content"], "add_bos_token": False},
            )["tokens"]
        )
        <= 3
    )
    assert parts["content"] and "</think>" not in parts["content"]
    # a constrained reply decides every token itself: the budget is ignored
    pattern = r"<think>[a-z ]{8,20}</think>[A-Z][a-z ]{2,20}\."
    constrained = client.chat.completions.create(
        model="x",
        messages=user("Think, then answer."),
        max_tokens=40,
        extra_body={"regex_pattern": pattern, "reasoning_budget_tokens": 1},
    )
    assert re.fullmatch(r"[a-z ]{8,20}", constrained.choices[0].message.model_extra["reasoning_content"])


# -- errors -----------------------------------------------------------------------------------


def test_errors_map_to_client_exceptions(srv: KodkodServer, client: openai.OpenAI) -> None:
    bad_key = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(model="x", messages=user("hi"), max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(
            model="x", prompt="x", max_tokens=1, extra_body={"regex_pattern": "[unclosed"}
        )
    assert "regex" in exc.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="x",
            messages=user("hi"),
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="x",
            messages=user("hi"),
            max_tokens=4,
            response_format={"type": "json_object"},
            extra_body={"regex_pattern": "a+"},
        )
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="x", prompt="word " * 3000, max_tokens=4)
    assert exc.value.code == "context_length_exceeded"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="x", messages=user("hi"), n=0)
    assert client.models.retrieve(DEFAULT_MODEL).id == DEFAULT_MODEL


def test_template_switch_and_unload(srv: KodkodServer, client: openai.OpenAI) -> None:
    """Runs last: it changes the model's template."""
    admin = srv.client(admin=True)
    names = admin.get("/v1/template/list").json()["data"]
    assert {"chatml", "llama3", "alpaca", "mistral", "gemma"} <= set(names)
    assert admin.post("/v1/template/switch", json={"name": "no-such"}).status_code == 400
    assert admin.post("/v1/template/switch", json={"prompt_template_name": "chatml"}).status_code == 200
    r = client.chat.completions.create(model="x", messages=user("hi"), max_tokens=4)
    assert r.choices[0].message.content is not None or r.choices[0].finish_reason
    assert admin.post("/v1/template/unload").status_code == 200
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="x", messages=user("hi"), max_tokens=4)
    assert admin.post("/v1/template/switch", json={"name": "chatml"}).status_code == 200
