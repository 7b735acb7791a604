"""Mixed steps (batch invariance off, the default): several prompts' chunks in one step beside
the decode rows, within `chunk_size` tokens, while the step stays under MIXED_MAX_ROWS rows
(running streams then get a token every step however many requests arrive); bigger prompt
work gets PREFILL steps of its own, taking turns with DECODE steps; first tokens come in
arrival order. With `batch_invariant` on, steps are what they always were: one prompt alone,
or decode rows only, taking turns."""

from __future__ import annotations

import asyncio

import pytest

from kodkod.core.types import FinishEvent, GenerationRequest
from kodkod.engine.client import EngineClient
from kodkod.engine.loop import EngineConfig
from kodkod.engine.prompt_chunks import MIXED_MAX_ROWS
from kodkod.engine.scheduler import Scheduler, SchedulerConfig, StepKind, StepPlan
from kodkod.engine.sequence import Sequence
from tests.engine.test_scheduler import make_seq, run_step
from tests.fakes import FakeBackend


def shape(plan: StepPlan) -> list[tuple[str, int, int, bool]]:
    """(request, tokens, logits, prompt chunk) of each row."""
    return [(e.seq.request_id, e.num_tokens, e.num_logits, e.prefill) for e in plan.entries]


def prompt(rid: int, length: int) -> list[int]:
    return [1000 * (rid + 1) + j for j in range(length)]


def test_several_prompts_are_prefilled_in_one_step_within_the_budget() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=8, chunk_size=32), capacity=1000, num_slots=16)
    for i in range(4):
        sched.add(make_seq(f"p{i}", prompt(i, 10)))
    plan = run_step(sched)
    assert plan.kind is StepKind.PREFILL
    # the oldest first, each as much as it needs; the last one gets what is left of 32
    assert shape(plan) == [("p0", 10, 1, True), ("p1", 10, 1, True), ("p2", 10, 1, True), ("p3", 2, 0, True)]
    plan = run_step(sched)
    assert plan.kind is StepKind.MIXED  # the three streams decode beside the rest of p3's prompt
    assert shape(plan) == [("p0", 1, 1, False), ("p1", 1, 1, False), ("p2", 1, 1, False), ("p3", 8, 1, True)]
    plan = run_step(sched)
    assert plan.kind is StepKind.DECODE and [e.num_tokens for e in plan.entries] == [1, 1, 1, 1]


def test_batch_invariant_steps_hold_one_prompt_alone_or_decode_rows_only() -> None:
    sched = Scheduler(
        SchedulerConfig(max_batch_size=8, chunk_size=32, batch_invariant=True), capacity=1000, num_slots=16
    )
    for i in range(4):
        sched.add(make_seq(f"p{i}", prompt(i, 10)))
    kinds = []
    for _ in range(8):
        plan = run_step(sched)
        kinds.append(plan.kind)
        if plan.kind is StepKind.PREFILL:
            assert len(plan.entries) == 1 and plan.entries[0].prefill
        else:
            assert all(e.num_tokens == 1 and not e.prefill for e in plan.entries)
    assert kinds == [StepKind.PREFILL, StepKind.DECODE] * 4
    assert StepKind.MIXED not in kinds


def test_steps_stay_within_chunk_size_and_every_request_completes() -> None:
    chunk = 24
    sched = Scheduler(SchedulerConfig(max_batch_size=6, chunk_size=chunk), capacity=2000, num_slots=16)
    lengths = [37, 3, 12, 50, 1, 8, 24, 25, 9, 16, 2, 44]
    seqs = [make_seq(f"r{i}", prompt(i, n), max_len=n + 5) for i, n in enumerate(lengths)]
    pending = list(seqs)
    for step in range(200):
        if pending and step % 2 == 0:  # arrivals while others run
            sched.add(pending.pop(0))
        if not sched.has_work and not pending:
            break
        plan = run_step(sched)
        assert plan.num_tokens <= chunk
        assert len({id(e.seq) for e in plan.entries}) == len(plan.entries)  # one row per sequence
        for s in list(sched.running):
            if len(s.tokens) >= s.max_len:
                sched.remove(s)
    assert all(len(s.tokens) == s.max_len for s in seqs)
    assert all(s.num_computed == s.max_len - 1 for s in seqs)


