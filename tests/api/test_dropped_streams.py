"""Hostile: clients that vanish. 200 streaming requests, each dropped right after its first
chunk (the client closes the connection), over the OpenAI completion and chat streams and
Kobold's SSE stream, 16 at a time. Afterwards the engine is idle again (nothing running or
waiting), the dropped requests did not run to their length limit, and a normal request works."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import KodkodServer, engine_stats, wait_idle

pytestmark = pytest.mark.model

N_REQUESTS = 200
CONCURRENCY = 16
MAX_TOKENS = 2000


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path):
    s = KodkodServer.start(
        tmp_path_factory.mktemp("dropped"),
        {"network": {"api_servers": ["OAI", "Kobold"]}, "model": {"max_seq_len": 4096}},
    )
    yield s
    s.stop()


def requests() -> list[tuple[str, dict[str, Any]]]:
    """(path, body) for each dropped stream; prompts differ so few share a cached prefix."""
    common = {"max_tokens": MAX_TOKENS, "ban_eos_token": True, "temperature": 0.8, "stream": True}
    kinds = itertools.cycle(["completion", "chat", "kobold"])
    out = []
    for i, kind in zip(range(N_REQUESTS), kinds, strict=False):
        text = f"Story {i}: write a very long tale about item number {i}."
        if kind == "completion":
            out.append(("/v1/completions", {**common, "prompt": text}))
        elif kind == "chat":
            out.append(("/v1/chat/completions", {**common, "messages": [{"role": "user", "content": text}]}))
        else:
            out.append(("/api/extra/generate/stream", {**common, "prompt": text, "max_length": MAX_TOKENS}))
    return out


async def drop_after_first_chunk(
    client: httpx.AsyncClient, gate: asyncio.Semaphore, path: str, body: dict[str, Any]
) -> int:
    """Start a stream, read until its first data line, then close the connection."""
    async with gate:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return r.status_code
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    break
        return 200  # leaving the block closes the connection with the body unread


def test_dropped_streams_leave_the_engine_idle(srv: KodkodServer) -> None:
    before = engine_stats(srv)["generated_tokens"]

    async def run() -> list[int]:
        gate = asyncio.Semaphore(CONCURRENCY)
        # one connection per stream: a dropped stream's connection is closed, never reused
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=srv.base_url, headers=srv.headers(), timeout=120.0, limits=limits
        ) as client:
            return await asyncio.gather(*(drop_after_first_chunk(client, gate, p, b) for p, b in requests()))

    statuses = asyncio.run(run())
    assert statuses == [200] * N_REQUESTS
    stats = wait_idle(srv, timeout_s=60.0)
    assert stats["running"] == 0 and stats["waiting"] == 0
    generated = stats["generated_tokens"] - before
    # had the dropped requests kept running, each would have made MAX_TOKENS tokens
    assert generated < N_REQUESTS * MAX_TOKENS // 20, generated
    assert srv.proc.poll() is None
    with srv.client() as c:
        assert c.get("/health").status_code == 200
        r = c.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
