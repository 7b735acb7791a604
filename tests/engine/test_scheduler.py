"""Scheduler and KV-pool logic, pure (no backend): admission, chunked prefill, prefix reuse,
eviction, preemption, abort."""

from __future__ import annotations

import pytest

from kodkod.core.types import GenerationRequest
from kodkod.engine.detokenizer import IncrementalDetokenizer
from kodkod.engine.host_cache import HostPrefixCache
from kodkod.engine.kv import KVPool, SlotState, common_prefix_len
from kodkod.engine.scheduler import (
    CopyPrefix,
    Offload,
    Restore,
    Scheduler,
    SchedulerConfig,
    StepKind,
    Truncate,
)
from kodkod.engine.sequence import SeqStatus, Sequence
from kodkod.engine.stopping import StopStringMatcher


class NullSink:
    def push(self, event: object) -> None:
        pass


def make_seq(rid: str, prompt: list[int], max_len: int = 10_000) -> Sequence:
    req = GenerationRequest(rid, list(prompt))
    return Sequence(
        request=req,
        sink=NullSink(),
        tokens=list(prompt),
        num_prompt=len(prompt),
        detok=IncrementalDetokenizer(lambda t: b"x"),
        stops=StopStringMatcher([]),
        stop_ids=frozenset(),
        eos_ids=frozenset(),
        max_len=max_len,
    )


def run_step(sched: Scheduler, next_token: int = 7):
    """Plan one step, pretend it decoded, append a sampled token where logits came out."""
    plan = sched.schedule()
    assert plan is not None
    sched.commit(plan)
    for e in plan.entries:
        if e.num_logits:
            e.seq.tokens.append(next_token)
    return plan


def test_kv_pool_shares_and_frees_exactly() -> None:
    pool = KVPool(capacity=100, num_slots=4)
    pool.append(0, 30)
    assert pool.free_cells == 70
    pool.copy_prefix(0, 1, 20)  # shared cells: no new cells used
    assert pool.free_cells == 70
    pool.append(1, 5)
    assert pool.free_cells == 65
    pool.truncate(0, 0)  # slot 0 gone: its 10 unshared cells free, 20 shared stay with slot 1
    assert pool.free_cells == 75
    assert pool.length(1) == 25
    assert pool.exclusive_cells(1) == 25
    pool.truncate(1, 10)
    assert pool.free_cells == 90


def test_common_prefix_len() -> None:
    assert common_prefix_len([1, 2, 3, 4], [1, 2, 9]) == 2
    assert common_prefix_len([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix_len([], [1]) == 0
    a = list(range(5000))
    b = [*a[:3333], -1, *a[3334:]]
    assert common_prefix_len(a, b) == 3333


def test_admission_respects_max_batch_size() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=2, chunk_size=64), capacity=1000, num_slots=6)
    seqs = [make_seq(f"r{i}", [i * 10 + j for j in range(5)]) for i in range(4)]
    for s in seqs:
        sched.add(s)
    sched.schedule()
    assert len(sched.running) == 2
    assert [s.request_id for s in sched.waiting] == ["r2", "r3"]


def test_chunked_prefill_alone_then_decode() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=4, chunk_size=16), capacity=1000, num_slots=8)
    seq = make_seq("a", list(range(50)))
    sched.add(seq)
    sizes = []
    for _ in range(4):
        plan = run_step(sched)
        assert plan.kind is StepKind.PREFILL
        assert len(plan.entries) == 1
        sizes.append((plan.entries[0].num_tokens, plan.entries[0].num_logits))
    assert sizes == [(16, 0), (16, 0), (16, 0), (2, 1)]  # logits only at the end of the prompt
    plan = run_step(sched)
    assert plan.kind is StepKind.DECODE and plan.entries[0].num_tokens == 1
    assert seq.num_computed == 51


def test_batch_invariant_prefill_never_shares_a_batch_and_alternates_with_decode() -> None:
    sched = Scheduler(
        SchedulerConfig(max_batch_size=4, chunk_size=8, batch_invariant=True), capacity=1000, num_slots=8
    )
    a = make_seq("a", [1, 2, 3])
    sched.add(a)
    run_step(sched)  # a prefilled, first token sampled
    b = make_seq("b", list(range(100, 130)))
    sched.add(b)
    kinds = []
    for _ in range(6):
        plan = run_step(sched)
        kinds.append(plan.kind)
        if plan.kind is StepKind.PREFILL:
            assert [e.seq for e in plan.entries] == [b]
        else:
            assert all(e.num_tokens == 1 for e in plan.entries)
    assert kinds[:6] == [StepKind.DECODE, StepKind.PREFILL] * 3


