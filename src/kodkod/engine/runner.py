"""The model runner: executes one step plan on the backend.

    replay the plan's KV ops (mirrored on the draft model's context)
    → draft (when speculation's draft plan was accepted; the plan takes the drafts)
    → set the plan's LoRA adapters → build the batch rows → decode

A failed batched decode is narrowed down to the rows responsible (`engine/faults.py`): their
sequences fail through the `fail` callback, the KV ops those endings queued are replayed at
once, and the other rows are decoded again. The runner measures what it runs (decode and
draft seconds, whether the step's cost may feed speculation's cost tables) and returns it with
the logits indices; it decides nothing about sequences.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kodkod.core.backend_types import BatchRow
from kodkod.engine.adapters import use_adapters
from kodkod.engine.backend import Backend
from kodkod.engine.faults import isolate_failure
from kodkod.engine.host_cache import HostPrefixCache
from kodkod.engine.plan import KVOp, StepKind, StepPlan
from kodkod.engine.replay import replay_kv_ops
from kodkod.engine.sequence import Sequence
from kodkod.engine.speculative.speculator import Speculator


@dataclass(slots=True)
class Decoded:
    """A plan after its decode: what ran and where its logits are."""

    plan: StepPlan  # without the rows whose sequences failed (then `indices` match it)
    indices: list[list[int]]  # per entry: batch indices of its logits rows
    decode_s: float  # inside backend.decode (retries included)
    draft_s: float  # drafting (n-gram lookups, draft model decodes)
    measured: bool  # a DECODE step while speculation is on, decoded at once: its cost counts


class ModelRunner:
    """Runs plans on one backend (engine thread only)."""

    def __init__(
        self,
        backend: Backend,
        host: HostPrefixCache | None,
        spec: Speculator,
        fail: Callable[[Sequence, str], None],
        flush: Callable[[], StepPlan | None],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`fail(seq, message)` ends a sequence whose row cannot be decoded; `flush()` gives
        the KV ops queued since the plan (Scheduler.flush); `clock()` times decode and draft."""
        self.backend = backend
        self._host = host
        self._spec = spec
        self._mirror = spec.mirror if spec.draft_backend is not None else None
        self._fail = fail
        self._flush = flush
        self._clock = clock

    def replay(self, ops: Iterable[KVOp]) -> None:
        """Replay KV ops on the backend (and the draft model's context), in order."""
        replay_kv_ops(self.backend, ops, self._host, self._mirror)

    def sync(self) -> None:
        """Replay what the scheduler queued since its last plan (work between steps)."""
        plan = self._flush()
        if plan is not None:
            self.replay(plan.kv_ops)

    def run(self, plan: StepPlan) -> Decoded | None:
        """Execute `plan`; None for a KV-only plan."""
        self.replay(plan.kv_ops)
        if not plan.entries:
            return None
        spec = self._spec
        draft_s = 0.0
        drafts = plan.draft
        if drafts is not None:
            t0 = self._clock()
            spec.draft(drafts, len(plan.entries))
            plan.take_drafts(drafts)  # each drafting row: the pending token + its drafts
            draft_s = self._clock() - t0
        observe = spec.active > 0 and plan.kind is StepKind.DECODE
        rows = [
            BatchRow(e.seq.slot, e.seq.tokens[e.start : e.start + e.num_tokens], e.start, e.num_logits)
            if not e.drafts
            else BatchRow(e.seq.slot, [e.seq.tokens[e.start], *e.drafts], e.start, e.num_logits)
            for e in plan.entries
        ]
        t1 = self._clock()
        use_adapters(self.backend, plan.entries[0].seq.adapter_key)  # one LoRA set per plan
        try:
            indices = self.backend.decode(rows)
        except Exception as exc:  # fail the rows responsible, decode the others again
            observe = False  # the retries' time says nothing about the cost model
            plan, indices = isolate_failure(self.backend, plan, rows, exc, self._fail, self.sync)
        decode_s = self._clock() - t1
        return Decoded(plan, indices, decode_s, draft_s, observe)
