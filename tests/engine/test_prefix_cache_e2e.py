"""The prefix cache with the real model: reuse, the busy budget for idle cached cells, the
host-RAM tier (memory.sysmem_kv_cache) that keeps pushed-out prefixes for later reuse, and the
idle compaction of the pool after evictions."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from kodkod.engine.budget import busy_budget
from tests.server import DEFAULT_MODEL, KodkodServer, engine_stats, wait_idle

pytestmark = pytest.mark.model

PREFIX = (
    "<|im_start|>system\n"
    + " ".join(f"Rule {i}: the password for door {i} is {i * 7}." for i in range(60))
    + "<|im_end|>\n"
)


LOAD = {"max_seq_len": 2048, "cache_size": 16384}
BUDGET = busy_budget(LOAD["cache_size"], host_tier=True)  # idle cells allowed while busy (0)


def filler(i: int) -> str:
    return f"Unrelated text number {i}: " + " ".join(f"item {i}-{k}" for k in range(250))


def ask(question: str) -> str:
    return PREFIX + f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path):
    s = KodkodServer.start(
        tmp_path_factory.mktemp("prefix"), {"model": LOAD, "memory": {"sysmem_kv_cache": 256}}
    )
    yield s
    s.stop()


def complete(c: httpx.Client, prompt: str, n: int = 8) -> dict:
    r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_repeated_prefix_is_reused(srv: KodkodServer) -> None:
    with srv.client() as c:
        n_prefix = c.post("/v1/token/encode", json={"text": PREFIX}).json()["length"]
        assert n_prefix > 600
        complete(c, ask("What is the password for door 3?"))
        second = complete(c, ask("What is the password for door 9?"))
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= n_prefix


def test_pushed_out_prefix_is_restored_from_host_ram_identically(srv: KodkodServer) -> None:
    question = ask("Which door has password 42?")
    with srv.client() as c, srv.client(admin=True) as admin:
        # reference: the prefix computed and reused live (nothing pushed out)
        admin.post("/v1/model/unload")
        assert admin.post("/v1/model/load", json={"model_name": DEFAULT_MODEL, **LOAD}).status_code == 200
        complete(c, PREFIX, 1)
        live = complete(c, question)
        # again, but push the cached prefix out to host RAM before reusing it
        admin.post("/v1/model/unload")
        assert admin.post("/v1/model/load", json={"model_name": DEFAULT_MODEL, **LOAD}).status_code == 200
        complete(c, PREFIX, 1)
        n_filler = c.post("/v1/token/encode", json={"text": filler(0)}).json()["length"]
        count = BUDGET // n_filler + 1  # enough idle cells to pass the budget
        for i in range(count + 1):  # while the last runs, the oldest idle prefix moves out
            complete(c, filler(i), 1)
        wait_idle(srv)
        for _ in range(100):  # idle after evicting that much: the pool gets compacted
            stats = engine_stats(srv)
            if stats["kv_compactions"] >= 1:
                break
            time.sleep(0.05)
        assert stats["kv_compactions"] >= 1
        assert stats["host_cache_entries"] >= 1 and stats["cached_tokens"] <= BUDGET + n_filler
        restored = complete(c, question)
        assert engine_stats(srv)["host_cache_restores"] == stats["host_cache_restores"] + 1
    assert restored["usage"]["prompt_tokens_details"]["cached_tokens"] >= 600
    assert restored["choices"][0]["text"] == live["choices"][0]["text"]


def test_regenerated_replies_do_not_pile_up_in_the_live_pool(srv: KodkodServer) -> None:
    """A front end's swipe sends the same prompt again: with the host tier the earlier reply's
    cells leave the live pool while the new one runs (they would slow it down), the prompt
    itself is still reused, and the reply is the same greedy text."""
    question = ask("Tell me about door 12.")
    with srv.client() as c:
        first = complete(c, question, 40)
        before = wait_idle(srv)
        replies = [complete(c, question, 40) for _ in range(3)]
        after = wait_idle(srv)
    n_prompt = first["usage"]["prompt_tokens"]
    for r in replies:
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= n_prompt - 1
        assert r["choices"][0]["text"] == first["choices"][0]["text"]
    # one prompt plus one reply stays live, not four replies
    assert after["cached_tokens"] <= n_prompt + 40
    assert after["host_cache_entries"] >= 1 and before["cached_tokens"] <= n_prompt + 40
