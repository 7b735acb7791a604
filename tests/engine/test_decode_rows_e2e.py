"""Decode steps under the tiled-attention threshold through a real server and the default model
(`engine/decode_rows.py`).

One server in the default layout (one shared KV pool, flash attention on, f16 cache), 70 slots,
its engine step log on (`benchmarks/step_log.py`). 70 concurrent streams: no step holds more
than 63 decode rows, decode steps are full (63 rows) while all 70 stream, and every request
gets all its tokens.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import httpx
import pytest
from benchmarks.step_log import parse_steps, step_log_env

from kodkod.engine.decode_rows import DECODE_MAX_ROWS
from tests.server import KodkodServer, wait_idle

pytestmark = pytest.mark.model

STREAMS = 70
TOKENS = 32  # long enough that all 70 stream at once after the prompts
CONFIG = {"model": {"max_batch_size": STREAMS, "max_seq_len": 128, "cache_size": STREAMS * 128}}


@pytest.fixture(scope="module")
def stepped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KodkodServer]:
    tmp = tmp_path_factory.mktemp("decoderows")
    env = step_log_env(tmp / "steplog", False, os.environ.get("PYTHONPATH", ""))
    srv = KodkodServer.start(tmp / "server", CONFIG, env=env)
    yield srv
    srv.stop()


async def _complete(client: httpx.AsyncClient, i: int) -> dict:
    body = {
        "prompt": f"Item {i}: the keeper of lighthouse number {i} writes in the log that",
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_70_streams_decode_in_steps_of_at_most_63_rows(stepped: KodkodServer) -> None:
    async def run() -> list[dict]:
        async with stepped.async_client(timeout=300.0) as client:
            return await asyncio.gather(*(_complete(client, i) for i in range(STREAMS)))

    results = asyncio.run(run())
    for res in results:
        assert res["choices"][0]["finish_reason"] == "length"
        assert res["usage"]["completion_tokens"] == TOKENS
    wait_idle(stepped)
    steps = [s for s in parse_steps(stepped.log()) if s.rows > 0]
    assert steps, stepped.log()[-3000:]
    assert max(s.rows for s in steps) == DECODE_MAX_ROWS  # the cap was reached, never passed
    assert all(s.rows + s.prompt_tokens < DECODE_MAX_ROWS + 1 for s in steps if s.kind == "mixed")
