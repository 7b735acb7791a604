"""Per-slot KV streams (`kv_layout: per_slot`): the pool's per-slot accounting, the scheduler's
admission (copy into a free slot, adopt a cached one in place), no trimming or compaction, the
engine over a fake backend whose slots hold at most their stream, and the context plan."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kodkod.core.backend_types import ModelInfo
from kodkod.core.types import FinishEvent, GenerationRequest
from kodkod.engine.client import EngineClient
from kodkod.engine.compaction import plan_compaction
from kodkod.engine.config import build_parts
from kodkod.engine.host_cache import HostPrefixCache
from kodkod.engine.kv import KVPool, SlotState
from kodkod.engine.loop import EngineConfig
from kodkod.engine.scheduler import CopyPrefix, Offload, Scheduler, SchedulerConfig, Truncate
from kodkod.models.context import draft_context, plan_context
from kodkod.models.params import DraftParams, LoadParamError, ModelLoadParams
from tests.engine.test_scheduler import make_seq, run_step
from tests.fakes import FakeBackend

# -- KVPool ------------------------------------------------------------------------------------


def test_a_slot_holds_at_most_its_stream_whatever_the_others_leave_free() -> None:
    pool = KVPool(capacity=0, num_slots=4, slot_cells=64)
    assert pool.capacity == 256 and pool.free_cells == 256 and pool.per_slot
    pool.append(0, 64)
    assert pool.room(0) == 0 and pool.room(1) == 64 and pool.free_cells == 192
    with pytest.raises(MemoryError):
        pool.append(0, 1)  # 192 cells free in the pool, none in slot 0's stream
    pool.truncate(0, 10)
    assert pool.room(0) == 54 and pool.free_cells == 246
    assert all(0 <= c < 64 for c in pool.cells(0))  # slot 0's virtual cells are its stream's


def test_a_copied_prefix_takes_cells_of_its_own() -> None:
    pool = KVPool(capacity=0, num_slots=3, slot_cells=32)
    pool.append(0, 20)
    pool.copy_prefix(0, 1, 12)
    assert pool.length(1) == 12 and pool.room(1) == 20 and pool.free_cells == 96 - 32
    assert not set(pool.cells(0)) & set(pool.cells(1))  # nothing shared across streams
    pool.truncate(0, 0)  # the source going away leaves the copy whole
    assert pool.length(1) == 12 and pool.exclusive_cells(1) == 12 and pool.free_cells == 96 - 12


# -- scheduler ---------------------------------------------------------------------------------


def per_slot(num_slots: int = 2, cells: int = 64, host: HostPrefixCache | None = None) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_batch_size=num_slots, chunk_size=256),
        capacity=num_slots * cells,
        num_slots=num_slots,
        host=host,
        slot_cells=cells,
    )


def finish(sched: Scheduler, seq, steps: int = 3) -> None:  # type: ignore[no-untyped-def]
    for _ in range(steps):
        run_step(sched)
    sched.remove(seq)


def test_full_slots_run_side_by_side_without_eviction_or_preemption() -> None:
    """Each of 4 sequences fills its stream to the last cell; in one shared pool of the same
    cells they could not all grow, here no one waits for another's cells."""
    sched = per_slot(num_slots=4, cells=32)
    seqs = [make_seq(f"s{i}", [i * 50 + j + 1 for j in range(24)], max_len=32) for i in range(4)]
    for s in seqs:
        sched.add(s)
    while any(len(s.tokens) < s.max_len for s in seqs):
        run_step(sched)
    assert all(sched.pool.length(s.slot) == 31 for s in seqs)  # the last token is never computed
    assert sched.num_preemptions == 0 and not sched.waiting


def test_a_partial_prefix_is_copied_into_a_free_slot_and_the_cache_kept() -> None:
    sched = per_slot(num_slots=3)
    a = make_seq("a", list(range(1, 41)))
    sched.add(a)
    finish(sched, a)
    b = make_seq("b", [*range(1, 31), 99, 98])
    sched.add(b)
    plan = run_step(sched)
    assert CopyPrefix(0, b.slot, 30) in plan.kv_ops  # from a's slot (0)
    assert b.num_cached == 30 and sched.pool.length(0) == 42  # a's cached slot untouched
    assert sched.slots.slots[0].state is SlotState.CACHED
    assert sched.pool.free_cells == 3 * 64 - 42 - 32  # b's own copy of the 30, and its 2


def test_with_no_free_slot_the_cached_slot_is_adopted_in_place() -> None:
    """No copy, no other slot evicted: the cached slot holding the prefix is cut to it, its
    whole prefix offered to the host tier first."""
    host = HostPrefixCache(budget_bytes=1 << 20)
    sched = per_slot(num_slots=2, cells=128, host=host)
    a = make_seq("a", list(range(1, 81)))
    other = make_seq("o", list(range(200, 240)))
    for s in (a, other):
        sched.add(s)
    run_step(sched)
    for s in (a, other):
        sched.remove(s)
    b = make_seq("b", [*range(1, 71), 99])
    sched.add(b)
    plan = run_step(sched)
    assert b.slot == 0 and b.num_cached == 70
    assert not any(isinstance(op, CopyPrefix) for op in plan.kv_ops)
    assert plan.kv_ops[:2] == [Offload(0, host.entries[0]), Truncate(0, 70)]
    assert host.entries[0].tokens == list(range(1, 81))  # what its KV held
    assert sched.slots.slots[1].state is SlotState.CACHED  # the other user's history stays


