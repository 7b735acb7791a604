"""Idle KV compaction (engine/compaction.py): the plan restores cached slots longest first and
re-shares common prefixes, the backend ends up holding exactly what the scheduler's mirror says,
and an engine that evicted enough compacts itself once idle and keeps serving correctly."""

from __future__ import annotations

import asyncio

import pytest

import kodkod.engine.compaction as compaction_module
from kodkod.core.types import FinishEvent, GenerationRequest
from kodkod.engine.client import EngineClient
from kodkod.engine.compaction import (
    COMPACT_AFTER_EVICTED,
    Move,
    compact,
    plan_compaction,
)
from kodkod.engine.host_cache import HostPrefixCache
from kodkod.engine.loop import EngineConfig
from kodkod.engine.scheduler import CopyPrefix, Scheduler, SchedulerConfig, Truncate
from tests.engine.test_loop import wait_idle
from tests.engine.test_scheduler import make_seq
from tests.fakes import FakeBackend


def replay(backend: FakeBackend, sched: Scheduler, plan) -> None:
    """What the model runner does with a plan: KV ops, then the rows (fake decode)."""
    for op in plan.kv_ops:
        if isinstance(op, CopyPrefix):
            backend.kv_copy(op.src, op.dst, 0, op.length)
        elif isinstance(op, Truncate):
            backend.kv_remove(op.slot, op.length, -1)
    for e in plan.entries:
        backend.kv[e.seq.slot].extend(e.seq.tokens[e.start : e.start + e.num_tokens])
    sched.commit(plan)
    for e in plan.entries:
        if e.num_logits:
            e.seq.tokens.append(7)


def finish(backend: FakeBackend, sched: Scheduler, prompt: list[int], rid: str) -> int:
    seq = make_seq(rid, prompt)
    sched.add(seq)
    while seq.num_computed < len(seq.tokens) - 1 or seq.num_output < 1:
        replay(backend, sched, sched.schedule())
    slot = seq.slot
    sched.remove(seq)
    return slot


def test_with_a_host_tier_compaction_keeps_the_cached_slot_live() -> None:
    """The busy budget is zero with a host tier: an idle prefix leaves the pool when another
    request runs, but at idle nobody knows which prefix the next request adopts, so compaction
    packs what is cached instead of pushing it out."""
    backend = FakeBackend(kv_capacity=4000, num_slots=8)
    host = HostPrefixCache(budget_bytes=10**9)
    sched = Scheduler(
        SchedulerConfig(max_batch_size=4, chunk_size=512), capacity=4000, num_slots=8, host=host
    )
    assert sched.room.busy_cache_cells == 0
    a = finish(backend, sched, list(range(300)), "a")
    c = finish(backend, sched, list(range(1000, 1100)), "c")
    sched.room.evicted_since_compaction = COMPACT_AFTER_EVICTED
    assert [e.tokens for e in host.entries] == [list(range(300))]  # pushed out while c ran
    assert sched.pool.length(a) == 0
    sched.flush()
    moves = plan_compaction(sched)
    assert moves == [Move(c, -1, 0)]
    assert len(host.entries) == 1 and sched.flush() is None
    assert sched.slots.num_cached_tokens == 100


def test_plan_restores_longest_first_and_reshares_prefixes() -> None:
    backend = FakeBackend(kv_capacity=4000, num_slots=8)
    sched = Scheduler(SchedulerConfig(max_batch_size=4, chunk_size=512), capacity=4000, num_slots=8)
    a = finish(backend, sched, list(range(300)), "a")
    b = finish(backend, sched, list(range(200)) + list(range(900, 950)), "b")  # shares 200 with a
    c = finish(backend, sched, list(range(1000, 1100)), "c")
    before = {s: list(backend.kv[s]) for s in (a, b, c)}
    assert sched.pool.cells(b)[:200] == sched.pool.cells(a)[:200]  # shared cells in the mirror
    assert plan_compaction(sched) is None  # nothing was evicted: not due
    sched.room.evicted_since_compaction = COMPACT_AFTER_EVICTED
    moves = plan_compaction(sched)
    assert moves == [Move(a, -1, 0), Move(b, a, 200), Move(c, -1, 0)]
    free_before = sched.pool.free_cells
    compact(backend, sched, moves)
    assert {s: backend.kv[s] for s in (a, b, c)} == before  # the same KV, slot by slot
    assert sched.pool.free_cells == free_before and sched.room.evicted_since_compaction == 0
    # the cache still serves: a request continuing b reuses its whole prompt
    follow = make_seq("d", list(range(200)) + list(range(900, 950)) + [7, 5])
    sched.add(follow)
    plan = sched.schedule()
    assert follow.num_cached >= 250
    replay(backend, sched, plan)


