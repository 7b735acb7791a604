"""The seams of one engine step, each on its own: the scheduler's plan carries every KV op,
the model runner replays them in order before the decode (and mirrors them on a draft
model), the output processor handles a CFG group, and the scheduler accepts or refuses a
draft plan by the cells it can free."""

from __future__ import annotations

from dataclasses import dataclass, field

from kodkod.core.backend_types import BatchRow
from kodkod.core.types import GenerationRequest, TokenEvent
from kodkod.engine.build import new_sequence
from kodkod.engine.group import is_shadow, main_of, members
from kodkod.engine.plan import CopyPrefix, DraftPlan, Entry, StepKind, StepPlan, Truncate
from kodkod.engine.processor import OutputProcessor
from kodkod.engine.runner import ModelRunner
from kodkod.engine.scheduler import Scheduler, SchedulerConfig
from kodkod.engine.speculative.speculator import Speculator
from kodkod.engine.speculative.state import SpecConfig, SpecMode
from tests.engine.test_scheduler import make_seq, run_step
from tests.fakes import FakeBackend


@dataclass
class RecordingBackend(FakeBackend):
    """A FakeBackend that records every KV call and decode, in order."""

    calls: list[tuple] = field(default_factory=list)

    def kv_copy(self, src: int, dst: int, p0: int, p1: int) -> None:
        self.calls.append(("copy", src, dst, p1))
        super().kv_copy(src, dst, p0, p1)

    def kv_remove(self, slot: int, p0: int, p1: int = -1) -> None:
        self.calls.append(("remove", slot, p0))
        super().kv_remove(slot, p0, p1)

    def decode(self, rows):  # type: ignore[no-untyped-def]
        self.calls.append(("decode", [r.slot for r in rows]))
        return super().decode(rows)


class ListSink:
    def __init__(self) -> None:
        self.events: list[object] = []

    def push(self, event: object) -> None:
        self.events.append(event)


def no_fail(seq: object, message: str) -> None:
    raise AssertionError(f"nothing should fail here: {message}")


# -- scheduler: the plan carries every KV op ---------------------------------------------------


def test_ops_queued_between_steps_ride_in_the_next_plan_in_order() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=2, chunk_size=64), capacity=1000, num_slots=4)
    a = make_seq("a", list(range(10)))
    sched.add(a)
    run_step(sched)
    sched.rollback(a, 6)  # between steps (a rejected draft, a rewind)
    sched.rollback(a, 4)
    b = make_seq("b", list(range(8)))  # shares a's first 4 computed tokens
    sched.add(b)
    plan = sched.schedule()
    assert plan is not None and plan.entries
    assert plan.kv_ops[:3] == [Truncate(a.slot, 6), Truncate(a.slot, 4), CopyPrefix(a.slot, b.slot, 4)]
    assert sched.flush() is None  # nothing left on the side


def test_a_step_with_nothing_to_compute_still_hands_over_its_ops() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=1, chunk_size=64), capacity=1000, num_slots=4)
    a = make_seq("a", [1, 2, 3])
    sched.add(a)
    run_step(sched)
    sched.remove(a)  # its KV stays cached: no op
    assert sched.schedule() is None  # nothing to do at all
    sched.room.clear_cache()  # drops the cached prefix: an op with no step to carry it
    plan = sched.schedule()
    assert plan is not None and plan.kind is StepKind.KV_ONLY and not plan.entries
    assert plan.kv_ops == [Truncate(a.slot if a.slot >= 0 else 0, 0)]
    assert sched.schedule() is None


# -- model runner ------------------------------------------------------------------------------


def test_runner_replays_the_plan_ops_in_order_before_the_decode_and_mirrors_them() -> None:
    target = RecordingBackend(num_slots=4)
    draft = RecordingBackend(num_slots=4)
    target.kv[0] = [1, 2, 3, 4, 5]
    target.kv[2] = [9, 9]
    draft.kv[0] = [1, 2, 3, 4, 5]
    spec = Speculator(SpecConfig(SpecMode.MODEL), draft, 4)
    assert spec.draft_runner is not None
    spec.draft_runner.dlen[0] = 5
    seq = make_seq("s", [1, 2, 3, 4, 7])
    seq.slot, seq.num_computed = 1, 4
    plan = StepPlan(StepKind.PREFILL, [Entry(seq, 4, 1, 1)], [CopyPrefix(0, 1, 4), Truncate(2, 0)])
    runner = ModelRunner(target, None, spec, no_fail, lambda: None)
    decoded = runner.run(plan)
    assert decoded is not None and decoded.indices == [[0]] and decoded.decode_s >= 0.0
    assert target.calls == [("copy", 0, 1, 4), ("remove", 2, 0), ("decode", [1])]
    assert draft.calls == [("copy", 0, 1, 4)]  # the draft holds nothing in slot 2: no remove
    assert target.kv[1] == [1, 2, 3, 4, 7]
    assert target.batches[-1] == [BatchRow(1, [7], 4, 1)]


