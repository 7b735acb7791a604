"""Self-tuning speculation through the real engine step, with set costs (no model, no sleeps).

Target and draft are `FakeBackend`s sharing one `FakeClock`, which the engine times its steps
with; each decode advances it by the backend's set cost (per call + per token). So the policy
sees exactly the costs a test sets, and "tokens per second" is tokens per fake second:
deterministic, whatever else the machine runs. The draft's script equals the target's (every
draft is right), so whether drafting happens is decided by the costs alone — and every run is
compared with the same requests decoded without speculation on the same costs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kodkod.core.backend_types import BatchRow
from kodkod.core.types import GenerationRequest
from kodkod.engine.client import EngineClient
from kodkod.engine.loop import EngineConfig
from kodkod.engine.speculative.speculator import EXPLORE_EVERY
from kodkod.engine.speculative.state import SpecConfig, SpecMode
from tests.fakes import FakeBackend, FakeClock

MODEL = SpecConfig(SpecMode.MODEL)
NGRAM = SpecConfig(SpecMode.NGRAM)
MS = 0.001
SCRIPT = {62: 1}  # the text cycles through 1..62 and never reaches the EOS token (0)


@dataclass
class Phase:
    """What one batch of concurrent requests did."""

    seconds: float  # fake seconds the engine spent
    tokens: int
    batches: list[list[BatchRow]]  # the target's decode calls
    ids: list[list[int]]

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    def decode_steps(self, num_seqs: int) -> list[list[BatchRow]]:
        """Decode steps with `num_seqs` sequences (prefill rows start at position 0)."""
        return [b for b in self.batches if len(b) == num_seqs and all(r.start_pos > 0 for r in b)]

    def drafting_steps(self, num_seqs: int) -> int:
        return sum(1 for b in self.decode_steps(num_seqs) if any(len(r.tokens) > 1 for r in b))


def stream(i: int, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(f"r{i}-{max_tokens}", [1 + 5 * i, 2 + 5 * i], max_tokens=max_tokens)


@dataclass
class Costs:
    call_s: float
    token_s: float


def engine_run(
    spec: SpecConfig | None,
    target_cost: Costs,
    draft_cost: Costs | None,
    script: Callable[
        [EngineClient, Callable[[list[GenerationRequest]], Awaitable[Phase]], FakeBackend | None],
        Awaitable[None],
    ],
    max_batch: int = 8,
) -> None:
    """Start an engine on fake backends with these costs and run `script(client, phase, draft)`,
    where `await phase(requests)` runs the requests concurrently and reports the phase."""
    clock = FakeClock()
    target = FakeBackend(
        kv_capacity=4096,
        script=dict(SCRIPT),
        clock=clock,
        call_cost_s=target_cost.call_s,
        token_cost_s=target_cost.token_s,
    )
    draft = (
        FakeBackend(
            kv_capacity=4096,
            script=dict(SCRIPT),
            clock=clock,
            call_cost_s=draft_cost.call_s,
            token_cost_s=draft_cost.token_s,
        )
        if draft_cost is not None
        else None
    )

    async def main() -> None:
        config = EngineConfig(1024, max_batch, 64, spec or SpecConfig(), clock=clock)
        client = EngineClient.start(target, config, None, draft)

        async def phase(reqs: list[GenerationRequest]) -> Phase:
            n0, t0 = len(target.batches), clock.now_s
            results = await asyncio.gather(*(client.submit(r).collect() for r in reqs))
            for _, final in results:
                assert final.__class__.__name__ == "FinishEvent", final
            ids = [t.token_ids for t, _ in results]
            return Phase(clock.now_s - t0, sum(len(x) for x in ids), target.batches[n0:], ids)

        try:
            await script(client, phase, draft)
        finally:
            await client.shutdown("test over")

    asyncio.run(main())
    assert target.live_samplers == 0


def measure(
    spec: SpecConfig | None, target: Costs, draft: Costs | None, reqs: list[GenerationRequest]
) -> Phase:
    out: list[Phase] = []

    async def script(client: EngineClient, phase: Callable[..., Awaitable[Phase]], _d: object) -> None:
        out.append(await phase(reqs))

    engine_run(spec, target, draft, script)
    return out[0]


TARGET = Costs(10 * MS, 1 * MS)  # a plain single-stream step: 11 ms


def test_a_draft_as_slow_as_the_target_is_not_used() -> None:
    """Each drafted token costs a draft call as long as a plain step: drafting cannot pay."""
    reqs = [stream(0, 400)]
    plain = measure(None, TARGET, None, reqs)
    spec = measure(MODEL, TARGET, TARGET, reqs)
    assert spec.ids == plain.ids
    steps = spec.decode_steps(1)
    # the first trials measure drafting; afterwards one step in EXPLORE_EVERY re-checks it
    assert spec.drafting_steps(1) <= 3 + len(steps) // EXPLORE_EVERY
    assert spec.rate >= 0.97 * plain.rate


def test_a_fast_draft_is_used_and_pays() -> None:
    reqs = [stream(0, 400)]
    plain = measure(None, TARGET, None, reqs)
    spec = measure(MODEL, TARGET, Costs(1 * MS, 0.1 * MS), reqs)
    assert spec.ids == plain.ids
    assert spec.drafting_steps(1) >= 0.8 * len(spec.decode_steps(1))
    assert spec.rate >= 2.0 * plain.rate


def test_ngram_drafts_when_verified_rows_are_cheap_and_not_when_they_cost_a_step() -> None:
    # the fake's text cycles, so n-gram lookups always find a proposal
    reqs = [GenerationRequest("n", [3, 4], max_tokens=500)]
    cheap_rows = Costs(10 * MS, 0.1 * MS)
    plain = measure(None, cheap_rows, None, reqs)
    spec = measure(NGRAM, cheap_rows, None, reqs)
    assert spec.ids == plain.ids
    assert spec.rate >= 2.0 * plain.rate
    dear_rows = Costs(0.0, 10 * MS)  # a verified row costs as much as a whole plain step
    plain = measure(None, dear_rows, None, reqs)
    spec = measure(NGRAM, dear_rows, None, reqs)
    assert spec.ids == plain.ids
    assert spec.drafting_steps(1) <= 3 + len(spec.decode_steps(1)) // EXPLORE_EVERY
    assert spec.rate >= 0.97 * plain.rate


# Drafting pays alone (a step is mostly its fixed cost) and not for 8 streams (the fixed cost
# is shared already, and each drafted token costs a verified row plus its share of a draft call).
LOAD_TARGET = Costs(10 * MS, 2 * MS)
LOAD_DRAFT = Costs(1 * MS, 1.5 * MS)


def test_the_policy_measures_each_load_and_follows_the_load_as_it_changes() -> None:
    phases: list[Phase] = []

    async def script(client: EngineClient, phase: Callable[..., Awaitable[Phase]], _d: object) -> None:
        phases.append(await phase([stream(0, 300)]))  # alone
        phases.append(await phase([stream(i, 300) for i in range(1, 9)]))  # 8 streams
        phases.append(await phase([stream(9, 300)]))  # alone again

    engine_run(MODEL, LOAD_TARGET, LOAD_DRAFT, script)
    plain: list[Phase] = []

    async def plain_script(client: EngineClient, phase: Callable[..., Awaitable[Phase]], _d: object) -> None:
        plain.append(await phase([stream(0, 300)]))
        plain.append(await phase([stream(i, 300) for i in range(1, 9)]))

    engine_run(None, LOAD_TARGET, None, plain_script)
    alone, eight, again = phases
    assert alone.drafting_steps(1) >= 0.8 * len(alone.decode_steps(1))
    assert alone.rate >= 1.4 * plain[0].rate
    eight_steps = eight.decode_steps(8)
    assert len(eight_steps) > 200  # the eight ran side by side
    assert eight.drafting_steps(8) <= 3 + len(eight_steps) // EXPLORE_EVERY
    assert eight.rate >= 0.97 * plain[1].rate
    assert eight.ids == plain[1].ids
    # alone again: its costs were measured before and still hold, so it drafts at once
    assert again.drafting_steps(1) >= 0.8 * len(again.decode_steps(1))


def test_a_swapped_draft_model_is_measured_again() -> None:
    """The same engine, its draft first fast then as slow as the target (the swap runs as
    exclusive work, which clears what was measured), then fast again: the policy follows."""
    phases: list[Phase] = []

    async def script(
        client: EngineClient, phase: Callable[..., Awaitable[Phase]], draft: FakeBackend | None
    ) -> None:
        assert draft is not None

        def swap(call_s: float, token_s: float) -> Callable[[object], None]:
            def fn(_backend: object) -> None:
                draft.call_cost_s, draft.token_cost_s = call_s, token_s

            return fn

        phases.append(await phase([stream(0, 300)]))
        await client.run_exclusive(swap(TARGET.call_s, TARGET.token_s))
        phases.append(await phase([stream(1, 300)]))
        await client.run_exclusive(swap(1 * MS, 0.1 * MS))
        phases.append(await phase([stream(2, 300)]))

    engine_run(MODEL, TARGET, Costs(1 * MS, 0.1 * MS), script)
    fast, slow, fast_again = phases
    assert fast.drafting_steps(1) >= 0.8 * len(fast.decode_steps(1))
    assert slow.drafting_steps(1) <= 3 + len(slow.decode_steps(1)) // EXPLORE_EVERY
    assert fast_again.drafting_steps(1) >= 0.8 * len(fast_again.decode_steps(1))
    assert fast_again.rate >= 2.0 * slow.rate


def test_a_draft_that_slows_down_mid_stream_stops_being_used() -> None:
    """No swap, no reset: the draft model gets slower (a neighbour's load) while a request
    drafts; the measured costs follow and drafting stops."""
    phases: list[Phase] = []

    async def script(
        client: EngineClient, phase: Callable[..., Awaitable[Phase]], draft: FakeBackend | None
    ) -> None:
        assert draft is not None
        phases.append(await phase([stream(0, 200)]))
        draft.call_cost_s, draft.token_cost_s = TARGET.call_s, TARGET.token_s  # between requests
        phases.append(await phase([stream(1, 400)]))

    engine_run(MODEL, TARGET, Costs(1 * MS, 0.1 * MS), script)
    fast, slow = phases
    assert fast.drafting_steps(1) >= 0.8 * len(fast.decode_steps(1))
    late = slow.decode_steps(1)[len(slow.decode_steps(1)) // 2 :]  # the second half of the request
    assert sum(1 for b in late if len(b[0].tokens) > 1) <= 2 + len(late) // EXPLORE_EVERY
