"""The engine's per-step debug log and the chat benchmark's reading of it: one line per step
that decoded, with the step's shape and times, parsed back with llama.cpp's KV debug lines
(the attention range) attached to the step they came before."""

from __future__ import annotations

import asyncio
import logging

import pytest
from benchmarks.step_log import parse_steps, summarize_step_log, thread_cpu

from kodkod.core.types import GenerationRequest
from kodkod.engine.client import EngineClient
from kodkod.engine.loop import EngineConfig
from tests.fakes import FakeBackend


def test_every_step_is_logged_once_and_parses_back(caplog: pytest.LogCaptureFixture) -> None:
    backend = FakeBackend(kv_capacity=512, num_slots=8)
    config = EngineConfig(max_seq_len=128, max_batch_size=4, chunk_size=64)

    async def main() -> int:
        client = EngineClient.start(backend, config)
        try:
            reqs = [GenerationRequest(f"r{i}", [i + 1] * (5 + i), max_tokens=6) for i in range(3)]
            await asyncio.gather(*(client.submit(r).collect() for r in reqs))
            deadline = asyncio.get_running_loop().time() + 10
            while client.stats.running or client.stats.waiting:
                assert asyncio.get_running_loop().time() < deadline, client.stats
                await asyncio.sleep(0.005)
            return client.stats.steps
        finally:
            await client.shutdown("test over")

    with caplog.at_level(logging.DEBUG, logger="kodkod.engine.steps"):
        num_steps = asyncio.run(main())
    steps = parse_steps("\n".join(r.getMessage() for r in caplog.records if r.name == "kodkod.engine.steps"))
    assert len(steps) == num_steps == len(backend.batches)
    for step, batch in zip(steps, backend.batches, strict=True):
        assert step.tokens == sum(len(r.tokens) for r in batch)
        assert step.rows + step.chunks == len(batch)
        assert 0 <= step.decode_ms <= step.step_ms
    assert steps[0].kind == "prefill" and steps[0].prompt_tokens == 5 + 6 + 7
    assert sum(s.rows for s in steps) == 3 * 5  # every token after the first came from a decode row


def test_the_log_is_off_by_default(caplog: pytest.LogCaptureFixture) -> None:
    backend = FakeBackend(kv_capacity=256, num_slots=4)

    async def main() -> None:
        client = EngineClient.start(backend, EngineConfig(max_seq_len=64, max_batch_size=2, chunk_size=32))
        try:
            await client.submit(GenerationRequest("a", [1, 2, 3], max_tokens=3)).collect()
        finally:
            await client.shutdown("test over")

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.name == "kodkod.engine.steps"]


def test_kv_debug_lines_give_each_step_its_attention_range() -> None:
    text = "\n".join(
        [
            "DEBUG kodkod.backends.llamacpp.model: find_slot: stream[0], n =  1536, used =   900, head = 1",
            "DEBUG kodkod.backends.llamacpp.model: find_slot: stream[0] min[0] =     0, max[0] =   899",
            "DEBUG kodkod.engine.steps: step kind=decode rows=2 chunks=0 tokens=2 prompt_tokens=0 "
            "decode_ms=10.000 step_ms=11.000 cpu_ms=10.500",
            "DEBUG kodkod.engine.steps: step kind=mixed rows=1 chunks=1 tokens=41 prompt_tokens=40 "
            "decode_ms=30.000 step_ms=31.000 cpu_ms=29.000",
        ]
    )
    first, second = parse_steps(text)
    assert first.ranges == [(1536, 900)] and second.ranges == []
    assert (second.kind, second.rows, second.chunks, second.prompt_tokens) == ("mixed", 1, 1, 40)
    summary = summarize_step_log(text)
    assert "range / used p50 1.71" in summary and "decode       1 steps" in summary


def test_thread_cpu_of_a_vanished_process_is_empty() -> None:
    assert thread_cpu(2**22 + 12345) == {}