def test_small_pools_are_left_alone() -> None:
    backend = FakeBackend(kv_capacity=2048, num_slots=8)
    sched = Scheduler(SchedulerConfig(max_batch_size=4, chunk_size=512), capacity=2048, num_slots=8)
    finish(backend, sched, list(range(300)), "a")
    sched.room.evicted_since_compaction = COMPACT_AFTER_EVICTED
    assert plan_compaction(sched) is None


def test_not_planned_while_anything_runs() -> None:
    backend = FakeBackend(kv_capacity=4000, num_slots=8)
    sched = Scheduler(SchedulerConfig(max_batch_size=4, chunk_size=512), capacity=4000, num_slots=8)
    finish(backend, sched, list(range(300)), "a")
    running = make_seq("r", list(range(500, 540)))
    sched.add(running)
    replay(backend, sched, sched.schedule())
    sched.room.evicted_since_compaction = COMPACT_AFTER_EVICTED
    assert plan_compaction(sched) is None


def test_engine_compacts_when_idle_and_keeps_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = FakeBackend(n_vocab=64, kv_capacity=4096, num_slots=8)  # > MIN_BUSY_CACHE_CELLS
    seen: list[list[Move]] = []  # every plan the engine made

    def recording_plan(sched: Scheduler) -> list[Move] | None:
        moves = plan_compaction(sched)
        if moves:
            seen.append(moves)
        return moves

    monkeypatch.setattr(compaction_module, "plan_compaction", recording_plan)

    async def main() -> None:
        config = EngineConfig(max_seq_len=200, max_batch_size=4, chunk_size=16, busy_cache_cells=120)
        client = EngineClient.start(backend, config)
        try:
            common = list(range(1, 21))
            last: list[tuple[list[int], list[int]]] = []
            for i in range(40):  # distinct tails: evictions pile up while others run
                tails = [[(i * 7 + k * 3 + j) % 50 + 1 for j in range(30)] for k in range(2)]
                prompts = [common + tail for tail in tails]
                reqs = [GenerationRequest(f"r{i}-{k}", p, max_tokens=6) for k, p in enumerate(prompts)]
                results = await asyncio.gather(*(client.submit(r).collect() for r in reqs))
                assert all(isinstance(final, FinishEvent) for _, final in results)
                last = [(p, tokens.token_ids) for p, (tokens, _) in zip(prompts, results, strict=True)]
            await wait_idle(client)
            assert client.stats.compactions >= 1  # it happened along the way
            # once more, right now: mark enough evicted cells and let one small request pass
            sched = client._engine._sched  # idle: the engine thread waits for commands
            before = client.stats.compactions
            sched.room.evicted_since_compaction = COMPACT_AFTER_EVICTED
            _, final = await client.submit(GenerationRequest("wake", [*common, 40], max_tokens=2)).collect()
            assert isinstance(final, FinishEvent)
            for _ in range(100):
                if client.stats.compactions > before:
                    break
                await asyncio.sleep(0.01)
            assert client.stats.compactions == before + 1
            assert any(m.shared for m in seen[-1])  # the last plan re-shared a prefix
            for slot in sched.slots.cached():  # the backend holds exactly what the mirror says
                assert backend.kv[slot.index] == slot.tokens[: sched.pool.length(slot.index)]
            # the newest prefixes survived compaction intact (shared parts included): asking
            # again reuses them, and the fake backend refuses any position without KV
            for k, (prompt, out) in enumerate(last):
                again = GenerationRequest(f"again{k}", prompt, max_tokens=6)
                tokens, final = await client.submit(again).collect()
                assert isinstance(final, FinishEvent) and tokens.token_ids == out
                assert final.usage.cached_tokens == len(prompt) - 1
        finally:
            await client.shutdown("test over")

    asyncio.run(main())
