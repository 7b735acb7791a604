"""Bad token ids never hurt anyone else: through a real server with the default model, each
request carrying a token id outside the vocabulary gets a 400 naming the field and the id while
another user's greedy stream runs; that stream ends with the same text it gets alone, /health
stays 200 and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import KodkodServer, engine_stats

pytestmark = pytest.mark.model

BAD = 999999999
# a long greedy completion that must not notice the bad requests beside it
STREAM_BODY = {
    "prompt": "The history of lighthouses begins with fires on hilltops. ",
    "max_tokens": 200,
    "temperature": 0,
    "ban_eos_token": True,
}
# (what, method path, body, field named in the error, id named in the error)
BAD_REQUESTS: list[tuple[str, str, dict[str, Any], str, int]] = [
    ("prompt id too large", "/v1/completions", {"prompt": [BAD], "max_tokens": 4}, "prompt", BAD),
    ("negative prompt id", "/v1/completions", {"prompt": [-1], "max_tokens": 4}, "prompt", -1),
    ("list of id lists", "/v1/completions", {"prompt": [[1, 2], [3, BAD]], "max_tokens": 4}, "prompt", BAD),
    (
        "logit_bias key",
        "/v1/completions",
        {"prompt": "Hello", "max_tokens": 4, "logit_bias": {str(BAD): 5}},
        "logit_bias",
        BAD,
    ),
    (
        "banned token",
        "/v1/completions",
        {"prompt": "Hello", "max_tokens": 4, "banned_tokens": [BAD]},
        "banned_tokens",
        BAD,
    ),
    (
        "allowed token",
        "/v1/completions",
        {"prompt": "Hello", "max_tokens": 4, "allowed_tokens": [1, BAD]},
        "allowed_tokens",
        BAD,
    ),
    ("stop token id", "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "stop": [BAD]}, "stop", BAD),
    (
        "chat logit_bias",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "logit_bias": {str(-5): 1}},
        "logit_bias",
        -5,
    ),
    (
        "kobold banned token",
        "/api/v1/generate",
        {"prompt": "Hello", "max_length": 4, "banned_tokens": [BAD]},
        "banned_tokens",
        BAD,
    ),
]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path):
    s = KodkodServer.start(tmp_path_factory.mktemp("faults"), {"network": {"api_servers": ["OAI", "Kobold"]}})
    yield s
    s.stop()


async def stream_completion(
    client: httpx.AsyncClient, body: dict[str, Any], first_chunk: asyncio.Event | None = None
) -> tuple[str, str | None]:
    """(text, finish_reason) of a streamed completion; sets `first_chunk` at its first text."""
    parts: list[str] = []
    finish: str | None = None
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            assert "error" not in ev, ev
            for c in ev["choices"]:
                parts.append(c["text"])
                finish = c.get("finish_reason") or finish
            if parts and first_chunk is not None:
                first_chunk.set()
    return "".join(parts), finish


def test_bad_token_ids_get_400s_while_a_stream_beside_them_is_unaffected(srv: KodkodServer) -> None:
    async def run() -> None:
        async with srv.async_client() as client:
            # alone, twice: the second run starts from the cached prefix, as the one under test
            await stream_completion(client, STREAM_BODY)
            reference, finish = await stream_completion(client, STREAM_BODY)
            assert finish == "length" and reference

            first_chunk = asyncio.Event()
            stream = asyncio.ensure_future(stream_completion(client, STREAM_BODY, first_chunk))
            await asyncio.wait_for(first_chunk.wait(), 60)
            for what, path, body, field, bad_id in BAD_REQUESTS:
                r = await client.post(path, json=body)
                assert r.status_code == 400, (what, r.status_code, r.text)
                error = r.json()["error"]
                assert error["type"] == "invalid_request_error", what
                assert error["message"].startswith(f"{field}: token id {bad_id} "), (what, error)
                assert error["param"] == field, what
            r = await client.post("/v1/token/decode", json={"tokens": [BAD]})
            assert r.status_code == 400 and str(BAD) in r.json()["error"]["message"]
            text, finish = await stream

            assert finish == "length"
            assert text == reference
            health = await client.get("/health")
            assert health.status_code == 200, health.text
            assert health.json()["issues"] == []
            r = await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4})
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")

    asyncio.run(run())
    assert engine_stats(srv)["running"] == 0