def test_runner_runs_a_kv_only_plan_without_decoding() -> None:
    target = RecordingBackend(num_slots=4)
    target.kv[3] = [5, 6]
    runner = ModelRunner(target, None, Speculator(SpecConfig(), None, 4), no_fail, lambda: None)
    assert runner.run(StepPlan(StepKind.KV_ONLY, [], [Truncate(3, 1)])) is None
    assert target.calls == [("remove", 3, 1)] and target.kv[3] == [5]


# -- output processor with a CFG group ---------------------------------------------------------


def test_processor_samples_the_main_from_the_mixed_rows_and_keeps_the_shadow_in_step() -> None:
    backend = FakeBackend(num_slots=4, script={20: 6})
    sink = ListSink()
    # pos row (after 5): 6 → 10, 7 → 5; neg row (after 20): 6 → 10, 22 → 5.
    # neg + 3·(pos − neg): 6 → 10, 7 → 15, so guidance picks 7 where the model alone picks 6.
    req = GenerationRequest("c", [5], max_tokens=4, cfg_scale=3.0, negative_prompt_ids=[20])
    main = new_sequence(req, sink, backend, 100, {})
    assert main.group is not None
    shadow = main.group.shadow
    assert members(main) == (main, shadow) and main_of(shadow) is main and is_shadow(shadow)
    sched = Scheduler(SchedulerConfig(max_batch_size=4, chunk_size=64), capacity=200, num_slots=4)
    spec = Speculator(SpecConfig(), None, 4)
    sched.add(main)
    plan = sched.schedule()
    assert plan is not None and plan.kind is StepKind.DECODE
    assert [e.seq for e in plan.entries] == [main, shadow]  # admitted and decoded together
    decoded = ModelRunner(backend, None, spec, no_fail, sched.flush).run(plan)
    assert decoded is not None
    sched.commit(decoded.plan)
    out = OutputProcessor(backend, sched, spec).process(decoded.plan, decoded.indices)
    assert out.generated == 1 and not out.finished and not out.failed
    assert main.output_ids == [7] and shadow.tokens == [20, 7]
    assert [e.token_ids for e in sink.events if isinstance(e, TokenEvent)] == [[7]]
    main.close()


# -- speculation plugs into the plan -----------------------------------------------------------


def _decoding(capacity: int) -> tuple[Scheduler, StepPlan]:
    sched = Scheduler(SchedulerConfig(max_batch_size=4, chunk_size=64), capacity=capacity, num_slots=4)
    old = make_seq("old", list(range(100, 120)))
    sched.add(old)
    run_step(sched)
    sched.remove(old)  # 20 cached cells that drafts may push out
    seq = make_seq("s", [1, 2, 3])
    sched.add(seq)
    run_step(sched)  # prefill
    plan = sched.schedule()
    assert plan is not None and plan.kind is StepKind.DECODE
    return sched, plan


def test_a_draft_plan_is_accepted_when_cached_prefixes_can_make_room() -> None:
    sched, plan = _decoding(capacity=30)  # 20 cached + 3 + 1 live: 6 free
    drafts = DraftPlan(list(plan.entries), [8], 1 + 8)
    assert sched.accept_drafts(plan, drafts)
    assert plan.draft is drafts
    assert any(isinstance(op, Truncate) and op.length == 0 for op in plan.kv_ops)  # the eviction
    assert sched.pool.free_cells >= 9


def test_a_draft_plan_is_refused_when_the_cells_are_short_and_running_work_is_untouched() -> None:
    sched, plan = _decoding(capacity=30)
    running = plan.entries[0].seq
    computed = running.num_computed
    drafts = DraftPlan(list(plan.entries), [40], 1 + 40)
    assert not sched.accept_drafts(plan, drafts)
    assert plan.draft is None and plan.entries[0].num_tokens == 1 and not plan.entries[0].drafts
    assert running.num_computed == computed and running in sched.running
    assert sched.flush() is None  # whatever it evicted trying is in this plan, not on the side