def test_exact_cached_prefix_is_adopted_without_copy() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=4, chunk_size=64), capacity=1000, num_slots=8)
    a = make_seq("a", list(range(20)))
    sched.add(a)
    run_step(sched)
    run_step(sched)  # decode one
    sched.remove(a)  # finished: 21 computed tokens stay cached
    slot_a = sched.slots.slots[0]
    assert slot_a.state is SlotState.CACHED
    # the follow-up turn extends exactly what is cached
    b = make_seq("b", [*a.tokens[:21], 99, 98])
    sched.add(b)
    plan = sched.schedule()
    assert b.slot == 0 and b.num_computed == 21
    assert plan is not None and plan.kv_ops == []
    assert plan.entries[0].num_tokens == 2


def test_partial_prefix_is_shared_into_a_new_slot_and_cache_kept() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=4, chunk_size=64), capacity=1000, num_slots=8)
    a = make_seq("a", list(range(30)))
    sched.add(a)
    run_step(sched)
    sched.remove(a)
    free_before = sched.pool.free_cells
    b = make_seq("b", [*range(25), 500, 501, 502])
    sched.add(b)
    plan = sched.schedule()
    assert plan is not None
    assert b.slot != a.slot or sched.slots.slots[0].state is SlotState.ACTIVE
    assert CopyPrefix(0, b.slot, 25) in plan.kv_ops
    assert b.num_computed == 25
    assert sched.pool.free_cells == free_before  # shared cells cost nothing
    assert sched.slots.slots[0].state is SlotState.CACHED  # the old conversation stays cached


def test_identical_prompts_wait_for_one_prefill_and_share_it() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=4, chunk_size=16), capacity=1000, num_slots=8)
    prompt = list(range(40))
    seqs = [make_seq(f"c{i}", prompt) for i in range(3)]
    for s in seqs:
        sched.add(s)
    prefilled = 0
    for _ in range(10):
        plan = run_step(sched)
        if plan.kind is StepKind.PREFILL:
            prefilled += sum(e.num_tokens for e in plan.entries)
    # the prompt is prefilled once; each sibling reuses 39 tokens and computes only the last
    # prompt token itself, inside an ordinary decode step
    assert prefilled == 40
    assert all(s.status is SeqStatus.RUNNING for s in seqs)
    assert all(s.num_cached == 39 for s in seqs[1:])


def test_lru_eviction_under_pressure() -> None:
    sched = Scheduler(
        SchedulerConfig(max_batch_size=2, chunk_size=64, busy_cache_cells=100), capacity=100, num_slots=6
    )
    for i, base in enumerate((0, 100, 200)):
        s = make_seq(f"old{i}", list(range(base, base + 30)))
        sched.add(s)
        run_step(sched)
        sched.remove(s)
    cached = [s.index for s in sched.slots.cached()]
    assert len(cached) == 3
    assert sched.pool.free_cells == 100 - 90
    big = make_seq("big", list(range(1000, 1050)))
    sched.add(big)
    plan = sched.schedule()
    assert plan is not None and big.status is SeqStatus.RUNNING
    # the two oldest cached prefixes were evicted, the newest kept
    evicted = [op.slot for op in plan.kv_ops if isinstance(op, Truncate) and op.length == 0]
    assert evicted[:2] == cached[:2]
    assert sched.slots.slots[cached[2]].state is SlotState.CACHED


def test_preemption_when_decode_has_no_room() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=4, chunk_size=64), capacity=64, num_slots=8)
    a = make_seq("a", list(range(20)))
    b = make_seq("b", list(range(100, 120)))
    for s in (a, b):
        sched.add(s)
    while a.in_prefill or b.in_prefill or len(a.tokens) == 20 or len(b.tokens) == 20:
        run_step(sched)
    # fill the pool with decode steps until something must give
    for _ in range(40):
        run_step(sched)
        if sched.num_preemptions:
            break
    assert sched.num_preemptions >= 1
    assert b.status is SeqStatus.WAITING and b.num_computed == 0  # newest preempted
    assert a.status is SeqStatus.RUNNING
    assert sched.waiting[0] is b
    assert sched.pool.free_cells >= 0


def test_abort_waiting_and_running() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=1, chunk_size=64), capacity=1000, num_slots=4)
    a = make_seq("a", [1, 2, 3])
    b = make_seq("b", [4, 5, 6])
    sched.add(a)
    sched.add(b)
    run_step(sched)
    sched.remove(b)  # waiting
    assert b.status is SeqStatus.FINISHED and not sched.waiting
    sched.remove(a)  # running: its KV becomes a cached prefix
    assert a.status is SeqStatus.FINISHED and not sched.running
    assert sched.slots.slots[a.slot if a.slot >= 0 else 0].state is SlotState.CACHED
    assert not sched.has_work