@pytest.mark.parametrize("invariant", [False, True])
def test_a_running_stream_is_not_starved_by_a_stream_of_arrivals(invariant: bool) -> None:
    sched = Scheduler(
        SchedulerConfig(max_batch_size=64, chunk_size=16, batch_invariant=invariant),
        capacity=100_000,
        num_slots=128,
    )
    runner = make_seq("runner", prompt(99, 4))
    sched.add(runner)
    run_step(sched)
    produced = []
    for i in range(40):  # a new 40-token prompt every step: far more prompt work than budget
        sched.add(make_seq(f"new{i}", prompt(i, 40)))
        before = len(runner.tokens)
        run_step(sched)
        produced.append(len(runner.tokens) - before)
    if invariant:  # prompts alone: the stream decodes every other step
        assert produced == [1, 0] * 20
    else:  # mixed: a token every step, the arrivals share what is left of the budget
        assert produced == [1] * 40


def test_decode_rows_that_fill_the_budget_take_turns_with_prompt_steps() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=64, chunk_size=16), capacity=100_000, num_slots=128)
    streams = [make_seq(f"s{i}", prompt(i, 2)) for i in range(20)]
    for s in streams:
        sched.add(s)
    while any(s.in_prefill or s.num_computed < 2 for s in streams):
        run_step(sched)
    late = make_seq("late", prompt(50, 20))
    sched.add(late)
    kinds = [run_step(sched).kind for _ in range(4)]
    # 20 decode rows leave nothing of 16 tokens: decode-only and prompt-only steps alternate
    assert kinds == [StepKind.DECODE, StepKind.PREFILL] * 2
    assert late.num_computed == 20 and len(late.tokens) == 21  # prefilled, first token sampled


def _chatting(num_streams: int) -> tuple[Scheduler, list[Sequence]]:
    """A chat server's default budget with `num_streams` streams decoding."""
    sched = Scheduler(SchedulerConfig(max_batch_size=16, chunk_size=2048), capacity=100_000, num_slots=32)
    streams = [make_seq(f"s{i}", prompt(i, 30), max_len=1000) for i in range(num_streams)]
    for s in streams:
        sched.add(s)
    while any(s.in_prefill for s in streams):
        run_step(sched)
    return sched, streams


def test_a_long_prompt_gets_a_prefill_step_of_its_own_beside_decoding_streams() -> None:
    # 9 streams and one chat turn of 120 new tokens: one step of 129 rows would run llama.cpp's
    # tiled attention over every live cell for the 9 decode rows (docs/measurements.md)
    sched, streams = _chatting(9)
    turns = [make_seq("t0", prompt(20, 120)), make_seq("t1", prompt(21, 90))]
    for t in turns:
        sched.add(t)
    plans = [run_step(sched) for _ in range(3)]
    assert [p.kind for p in plans] == [StepKind.DECODE, StepKind.PREFILL, StepKind.DECODE]
    assert [e.seq.request_id for e in plans[0].entries] == [s.request_id for s in streams]
    # both turns prefilled together in the prompt step, each whole: first tokens sampled
    assert shape(plans[1]) == [("t0", 120, 1, True), ("t1", 90, 1, True)]
    assert len(plans[2].entries) == 11  # then everyone decodes together
    assert all(len(t.tokens) == n + 2 for t, n in zip(turns, (120, 90), strict=True))
    assert max(p.num_tokens for p in plans if p.kind is not StepKind.PREFILL) < MIXED_MAX_ROWS


