"""Decode steps under the tiled-attention threshold in the shared KV pool
(`engine/decode_rows.py`): with many streams no step holds DECODE_MAX_ROWS + 1 decode rows or
more, every step stays full, every stream advances at least every other step, a CFG pair is
never split; per-slot streams and contexts without the tiled kernel are not capped."""

from __future__ import annotations

import asyncio

import pytest

from kodkod.core.backend_types import ContextConfig
from kodkod.core.types import FinishEvent, GenerationRequest
from kodkod.engine.client import EngineClient
from kodkod.engine.decode_rows import DECODE_MAX_ROWS, DecodeRowPicker, decode_row_cap
from kodkod.engine.group import cfg_group
from kodkod.engine.loop import EngineConfig
from kodkod.engine.prompt_chunks import MIXED_MAX_ROWS
from kodkod.engine.scheduler import Scheduler, SchedulerConfig, StepKind, StepPlan
from kodkod.engine.sequence import Sequence
from kodkod.models.context import tiled_attention
from tests.engine.test_scheduler import make_seq, run_step
from tests.fakes import FakeBackend


def decode_rows(plan: StepPlan) -> list[Sequence]:
    return [e.seq for e in plan.entries if not e.prefill]


def streams(
    n: int, *, invariant: bool = False, tiled: bool = True, slot_cells: int = 0, spare: int = 0
) -> Scheduler:
    """A scheduler with `n` running streams, each past its 3-token prompt (and room for `spare`
    more requests)."""
    capacity = 0 if slot_cells else 40_000
    sched = Scheduler(
        SchedulerConfig(
            max_batch_size=n + spare, chunk_size=512, batch_invariant=invariant, tiled_attention=tiled
        ),
        capacity=capacity,
        num_slots=n + spare,
        slot_cells=slot_cells,
    )
    for i in range(n):
        sched.add(make_seq(f"s{i}", [1000 + 3 * i, 1001 + 3 * i, 1002 + 3 * i]))
    while any(s.in_prefill for s in sched.running) or sched.waiting:
        run_step(sched)
    return sched


def test_the_cap_sits_one_row_under_the_tiled_kernel_threshold() -> None:
    assert DECODE_MAX_ROWS == MIXED_MAX_ROWS - 1 == 63
    assert decode_row_cap(tiled_attention=True, per_slot=False) == DECODE_MAX_ROWS
    assert decode_row_cap(tiled_attention=True, per_slot=True) == 0
    assert decode_row_cap(tiled_attention=False, per_slot=False) == 0


@pytest.mark.parametrize("invariant", [False, True])
def test_100_streams_never_decode_64_rows_at_once_and_each_advances_every_other_step(invariant: bool) -> None:
    sched = streams(100, invariant=invariant)
    assert len(sched.running) == 100
    last_step = {s: -1 for s in sched.running}
    start = {s: len(s.tokens) for s in sched.running}
    gaps: list[int] = []
    for step in range(40):
        plan = run_step(sched)
        assert plan.kind is StepKind.DECODE
        rows = decode_rows(plan)
        assert len(rows) == DECODE_MAX_ROWS  # full steps: the cap, never more, never a 1-row step
        assert len(set(rows)) == len(rows)
        for s in rows:
            gaps.append(step - last_step[s])
            last_step[s] = step
        # nobody waits two steps in a row
        assert all(step - last < 3 for last in last_step.values())
    assert max(gaps) <= 2
    advanced = sorted(len(s.tokens) - start[s] for s in sched.running)
    assert advanced[0] >= 25 and advanced[-1] - advanced[0] <= 1  # alike: 40 × 63 rows over 100


def test_64_streams_take_turns_leaving_one_out_per_step() -> None:
    sched = streams(64)
    left_out = []
    for _ in range(64):
        rows = decode_rows(run_step(sched))
        assert len(rows) == DECODE_MAX_ROWS
        (out,) = set(sched.running) - set(rows)
        left_out.append(out)
    assert len(set(left_out)) == 64  # each stream skipped exactly one of 64 steps
    assert {len(s.tokens) for s in sched.running} == {3 + 1 + 63}


def test_63_streams_all_decode_every_step() -> None:
    sched = streams(DECODE_MAX_ROWS)
    for _ in range(5):
        assert len(decode_rows(run_step(sched))) == DECODE_MAX_ROWS