def test_rollback_truncates_kv() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=1, chunk_size=64), capacity=1000, num_slots=4)
    a = make_seq("a", list(range(10)))
    sched.add(a)
    run_step(sched)
    free = sched.pool.free_cells
    sched.rollback(a, 6)
    assert a.num_computed == 6
    assert sched.pool.free_cells == free + 4
    flushed = sched.flush()
    assert flushed is not None and Truncate(a.slot, 6) in flushed.kv_ops


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_prefill_total_equals_prompt(chunk: int) -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=1, chunk_size=chunk), capacity=1000, num_slots=4)
    a = make_seq("a", list(range(23)))
    sched.add(a)
    computed = 0
    while a.in_prefill or len(a.tokens) == 23:
        plan = run_step(sched)
        computed += plan.num_tokens
    assert computed == 23


def test_idle_cache_is_trimmed_while_running_and_offloaded_to_host() -> None:
    """While something runs, idle cached cells stay within the busy budget; what is pushed out
    goes to the host tier, and a later request sharing it is restored from there."""
    host = HostPrefixCache(budget_bytes=10**9)
    sched = Scheduler(
        SchedulerConfig(max_batch_size=4, chunk_size=512, busy_cache_cells=100),
        capacity=2000,
        num_slots=8,
        host=host,
    )
    convo = make_seq("a", list(range(300)))
    sched.add(convo)
    run_step(sched)
    sched.remove(convo)  # nothing else runs: it stays live
    assert sched.slots.num_cached_tokens == 300 and not host.entries
    other = make_seq("b", list(range(1000, 1050)))
    sched.add(other)
    plan = sched.schedule()  # admitting b: a's 300 idle cells exceed the budget of 100
    assert plan is not None
    offloads = [op for op in plan.kv_ops if isinstance(op, Offload)]
    assert len(offloads) == 1 and offloads[0].entry.tokens == list(range(300))
    assert sched.slots.num_cached_tokens == 0
    host.stored(offloads[0].entry, b"kv")  # what the engine loop does when it replays the op
    sched.commit(plan)
    # the conversation continues: its prefix comes back from host RAM
    follow = make_seq("c", [*range(300), 7, 8, 9])
    sched.add(follow)
    plan = sched.schedule()
    restores = [op for op in plan.kv_ops if isinstance(op, Restore)]
    assert len(restores) == 1 and restores[0].slot == follow.slot
    assert follow.num_computed == 300 and follow.num_cached == 300
    assert host.restores == 1


def test_default_busy_budget_pushes_every_idle_prefix_out_when_a_host_tier_exists() -> None:
    """Regenerating a reply (same prompt again): with a host tier the last reply's idle cells
    leave the live pool as soon as the new one starts; without one, they stay (budget 1/8)."""
    for host in (HostPrefixCache(budget_bytes=10**9), None):
        sched = Scheduler(
            SchedulerConfig(max_batch_size=4, chunk_size=512), capacity=4096, num_slots=8, host=host
        )
        prompt = list(range(100))
        first = make_seq("a", prompt)
        sched.add(first)
        for t in range(200):  # the prompt, then a 200-token reply (the last one not computed)
            run_step(sched, 5000 + t)
        sched.remove(first)
        assert sched.slots.num_cached_tokens == 299
        again = make_seq("b", list(prompt))
        sched.add(again)
        plan = sched.schedule()
        assert plan is not None and again.num_cached == 99  # the prompt is still shared
        offloads = [op for op in plan.kv_ops if isinstance(op, Offload)]
        if host is not None:
            assert sched.room.busy_cache_cells == 0
            assert len(offloads) == 1 and offloads[0].entry.tokens == prompt + list(range(5000, 5199))
            assert sched.pool.free_cells == 4096 - 99  # only the shared prompt cells stay live
        else:
            assert sched.room.busy_cache_cells == 2048 and not offloads
            assert sched.pool.free_cells == 4096 - 299


def test_host_tier_keeps_within_budget_and_dedupes() -> None:
    host = HostPrefixCache(budget_bytes=100)
    a = host.offer(list(range(100)), ())
    assert a is not None
    host.stored(a, b"x" * 60)
    assert host.offer(list(range(80)), ()) is None  # already covered by a
    b = host.offer(list(range(200, 300)), ())
    assert b is not None
    host.stored(b, b"y" * 60)  # over budget: the least recently used (a) goes
    assert host.entries == [b] and host.bytes_used == 60
    c = host.offer(list(range(200, 320)), ())  # covers b: b is replaced
    assert c is not None and host.entries == [c]
