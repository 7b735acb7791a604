"""A burst of concurrent requests through a real server with the default settings (batch
invariance off): their prompts share prefill steps, and every request still gets its own
answer — nothing of one sequence's prompt leaks into another's, every stream finishes with
the length and usage it asked for, and the engine ends idle."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server import KodkodServer, wait_idle

pytestmark = pytest.mark.model

CLIENTS = 16
MAX_TOKENS = 12
# Counting from a different number each (100 apart): a continuation that does not follow its
# own prompt (a prompt computed into another sequence's cells) shows up as a wrong number.
STARTS = [100 * (i + 1) + 3 * i for i in range(CLIENTS)]


def counting(start: int) -> str:
    return "Numbers: " + ", ".join(str(n) for n in range(start, start + 6)) + ","


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    s = KodkodServer.start(tmp_path_factory.mktemp("burst"), {"model": {"max_seq_len": 1024}})
    yield s
    s.stop()


async def stream(client: httpx.AsyncClient, prompt: str) -> tuple[str, dict]:
    """(text, last chunk with usage) of a streamed greedy completion."""
    body = {
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    parts: list[str] = []
    final: dict = {}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            assert "error" not in ev, ev
            for choice in ev["choices"]:
                parts.append(choice["text"])
                if choice.get("finish_reason"):
                    final["finish_reason"] = choice["finish_reason"]
            if ev.get("usage"):
                final["usage"] = ev["usage"]
    return "".join(parts), final


def first_number(text: str) -> int | None:
    found = re.search(r"\d+", text)
    return int(found.group()) if found else None


def near(found: int | None, expected: int) -> bool:
    """The small model sometimes skips a number; another request's count is 100 away."""
    return found is not None and abs(found - expected) <= 3


def test_concurrent_streams_each_get_their_own_answer(srv: KodkodServer) -> None:
    prompts = [counting(s) for s in STARTS]
    with srv.client() as c:
        lengths = [c.post("/v1/token/encode", json={"text": p}).json()["length"] for p in prompts]
    before = wait_idle(srv)

    async def burst() -> list[tuple[str, dict]]:
        async with srv.async_client() as c:
            return await asyncio.gather(*(stream(c, p) for p in prompts))

    results = asyncio.run(burst())
    after = wait_idle(srv)
    for start, n_prompt, (text, final) in zip(STARTS, lengths, results, strict=True):
        assert final.get("finish_reason") == "length", (start, final)
        assert final["usage"]["completion_tokens"] == MAX_TOKENS
        assert final["usage"]["prompt_tokens"] == n_prompt
        assert near(first_number(text), start + 6), (start, text)  # its own count goes on
    assert after["running"] == 0 and after["waiting"] == 0
    assert after["generated_tokens"] - before["generated_tokens"] == CLIENTS * MAX_TOKENS
    assert after["preemptions"] == before["preemptions"]


def test_prompts_submitted_together_are_prefilled_together(srv: KodkodServer) -> None:
    """One request with a list of prompts submits them all at once: they share a few prefill
    steps (prefilled alone, it takes one step per prompt at least)."""
    starts = [s + 7 for s in STARTS]  # not cached by the test above
    before = wait_idle(srv)
    with srv.client() as c:
        body = {"prompt": [counting(s) for s in starts], "max_tokens": MAX_TOKENS, "temperature": 0}
        r = c.post("/v1/completions", json={**body, "ignore_eos": True})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda ch: ch["index"])
    for start, choice in zip(starts, choices, strict=True):
        assert near(first_number(choice["text"]), start + 6), (start, choice["text"])
    after = wait_idle(srv)
    assert after["prefill_steps"] - before["prefill_steps"] < CLIENTS // 2
    assert after["generated_tokens"] - before["generated_tokens"] == CLIENTS * MAX_TOKENS