def test_idle_slots_are_not_trimmed_nor_compacted() -> None:
    """Idle streams are outside the running slots' attention: a busy engine keeps them all."""
    sched = per_slot(num_slots=4, cells=2048)
    assert sched.room.busy_cache_cells == sched.pool.capacity
    done = [make_seq(f"d{i}", [i * 100 + j + 1 for j in range(90)]) for i in range(3)]
    for s in done:
        sched.add(s)
    run_step(sched)
    for s in done:
        sched.remove(s)
    runner = make_seq("r", [7] * 20)
    sched.add(runner)
    run_step(sched)
    assert len(sched.slots.cached()) == 3 and sched.room.evicted_since_compaction == 0
    sched.remove(runner)
    sched.room.evicted_since_compaction = 10_000
    assert plan_compaction(sched) is None


# -- engine over a fake backend ------------------------------------------------------------------


def test_a_burst_sharing_a_prefix_gets_exact_output_within_each_stream() -> None:
    """8 requests sharing a 40-token prefix, 4 slots of 64 cells: the fake backend refuses any
    slot growing past its stream, and every request gets the fake model's continuation."""
    backend = FakeBackend(kv_capacity=256, num_slots=4, slot_cells=64)
    config = EngineConfig(max_seq_len=64, max_batch_size=4, chunk_size=32)
    shared = [(j % 50) + 1 for j in range(40)]

    async def main() -> list[tuple[list[int], object]]:
        client = EngineClient.start(backend, config)
        try:
            first = await client.submit(GenerationRequest("p", [*shared, 20], max_tokens=4)).collect()
            reqs = [GenerationRequest(f"b{i}", [*shared, 30 + i], max_tokens=16) for i in range(8)]
            results = await asyncio.gather(*(client.submit(r).collect() for r in reqs))
            assert client.stats.preemptions == 0
        finally:
            await client.shutdown("test over")
        return [(first[0].token_ids, first[1])] + [(t.token_ids, f) for t, f in results]

    results = asyncio.run(main())
    lasts = [20] + [30 + i for i in range(8)]  # no continuation reaches the EOS (0)
    counts = [4] + [16] * 8
    for (tokens, final), last, n in zip(results, lasts, counts, strict=True):
        assert isinstance(final, FinishEvent), final
        assert tokens == [(last + 1 + k) % 64 for k in range(n)]
        assert final.usage.cached_tokens == (0 if last == 20 else 40)
    assert max(len(kv) for kv in backend.kv) <= 64


def test_the_engine_refuses_a_max_seq_len_longer_than_a_stream() -> None:
    backend = FakeBackend(kv_capacity=256, num_slots=4, slot_cells=64)
    with pytest.raises(ValueError, match="64 KV cells of each slot"):
        build_parts(backend, EngineConfig(max_seq_len=65, max_batch_size=4, chunk_size=32), None, print)


# -- context plan ------------------------------------------------------------------------------


def info() -> ModelInfo:
    return ModelInfo(
        name="m",
        path=Path("m.gguf"),
        architecture="llama",
        n_vocab=10,
        n_ctx_train=8192,
        n_params=1,
        size_bytes=1,
        bos_id=None,
        eos_ids=frozenset(),
        add_bos=False,
        bos_text="",
        eos_text="",
        chat_template=None,
    )


def test_per_slot_plan_gives_each_slot_its_cells_and_caps_an_unset_max_seq_len() -> None:
    plan = plan_context(ModelLoadParams(kv_layout="per_slot", max_batch_size=8, cache_size=8192), info(), 2)
    assert plan.num_slots == 8 and plan.cells_per_slot == 1024 and plan.max_seq_len == 1024
    assert not plan.config.kv_unified and plan.config.cache_size == 8192
    odd = plan_context(ModelLoadParams(kv_layout="per_slot", max_batch_size=3, cache_size=1024), info(), 2)
    assert odd.cells_per_slot == 512 and odd.max_seq_len == 512  # 1024 / 3, padded to 256 like llama.cpp
    unified = plan_context(ModelLoadParams(max_batch_size=8, cache_size=8192), info(), 2)
    assert unified.config.kv_unified and unified.cells_per_slot == 0 and unified.max_seq_len == 8192
    draft = draft_context(DraftParams(), info(), plan, True)
    assert not draft.config.kv_unified and draft.cells_per_slot == 1024 and draft.num_slots == 8


def test_an_explicit_max_seq_len_longer_than_a_slot_is_refused_with_the_way_out() -> None:
    params = ModelLoadParams(kv_layout="per_slot", max_batch_size=8, cache_size=8192, max_seq_len=2048)
    with pytest.raises(LoadParamError) as err:
        plan_context(params, info(), 2)
    msg = str(err.value)
    assert "1024 KV cells" in msg and "max_seq_len <= 1024" in msg and "cache_size >= 16384" in msg
    ok = ModelLoadParams(kv_layout="per_slot", max_batch_size=8, cache_size=8192, max_seq_len=1000)
    assert plan_context(ok, info(), 2).max_seq_len == 1000
