"""Speculative decoding in the engine loop, on fake backends (no model).

The target and the draft are both `FakeBackend`s, which check llama.cpp's KV rules on every
decode (a row must start exactly where the slot's cache ends), so a draft KV that drifted from
what the engine believes, or a rejected position left in the target, fails loudly. The target
sleeps a little per decode and the draft does not, so drafting pays and the policy drafts.
Every test compares with the same requests run without speculation: output, text and finish
must be identical.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from kodkod.core.types import EosReason, FinishEvent, FinishReason, GenerationRequest
from kodkod.engine.client import EngineClient
from kodkod.engine.decode_rows import DECODE_MAX_ROWS
from kodkod.engine.loop import EngineConfig
from kodkod.engine.plan import DraftPlan
from kodkod.engine.scheduler import Scheduler, SchedulerConfig, StepKind
from kodkod.engine.speculative.state import SpecConfig, SpecMode
from kodkod.engine.stats import EngineStats
from tests.fakes import FakeBackend

TARGET_SCRIPT = {9: 30, 40: 3, 50: 10}  # …8, 9, 30, 31, …, 40, 3, 4, …
DRAFT_SCRIPT = {9: 30, 40: 3, 33: 20, 5: 7}  # agrees mostly; wrong after 33 and after 5


@dataclass
class Outcome:
    ids: list[int]
    text: str
    final: Any


def run(
    reqs: list[GenerationRequest],
    spec: SpecConfig | None,
    *,
    draft_script: dict[int, int] | None = None,
    pieces: dict[int, bytes] | None = None,
    max_batch: int = 4,
    delay_s: float = 0.002,
    draft_fails: bool = False,
    warm_up: bool = True,
    invariant: bool = False,
) -> tuple[list[Outcome], EngineStats, FakeBackend, FakeBackend | None]:
    """Run `reqs` concurrently; with speculation, one request runs alone first (the policy
    measures costs only when a sequence is alone, then drafts in batches when it pays).
    `invariant`: batch_invariant steps (see the comment at MODEL)."""
    target = FakeBackend(script=dict(TARGET_SCRIPT), pieces=pieces or {}, delay_s=delay_s)
    draft = (
        FakeBackend(script=dict(draft_script), pieces=pieces or {}, fail_decode=draft_fails)
        if draft_script is not None
        else None
    )

    async def main() -> tuple[list[Outcome], EngineStats]:
        config = EngineConfig(200, max_batch, 8, spec or SpecConfig(), batch_invariant=invariant)
        client = EngineClient.start(target, config, None, draft)
        try:
            generated = 0
            if spec is not None and warm_up:
                tokens, _ = await client.submit(GenerationRequest("warm-up", [1, 2], max_tokens=12)).collect()
                generated += len(tokens.token_ids)
            results = await asyncio.gather(*(client.submit(r).collect() for r in reqs))
            generated += sum(len(t.token_ids) for t, _ in results)
            # the stats snapshot the engine publishes once the last request is done
            deadline = asyncio.get_running_loop().time() + 10
            while not ((s := client.stats).running == s.waiting == 0 and s.generated_tokens >= generated):
                assert asyncio.get_running_loop().time() < deadline, f"stats never caught up: {s}"
                await asyncio.sleep(0.005)
            return [Outcome(t.token_ids, t.text, f) for t, f in results], s
        finally:
            await client.shutdown("test over")

    outs, stats = asyncio.run(main())
    assert target.live_samplers == 0
    return outs, stats, target, draft


def requests(**kw: Any) -> list[GenerationRequest]:
    prompts = [[1, 2, 3], [20, 21], [5, 6, 7, 8], [30, 31, 32], [44, 45]]
    return [GenerationRequest(f"r{i}", list(p), **{"max_tokens": 40, **kw}) for i, p in enumerate(prompts)]


def drafted(outs: list[Outcome]) -> int:
    return sum(o.final.usage.drafted_tokens for o in outs)


def accepted(outs: list[Outcome]) -> int:
    return sum(o.final.usage.accepted_draft_tokens for o in outs)


MODEL = SpecConfig(SpecMode.MODEL)
# Tests that assert the policy drafts for two requests started together run with batch-invariant
# steps: there the first of them decodes one plain step alone while the other is prefilled, a
# cost the policy measures before it decides for both. With mixed steps both prompts share one
# step and the policy decides on the warm-up's measurements alone, which on a busy machine
# sometimes say drafting does not pay (the fake's decode time is a sleep plus overhead).
NGRAM = SpecConfig(SpecMode.NGRAM)


def same(a: list[Outcome], b: list[Outcome]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.ids == y.ids
        assert x.text == y.text
        assert isinstance(x.final, FinishEvent) and isinstance(y.final, FinishEvent)
        assert (x.final.reason, x.final.eos_reason, x.final.stop_str) == (
            y.final.reason,
            y.final.eos_reason,
            y.final.stop_str,
        )
        assert x.final.usage.completion_tokens == y.final.usage.completion_tokens


def test_draft_model_and_ngram_outputs_equal_plain_decoding() -> None:
    plain, s0, _, _ = run(requests(max_tokens=90), None)
    model, s1, _, _ = run(requests(max_tokens=90), MODEL, draft_script=DRAFT_SCRIPT)
    ngram, _s2, _, _ = run(requests(max_tokens=90), NGRAM)
    same(plain, model)
    same(plain, ngram)
    assert s0.drafted_tokens == 0
    assert 0 < accepted(model) < drafted(model)  # drafted in the batch, some rejected
    assert s1.draft_model == "fake" and s1.draft_steps > 0
    # the target's cycle 3…40 repeats: n-gram lookups find it
    assert accepted(ngram) > 0
    # fewer target decodes than tokens: that is the point
    assert s1.decode_steps < s0.decode_steps


def test_usage_reports_drafted_and_accepted_tokens() -> None:
    outs, stats, _, _ = run(requests()[:1], MODEL, draft_script=DRAFT_SCRIPT, warm_up=False)
    usage = outs[0].final.usage
    assert usage.drafted_tokens == stats.drafted_tokens > 0
    assert usage.accepted_draft_tokens == stats.accepted_draft_tokens


def test_stop_string_inside_an_accepted_run_stops_at_the_same_place() -> None:
    reqs = lambda: [  # noqa: E731
        GenerationRequest("s", [10, 11], max_tokens=30, stop_strings=["<16>"]),
        GenerationRequest(
            "t", [10, 11], max_tokens=30, stop_strings=["<16>"], include_stop_str_in_output=True
        ),
    ]
    plain, _, _, _ = run(reqs(), None)
    model, _stats, _, _ = run(reqs(), MODEL, draft_script={}, invariant=True)
    assert plain[0].text == "<12><13><14><15>" and plain[1].text.endswith("<15><16>")
    same(plain, model)
    assert model[0].final.eos_reason is EosReason.STOP_STRING
    assert accepted(model) >= 4  # <16> was inside one accepted run


def test_max_tokens_and_eos_inside_drafts() -> None:
    reqs = lambda: [  # noqa: E731
        GenerationRequest("m", [1], max_tokens=7),
        GenerationRequest("e", [60], max_tokens=30),
    ]  # 60..63 → 0 (EOS)
    plain, _, _, _ = run(reqs(), None)
    model, _, _, _ = run(reqs(), MODEL, draft_script={})
    same(plain, model)
    assert len(model[0].ids) == 7 and model[0].final.reason is FinishReason.LENGTH
    assert model[1].final.eos_reason is EosReason.STOP_TOKEN and model[1].ids == [61, 62, 63]


def test_banned_string_rewinds_in_the_middle_of_a_run() -> None:
    reqs = lambda: [GenerationRequest("b", [10], max_tokens=12, banned_strings=["<14>"])]  # noqa: E731
    plain, _, _, _ = run(reqs(), None)
    model, _stats, _, _ = run(reqs(), MODEL, draft_script={})
    ngram, _, _, _ = run(reqs(), NGRAM)
    assert "<14>" not in plain[0].text
    same(plain, model)
    same(plain, ngram)
    assert drafted(model) > 0


class MaskOdd:
    """A constraint-like processor: odd tokens are forbidden (the target's choice moves)."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def process(self, row: np.ndarray, output_ids: list[int]) -> None:
        row[1::2] = -np.inf

    def accept(self, token_id: int) -> None:
        self.seen.append(token_id)


def test_logits_processors_see_exactly_the_emitted_tokens() -> None:
    procs = [MaskOdd(), MaskOdd()]
    reqs = [GenerationRequest("p", [2], max_tokens=15, processors=[procs[0]])]
    plain, _, _, _ = run(reqs, None)
    reqs = [GenerationRequest("p", [2], max_tokens=15, processors=[procs[1]])]
    model, _stats, _, _ = run(reqs, MODEL, draft_script={})
    same(plain, model)
    assert all(t % 2 == 0 for t in model[0].ids)
    assert procs[1].seen == model[0].ids == procs[0].seen
    assert drafted(model) > accepted(model)  # drafts ignored the mask


def test_per_request_ngram_flag() -> None:
    reqs = lambda flag: [GenerationRequest("n", [3], max_tokens=60, speculative_ngram=flag)]  # noqa: E731
    _, off, _, _ = run(reqs(None), None)
    on, on_stats, _, _ = run(reqs(True), None)
    plain, _, _, _ = run(reqs(None), None)
    same(plain, on)
    assert off.drafted_tokens == 0 and on_stats.accepted_draft_tokens > 0
    _, vetoed, _, _ = run(reqs(False), NGRAM)
    assert vetoed.drafted_tokens == 0


def test_cfg_pairs_do_not_draft_but_still_decode() -> None:
    reqs = lambda: [  # noqa: E731
        GenerationRequest("c", [5, 6], max_tokens=10, cfg_scale=1.5),
        GenerationRequest("d", [5, 6], max_tokens=10),
    ]
    plain, _, _, _ = run(reqs(), None)
    model, _stats, _, _ = run(reqs(), MODEL, draft_script={}, invariant=True)
    same(plain, model)
    assert drafted(model) > 0


def test_prefix_reuse_and_many_requests_keep_the_draft_cache_in_step() -> None:
    """Cached prefixes, copies and evictions are mirrored on the draft: its FakeBackend would
    refuse a row that does not continue exactly where its cache ends."""
    shared = list(range(1, 20))
    reqs = [GenerationRequest(f"x{i}", [*shared, 40 + i], max_tokens=12) for i in range(10)]
    plain, _, _, _ = run(reqs, None, max_batch=2)
    reqs = [GenerationRequest(f"x{i}", [*shared, 40 + i], max_tokens=12) for i in range(10)]
    model, _stats, _target, draft = run(reqs, MODEL, draft_script=DRAFT_SCRIPT, max_batch=2)
    same(plain, model)
    assert drafted(model) > 0 and draft is not None
    assert any(len(b) > 1 for b in draft.batches)  # drafting was batched over sequences


def test_commit_then_rollback_keeps_num_computed_one_behind() -> None:
    from kodkod.engine.detokenizer import IncrementalDetokenizer
    from kodkod.engine.sequence import Sequence
    from kodkod.engine.stopping import StopStringMatcher

    sched = Scheduler(SchedulerConfig(4, 16), 64, 4)
    seq = Sequence(
        request=GenerationRequest("r", [1, 2, 3]),
        sink=None,
        tokens=[1, 2, 3],
        num_prompt=3,  # type: ignore[arg-type]
        detok=IncrementalDetokenizer(lambda t: b""),
        stops=StopStringMatcher([]),
        stop_ids=frozenset(),
        eos_ids=frozenset(),
        max_len=50,
    )
    sched.add(seq)
    plan = sched.schedule()
    assert plan is not None and plan.kind is StepKind.PREFILL
    sched.commit(plan)
    seq.tokens.append(4)  # sampled
    plan = sched.schedule()
    assert plan is not None and plan.kind is StepKind.DECODE
    e = plan.entries[0]
    drafts = DraftPlan([e], [3], 1 + 3)
    assert sched.accept_drafts(plan, drafts) and plan.draft is drafts
    drafts.drafts = [(5, 6, 9)]  # what the draft runner proposes
    plan.take_drafts(drafts)
    assert (e.drafts, e.num_tokens, e.num_logits) == ((5, 6, 9), 4, 4)
    sched.commit(plan)
    assert seq.num_computed == 7 and sched.pool.length(seq.slot) == 7
    length = len(seq.tokens)
    seq.tokens += [5, 6, 7]  # drafts 5, 6 accepted; 7 is the correction of 9
    sched.rollback(seq, length + 2)
    assert seq.num_computed == len(seq.tokens) - 1 == sched.pool.length(seq.slot)
    flushed = sched.flush()  # the rollback's op rides in the next plan
    assert flushed is not None and [type(op).__name__ for op in flushed.kv_ops] == ["Truncate"]


def test_static_speculation_drafts_the_configured_length_every_step() -> None:
    reqs = lambda: [GenerationRequest("s", [1], max_tokens=25)]  # noqa: E731
    plain, _, _, _ = run(reqs(), None, delay_s=0.0)
    static = SpecConfig(SpecMode.MODEL, num_tokens=3, dynamic=False)
    outs, stats, _, _ = run(reqs(), static, draft_script=TARGET_SCRIPT, delay_s=0.0, warm_up=False)
    same(plain, outs)
    # no delay: drafting cannot pay here, but static speculation drafts anyway; 24 tokens
    # after the first = 6 steps of 3 accepted drafts + the bonus token
    assert (stats.draft_steps, stats.drafted_tokens, stats.accepted_draft_tokens) == (6, 18, 18)


def test_a_failing_draft_model_only_costs_its_drafts() -> None:
    plain, _, _, _ = run(requests(), None)
    outs, stats, _target, _ = run(requests(), MODEL, draft_script={}, draft_fails=True)
    same(plain, outs)
    assert stats.drafted_tokens == 0


@pytest.mark.parametrize("tiled", [True, False])
def test_verify_steps_stay_under_the_tiled_attention_threshold_in_the_shared_pool(tiled: bool) -> None:
    """8 streams drafting 15 tokens each would verify 128 rows in one step; in the shared pool
    with the tiled attention kernel possible the drafts are shortened to 63 rows in all
    (engine/decode_rows.py), evenly, and the outputs stay those of plain decoding."""
    reqs = [GenerationRequest(f"r{i}", [i * 3 + 1, 2, 3], max_tokens=40) for i in range(8)]
    script = {t: t + 1 for t in range(1, 63)}  # never the end-of-generation token 0

    def run_all(spec: SpecConfig, draft: FakeBackend | None) -> tuple[list[list[int]], FakeBackend]:
        target = FakeBackend(kv_capacity=2048, num_slots=8, script=dict(script))
        config = EngineConfig(200, 8, 64, spec, tiled_attention=tiled)

        async def main() -> list[list[int]]:
            client = EngineClient.start(target, config, None, draft)
            try:
                results = await asyncio.gather(*(client.submit(r).collect() for r in reqs))
            finally:
                await client.shutdown("test over")
            assert all(isinstance(f, FinishEvent) for _, f in results)
            return [t.token_ids for t, _ in results]

        return asyncio.run(main()), target

    plain, _ = run_all(SpecConfig(), None)
    draft = FakeBackend(kv_capacity=2048, num_slots=8, script=dict(script))
    drafted, target = run_all(SpecConfig(SpecMode.MODEL, num_tokens=15, dynamic=False), draft)
    assert drafted == plain and all(len(o) == 40 for o in plain)
    rows = [sum(len(r.tokens) for r in b) for b in target.batches]
    verify = [  # past the prompts (positions ≥ 3), every row with drafts
        b for b in target.batches if len(b) == 8 and all(r.start_pos >= 3 and len(r.tokens) > 1 for r in b)
    ]
    assert verify, "no step verified drafts of all 8 streams"
    if tiled:
        assert max(rows) == DECODE_MAX_ROWS  # drafts shortened to the cap, not below it
        # shared evenly while every stream wants its 15: 63 rows over 8 sequences, 7 or 8 each
        assert sorted(len(r.tokens) for r in verify[0]) == [7] + [8] * 7
    else:
        assert max(rows) == 8 * 16