def test_short_prompts_still_ride_in_the_decode_step() -> None:
    sched, _ = _chatting(9)
    for i in range(3):  # 9 rows + 3 x 12 prompt tokens = 45 rows: a small step
        sched.add(make_seq(f"q{i}", prompt(30 + i, 12)))
    plan = run_step(sched)
    assert plan.kind is StepKind.MIXED
    assert [e.num_tokens for e in plan.entries] == [1] * 9 + [12, 12, 12]
    assert plan.num_tokens < MIXED_MAX_ROWS


def test_first_tokens_come_in_arrival_order() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=32, chunk_size=16), capacity=100_000, num_slots=64)
    # (a one-token prompt is a decode row from the start, like a sibling that reused all
    # but the last token of its prompt: it is not prefilled, so it is not in this order)
    lengths = [30, 5, 17, 3, 40, 8, 2, 22, 9, 12]
    seqs = [make_seq(f"r{i}", prompt(i, n)) for i, n in enumerate(lengths)]
    first: dict[str, int] = {}
    for step in range(60):
        if step < len(seqs):
            sched.add(seqs[step])  # one arrival per step, while earlier prompts prefill
        plan = run_step(sched)
        for e in plan.entries:
            if e.num_logits and e.seq.request_id not in first:
                first[e.seq.request_id] = step
    order = [first[s.request_id] for s in seqs]
    assert order == sorted(order), order  # a short late prompt never overtakes an earlier one


def test_adapter_sets_take_turns_in_mixed_steps() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=8, chunk_size=64), capacity=1000, num_slots=16)
    seqs: list[Sequence] = []
    for i, key in enumerate([(), (("lora", 1.0),), (), (("lora", 1.0),)]):
        s = make_seq(f"k{i}", prompt(i, 6))
        s.adapter_key = key
        seqs.append(s)
        sched.add(s)
    keys = []
    for _ in range(6):
        plan = run_step(sched)
        step_keys = {e.seq.adapter_key for e in plan.entries}
        assert len(step_keys) == 1  # llama.cpp applies one LoRA set to a whole batch
        keys.append(step_keys.pop())
    assert keys[0] != keys[1] and keys[:2] * 3 == keys  # the sets alternate
    assert all(len(s.tokens) == 6 + 3 for s in seqs)  # both sets advanced alike


@pytest.mark.parametrize("invariant", [False, True])
def test_burst_through_the_engine_is_prefilled_together_and_correct_under_pressure(invariant: bool) -> None:
    """12 requests at once on a pool too small for all of them (preemption): each gets the
    fake model's exact continuation; mixed steps put several prompts in one batch."""
    backend = FakeBackend(kv_capacity=160, num_slots=16)
    config = EngineConfig(max_seq_len=64, max_batch_size=12, chunk_size=32, batch_invariant=invariant)

    async def main() -> None:
        client = EngineClient.start(backend, config)
        try:
            reqs = [
                GenerationRequest(f"b{i}", [(3 * i + j) % 60 + 1 for j in range(9)], max_tokens=12)
                for i in range(12)
            ]
            results = await asyncio.gather(*(client.submit(r).collect() for r in reqs))
            deadline = asyncio.get_running_loop().time() + 10
            while client.stats.running or client.stats.waiting:  # the last snapshot
                assert asyncio.get_running_loop().time() < deadline, client.stats
                await asyncio.sleep(0.005)
            assert client.stats.preemptions > 0  # the pool was too small: some recomputed
        finally:
            await client.shutdown("test over")
        for req, (tokens, final) in zip(reqs, results, strict=True):
            assert isinstance(final, FinishEvent), final
            last = req.prompt_ids[-1]
            assert tokens.token_ids == [(last + 1 + k) % 64 for k in range(12)]

    asyncio.run(main())
    prompt_rows = [sum(1 for r in b if len(r.tokens) > 1) for b in backend.batches]
    if invariant:
        assert max(prompt_rows) == 1
        assert all(len(b) == 1 for b in backend.batches if any(len(r.tokens) > 1 for r in b))
    else:
        assert max(prompt_rows) > 1
    assert max(sum(len(r.tokens) for r in b) for b in backend.batches) <= 32
