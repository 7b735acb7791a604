"""Tool formats through a real server: the model's output is forced into the format's syntax.

SmolLM2 knows none of these formats, so each request constrains the output with a regex that
spells one sample reply exactly; the server must then split it into reasoning, content and
tool calls as the loaded model's format says, streamed and not. One server: its config sets
`harmony: true` (so the startup load is harmony) and `tool_format: gemma4` with `reasoning: true`
as `use_as_default` keys, so reloading the model through the API gives gemma4. The special-token
check behind auto-detection is also run against the real llama.cpp vocabularies of both models.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kodkod.backends.llamacpp.model import LlamaModel
from kodkod.chat.tool_formats import has_special_token, reply_format
from tests.server import DEFAULT_MODEL, MODELS, KodkodServer

pytestmark = pytest.mark.model

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    }
]
GEMMA4_REPLY = (
    '<|channel>thought\nplan<channel|>OK<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>'
)
HARMONY_REPLY = (
    "<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>commentary "
    'to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris","days":3}<|call|>'
)


def literal(text: str) -> str:
    """A regex matching exactly `text`."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$" else c for c in text)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    server = KodkodServer.start(
        tmp_path_factory.mktemp("kodkod"),
        {
            "model": {
                "harmony": True,
                "tool_format": "gemma4",
                "reasoning": True,
                "use_as_default": ["tool_format", "reasoning"],
            }
        },
    )
    yield server
    server.stop()


def chat(srv: KodkodServer, reply: str, *, stream: bool) -> dict[str, Any]:
    """One forced reply: the message (streamed deltas joined) and its finish reason."""
    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": TOOLS,
        "max_tokens": 300,
        "temperature": 0,
        "regex_pattern": literal(reply),
        "stream": stream,
    }
    with srv.client() as client:
        if not stream:
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            return {**choice["message"], "finish_reason": choice["finish_reason"]}
        out: dict[str, Any] = {"content": "", "reasoning_content": "", "tool_calls": []}
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:]).get("choices", []):
                    delta = choice.get("delta", {})
                    out["content"] += delta.get("content") or ""
                    out["reasoning_content"] += delta.get("reasoning_content") or ""
                    out["tool_calls"] += delta.get("tool_calls") or []
                    if choice.get("finish_reason"):
                        out["finish_reason"] = choice["finish_reason"]
        return out


def calls(message: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"] or []
    ]


def check(srv: KodkodServer, reply: str, reasoning: str, content: str | None) -> None:
    for stream in (False, True):
        message = chat(srv, reply, stream=stream)
        assert calls(message) == [("get_weather", {"city": "Paris", "days": 3})], (stream, message)
        assert message["reasoning_content"] == reasoning
        assert (message["content"] or None) == content
        assert message["finish_reason"] == "tool_calls"


def test_harmony_from_config_then_gemma4_after_reload(srv: KodkodServer) -> None:
    # startup load: `harmony: true` supersedes `tool_format`
    check(srv, HARMONY_REPLY, "think", None)
    # an API load takes only the use_as_default keys from config: no harmony, so gemma4
    with httpx.Client(base_url=srv.base_url, headers=srv.headers(admin=True), timeout=300) as admin:
        r = admin.post("/v1/model/load", json={"model_name": DEFAULT_MODEL})
        assert r.status_code == 200, r.text
    check(srv, GEMMA4_REPLY, "\nplan", "OK")


@pytest.mark.parametrize(
    ("gguf", "own_token"),
    [
        ("SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf", "<|im_start|>"),
        ("gemma-3-270m/gemma-3-270m-q4_k_m.gguf", "<start_of_turn>"),
    ],
)
def test_detection_with_llama_cpp_vocabularies(default_gguf: Path, gguf: str, own_token: str) -> None:
    """The check finds a vocabulary's own special token, and no harmony / glimmer in these."""
    model = LlamaModel.load(MODELS / gguf, "vocab", vocab_only=True)
    try:
        assert has_special_token(model, own_token)
        assert not has_special_token(model, "<|channel|>") and not has_special_token(model, "<|eom|>")
        assert reply_format({}, lambda text: has_special_token(model, text)) is None
    finally:
        model.close()
