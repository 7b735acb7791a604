"""`EngineClient.slots()`: the engine's live sequences, read on its thread (fake backend)."""

from __future__ import annotations

import asyncio
import time

import pytest

from kodkod.core.types import FinishEvent, GenerationRequest
from kodkod.engine.client import EngineClient, EngineUnavailableError
from kodkod.engine.loop import EngineConfig
from kodkod.engine.sequence import SeqStatus
from tests.engine.test_scheduler import make_seq
from tests.fakes import FakeBackend


def test_slots_lists_running_and_waiting_sequences_and_answers_when_idle() -> None:
    backend = FakeBackend(kv_capacity=512, num_slots=4, delay_s=0.01)

    async def main() -> None:
        client = EngineClient.start(backend, EngineConfig(max_seq_len=200, max_batch_size=2, chunk_size=8))
        try:
            idle = await client.slots()  # nothing runs: the engine thread still answers
            assert idle.sequences == () and idle.kv_free_cells == idle.kv_capacity == 512
            streams = [
                client.submit(
                    GenerationRequest(f"r{i}", [10 + i, 11, 12], max_tokens=150, ban_eos_token=True)
                )
                for i in range(3)
            ]
            deadline = time.monotonic() + 30
            while True:
                view = await client.slots(with_prompt=True)
                running = [s for s in view.sequences if s.state == "running"]
                if len(running) == 2 and all(s.generated_tokens > 0 for s in running):
                    break
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            waiting = [s for s in view.sequences if s.state == "waiting"]
            assert [s.request_id for s in waiting] == ["r2"] and waiting[0].slot == -1
            assert {s.request_id for s in running} == {"r0", "r1"}
            for s in running:
                assert s.prompt_tokens == 3 and s.slot >= 0 and s.age_s >= 0
                assert s.prompt_ids == (10 + int(s.request_id[1]), 11, 12)
            assert view.kv_used_cells >= sum(s.computed_tokens for s in running) > 0
            plain = await client.slots()
            assert all(s.prompt_ids is None for s in plain.sequences)  # only when asked for
            results = await asyncio.gather(*(s.collect() for s in streams))
            assert all(isinstance(final, FinishEvent) for _, final in results)
            after = await client.slots()
            assert after.sequences == ()
            assert sum(c.tokens for c in after.cached_prefixes) > 0  # finished KV stays cached
        finally:
            await client.shutdown("test over")
        with pytest.raises(EngineUnavailableError):
            await client.slots()

    asyncio.run(main())


def test_queue_time_is_the_wait_before_first_running() -> None:
    backend = FakeBackend(kv_capacity=512, num_slots=4, delay_s=0.005)

    async def main() -> None:
        client = EngineClient.start(backend, EngineConfig(max_seq_len=200, max_batch_size=1, chunk_size=8))
        try:
            first = client.submit(GenerationRequest("a", [10, 11], max_tokens=40, ban_eos_token=True))
            second = client.submit(GenerationRequest("b", [12, 13], max_tokens=2, ban_eos_token=True))
            (_, end_a), (_, end_b) = await asyncio.gather(first.collect(), second.collect())
            assert isinstance(end_a, FinishEvent) and isinstance(end_b, FinishEvent)
            # b waited for all of a (batch of one); its queue time lies inside its TTFT
            assert end_b.usage.queue_time_s >= end_a.usage.completion_time_s
            assert end_b.usage.queue_time_s <= end_b.usage.prompt_time_s
            assert end_a.usage.queue_time_s <= end_a.usage.prompt_time_s
        finally:
            await client.shutdown("test over")

    asyncio.run(main())


def test_status_setter_keeps_the_first_admission() -> None:
    s = make_seq("x", [1, 2, 3])
    assert s.status is SeqStatus.WAITING and s.stats.start_s == 0.0
    s.status = SeqStatus.RUNNING
    first = s.stats.start_s
    assert first > 0
    s.status = SeqStatus.WAITING  # preempted
    s.status = SeqStatus.RUNNING
    assert s.stats.start_s == first
