"""`EngineStats`: the snapshot of counters the engine thread publishes (read lock-free).

Publishing is also when the engine answers a pending `/slots` ask (`engine/slots.py`): the
`SlotsProbe` lives with the step counters, and costs one attribute read when nobody asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kodkod.engine.plan import StepKind
from kodkod.engine.slots import SlotsProbe
from kodkod.engine.speculative.costs import CostSummary

if TYPE_CHECKING:
    from kodkod.engine.backend import Backend
    from kodkod.engine.runner import Decoded
    from kodkod.engine.scheduler import Scheduler
    from kodkod.engine.speculative.speculator import Speculator


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot published after every step (read from any thread without locks)."""

    running: int = 0
    waiting: int = 0
    cached_tokens: int = 0
    idle_cells: int = 0  # cells only idle cached prefixes hold (freed when a request needs room)
    free_cells: int = 0
    kv_capacity: int = 0
    num_slots: int = 0
    active_slots: int = 0
    steps: int = 0
    decode_steps: int = 0
    prefill_steps: int = 0
    preemptions: int = 0
    generated_tokens: int = 0
    prompt_tokens_computed: int = 0
    decode_time_s: float = 0.0  # inside backend.decode()
    step_time_s: float = 0.0  # whole steps, decode included
    # speculative decoding: tokens drafted / accepted, sequence-steps that drafted, and the
    # time spent drafting (draft model decodes and n-gram lookups)
    drafted_tokens: int = 0
    accepted_draft_tokens: int = 0
    draft_steps: int = 0
    draft_time_s: float = 0.0
    draft_model: str | None = None
    # host-RAM prefix tier (memory.sysmem_kv_cache)
    host_cache_entries: int = 0
    host_cache_bytes: int = 0
    host_cache_restores: int = 0
    host_cache_saves: int = 0
    compactions: int = 0  # idle KV compactions (engine/compaction.py)
    # speculation's measured costs per load and their break-even (refreshed when idle)
    spec_costs: tuple[CostSummary, ...] = ()

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_draft_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_draft_len(self) -> float:
        return self.drafted_tokens / self.draft_steps if self.draft_steps else 0.0


@dataclass(slots=True)
class StepCounters:
    """What the engine thread counts as it runs (aggregated there, published as EngineStats)."""

    steps: int = 0
    decode_steps: int = 0
    prefill_steps: int = 0
    generated: int = 0
    prompt_computed: int = 0
    compactions: int = 0
    decode_s: float = 0.0  # inside the backend's decode
    step_s: float = 0.0  # whole steps
    draft_s: float = 0.0  # drafting for speculative decoding
    probe: SlotsProbe = field(default_factory=SlotsProbe)  # `/slots` asks, answered at publish

    def record(self, decoded: Decoded, generated: int, step_s: float) -> None:
        """Count one step that decoded (`generated` tokens sampled, `step_s` in all)."""
        self.steps += 1
        if decoded.plan.kind is StepKind.DECODE:
            self.decode_steps += 1
        else:  # PREFILL, or MIXED (decode rows beside prompt chunks): counted as prefill steps
            self.prefill_steps += 1
            self.prompt_computed += decoded.plan.num_prompt_tokens
        self.generated += generated
        self.decode_s += decoded.decode_s
        self.draft_s += decoded.draft_s
        self.step_s += step_s


def snapshot(sched: Scheduler, backend: Backend, c: StepCounters, spec: Speculator) -> EngineStats:
    """The engine's counters as one immutable snapshot (and the answer to pending slot asks)."""
    if c.probe.pending:
        c.probe.answer(sched, backend)
    return EngineStats(
        running=len(sched.running),
        waiting=len(sched.waiting),
        cached_tokens=sched.slots.num_cached_tokens,
        idle_cells=sched.slots.num_idle_cells,
        free_cells=sched.pool.free_cells,
        kv_capacity=backend.kv_capacity,
        num_slots=backend.num_slots,
        active_slots=len(sched.running),
        steps=c.steps,
        decode_steps=c.decode_steps,
        prefill_steps=c.prefill_steps,
        preemptions=sched.num_preemptions,
        generated_tokens=c.generated,
        prompt_tokens_computed=c.prompt_computed,
        decode_time_s=c.decode_s,
        step_time_s=c.step_s,
        drafted_tokens=spec.drafted,
        accepted_draft_tokens=spec.accepted,
        draft_steps=spec.draft_steps,
        draft_time_s=c.draft_s,
        draft_model=spec.draft_backend.info.name if spec.draft_backend is not None else None,
        host_cache_entries=len(sched.host.entries) if sched.host is not None else 0,
        host_cache_bytes=sched.host.bytes_used if sched.host is not None else 0,
        host_cache_restores=sched.host.restores if sched.host is not None else 0,
        host_cache_saves=sched.host.saves if sched.host is not None else 0,
        compactions=c.compactions,
        spec_costs=spec.cost_summaries() if not sched.has_work and spec.draft_steps else spec.summaries,
    )


def step_line(decoded: Decoded, step_s: float, cpu_s: float) -> str:
    """One step as a debug log line: its kind, decode rows, prompt chunks, tokens, the wall
    time inside the decode and of the whole step, and the engine thread's CPU time in it (wall
    minus CPU: time the thread waited for a core, or for the GIL)."""
    plan = decoded.plan
    chunks = sum(1 for e in plan.entries if e.prefill)
    return (
        f"step kind={plan.kind.value} rows={len(plan.entries) - chunks} chunks={chunks} "
        f"tokens={plan.num_tokens} prompt_tokens={plan.num_prompt_tokens} "
        f"decode_ms={decoded.decode_s * 1000:.3f} step_ms={step_s * 1000:.3f} cpu_ms={cpu_s * 1000:.3f}"
    )
