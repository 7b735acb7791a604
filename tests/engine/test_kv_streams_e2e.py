"""Per-slot KV streams (`model.kv_layout: per_slot`) through a real server and the default model.

One server, 4 slots of 512 cells each (cache_size 2048 / max_batch_size 4), batch invariance on
so a request's greedy text may be compared beside others and alone. Concurrent requests that
share a long system prompt reuse it from another slot's stream (a real copy, or the cached slot
adopted in place when none is free), and produce the same text as when they run one at a time;
a request longer than a slot's cells gets a clear 400 and hurts nobody else.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import DEFAULT_MODEL, KodkodServer, wait_idle

pytestmark = pytest.mark.model

CELLS = 512
SLOTS = 4
CONFIG = {
    "model": {
        "kv_layout": "per_slot",
        "max_batch_size": SLOTS,
        "cache_size": CELLS * SLOTS,
        "batch_invariant": True,
    }
}
SYSTEM = (
    "<|im_start|>system\nYou are a careful assistant for a lighthouse keepers' guild. You answer "
    "in plain sentences, you never use lists, you mention the weather when it matters, and you "
    "keep every answer short and friendly. The guild has three lighthouses on the north coast, "
    "each with a keeper, a boat and a small garden.<|im_end|>\n"
)
# distinct first letters: every request shares exactly the system prompt with every other one,
# whatever order they reach the engine in
QUESTIONS = [
    "What should a keeper do before a storm?",
    "How often is the lamp cleaned?",
    "Describe the garden of a lighthouse.",
    "Tell me who rows the boat in winter.",
    "Name the oldest lighthouse of the guild.",
    "Explain how a keeper spends the evening.",
    "Can a keeper leave the lighthouse in autumn?",
    "Please say what colour the guild's flag is.",
]


def prompt(question: str) -> str:
    return f"{SYSTEM}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def body(question: str) -> dict[str, Any]:
    return {"prompt": prompt(question), "max_tokens": 40, "temperature": 0}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    s = KodkodServer.start(tmp_path_factory.mktemp("kvstreams"), CONFIG)
    yield s
    s.stop()


def reload_model(srv: KodkodServer) -> None:
    """A fresh context (an empty prefix cache in every slot) of the same geometry."""
    load = {"model_name": DEFAULT_MODEL, "max_batch_size": SLOTS, "cache_size": CELLS * SLOTS}
    with srv.client(admin=True) as admin:
        admin.post("/v1/model/unload")
        with admin.stream("POST", "/v1/model/load", json=load) as r:
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert events and events[-1].get("status") == "finished", events[-1:]


def complete(c: httpx.Client, question: str) -> tuple[str, int]:
    r = c.post("/v1/completions", json=body(question))
    assert r.status_code == 200, r.text
    out = r.json()
    return out["choices"][0]["text"], out["usage"]["prompt_tokens_details"]["cached_tokens"]


async def complete_many(srv: KodkodServer, questions: list[str]) -> list[tuple[str, int]]:
    async with srv.async_client() as c:
        replies = await asyncio.gather(*(c.post("/v1/completions", json=body(q)) for q in questions))
    out = []
    for r in replies:
        assert r.status_code == 200, r.text
        data = r.json()
        out.append((data["choices"][0]["text"], data["usage"]["prompt_tokens_details"]["cached_tokens"]))
    return out


def test_the_model_card_shows_the_layout_and_the_capped_max_seq_len(srv: KodkodServer) -> None:
    with srv.client() as c:
        params = c.get("/v1/model").json()["parameters"]
    assert params["kv_layout"] == "per_slot"
    assert params["kv_cells_per_slot"] == CELLS
    assert params["max_seq_len"] == CELLS  # the trained context does not fit a slot: capped


def test_concurrent_streams_with_a_shared_prefix_match_each_alone(srv: KodkodServer) -> None:
    """First wave: 3 requests beside each other copy the system prompt from the slot of a
    request before them (free slots left). Second wave: 4 at once with every slot holding a
    cached prefix, so each adopts a cached slot in place. Each text equals the same request run
    alone after the same history, and the shared prompt is counted as reused."""
    first, *wave1 = QUESTIONS[:4]
    wave2 = QUESTIONS[4:8]
    reload_model(srv)
    with srv.client() as c:
        ref_first = complete(c, first)
        alone1 = [complete(c, q) for q in wave1]
        alone2 = [complete(c, q) for q in wave2]
    reload_model(srv)
    with srv.client() as c:
        assert complete(c, first) == ref_first
    together1 = asyncio.run(complete_many(srv, wave1))
    together2 = asyncio.run(complete_many(srv, wave2))
    assert [t for t, _ in together1] == [t for t, _ in alone1]
    assert [t for t, _ in together2] == [t for t, _ in alone2]
    system_tokens = len(SYSTEM) // 8  # well below the system prompt's real token count
    for (_, cached), (_, ref_cached) in zip(together1 + together2, alone1 + alone2, strict=True):
        assert cached >= system_tokens
        assert cached == ref_cached
    assert all(text for text, _ in together1 + together2)
    stats = wait_idle(srv)
    assert stats["running"] == 0 and stats["waiting"] == 0
    with srv.client() as c:
        assert c.get("/v1/model").json()["parameters"]["kv_cells_per_slot"] == CELLS


def test_a_request_longer_than_a_slot_is_a_clear_400_and_hurts_no_one(srv: KodkodServer) -> None:
    long_prompt = "lighthouse " * (CELLS + 50)

    async def run() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with srv.async_client() as c:
            return await asyncio.gather(
                c.post("/v1/completions", json=body(QUESTIONS[0])),
                c.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 8}),
                c.post("/v1/completions", json={**body(QUESTIONS[1]), "max_tokens": CELLS}),
            )

    ok, too_long, too_many = asyncio.run(run())
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"]
    for r in (too_long, too_many):
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert f"maximum context length is {CELLS} tokens" in err["message"]
    with srv.client() as c:
        assert c.post("/v1/completions", json=body(QUESTIONS[2])).status_code == 200