@pytest.mark.parametrize(("tiled", "slot_cells"), [(False, 0), (True, 64)])
def test_no_cap_without_the_tiled_kernel_or_with_per_slot_streams(tiled: bool, slot_cells: int) -> None:
    sched = streams(100, tiled=tiled, slot_cells=slot_cells)
    for _ in range(3):
        assert len(decode_rows(run_step(sched))) == 100


def test_a_new_prompt_beside_capped_decodes_gets_its_own_prefill_step() -> None:
    sched = streams(70, spare=1)
    late = make_seq("late", list(range(5000, 5010)))
    sched.add(late)
    kinds = [run_step(sched).kind for _ in range(4)]
    # decode rows at the cap leave no room under the threshold: DECODE and PREFILL take turns
    assert StepKind.MIXED not in kinds and StepKind.PREFILL in kinds
    assert not late.in_prefill
    for _ in range(4):
        assert len(decode_rows(run_step(sched))) == DECODE_MAX_ROWS


def test_cfg_pairs_are_never_split() -> None:
    seqs: list[Sequence] = []
    for i in range(40):  # 40 pairs = 80 rows
        main, shadow = make_seq(f"m{i}", [i]), make_seq(f"n{i}", [i])
        cfg_group(main, shadow)
        seqs += [main, shadow]
    picker = DecodeRowPicker(DECODE_MAX_ROWS)
    seen = {s: 0 for s in seqs}
    for _ in range(6):
        rows = picker.pick(seqs)
        assert len(rows) <= DECODE_MAX_ROWS
        assert len(rows) == 62  # 31 whole pairs: the 32nd would make 64
        assert rows == [s for s in seqs if s in rows]  # in the given order
        for s in rows:
            assert s.group is not None and all(m in rows for m in s.group.members)
            seen[s] += 1
    assert min(seen.values()) >= 4  # 6 × 31 pairs over 40: each pair decoded 4 or 5 times


def test_a_picker_under_the_cap_passes_every_sequence_and_forgets_the_rotation() -> None:
    seqs = [make_seq(f"s{i}", [i]) for i in range(70)]
    picker = DecodeRowPicker(DECODE_MAX_ROWS)
    first = picker.pick(seqs)
    assert len(first) == DECODE_MAX_ROWS
    assert picker.pick(seqs[:10]) == seqs[:10]
    assert picker.pick(seqs) == first  # afresh: the same first choice, nothing held from before
    assert DecodeRowPicker(0).pick(seqs) == seqs


@pytest.mark.parametrize(
    ("k", "v", "flash", "tiled"),
    [
        ("f16", "f16", True, True),
        ("f32", "f32", True, True),
        ("f16", "f16", False, False),
        ("q8_0", "q8_0", True, False),
        ("bf16", "bf16", True, False),
        ("f16", "q8_0", True, False),
    ],
)
def test_context_runs_the_tiled_kernel_only_with_flash_attention_over_an_unquantised_cache(
    k: str, v: str, flash: bool, tiled: bool
) -> None:
    config = ContextConfig(1024, 4, 512, 2, cache_type_k=k, cache_type_v=v, flash_attention=flash)
    assert tiled_attention(config) is tiled


def test_70_streams_through_the_engine_stay_under_the_threshold_and_are_exact() -> None:
    backend = FakeBackend(kv_capacity=4096, num_slots=80)
    config = EngineConfig(max_seq_len=64, max_batch_size=70, chunk_size=512)

    async def main() -> None:
        client = EngineClient.start(backend, config)
        try:
            reqs = [GenerationRequest(f"r{i}", [i % 60 + 1, 2, 3], max_tokens=10) for i in range(70)]
            results = await asyncio.gather(*(client.submit(r).collect() for r in reqs))
        finally:
            await client.shutdown("test over")
        for req, (tokens, final) in zip(reqs, results, strict=True):
            assert isinstance(final, FinishEvent), final
            assert tokens.token_ids == [(req.prompt_ids[-1] + 1 + k) % 64 for k in range(10)]

    asyncio.run(main())
    decode_steps = [b for b in backend.batches if all(len(r.tokens) == 1 for r in b)]
    assert decode_steps and max(len(b) for b in decode_steps) == DECODE_MAX_ROWS
    assert all(len(b) < MIXED_MAX_ROWS for b in backend.batches if any(len(r.tokens) == 1 for r in b))
