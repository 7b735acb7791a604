"""The output processor: turns a decoded plan into tokens and events.

For each entry with logits: sample (`output.next_token`, with CFG mixing from the shadow's
row), then `output.emit` (detokenize, banned strings, stop strings, logprobs, limits, loop
detection, the TokenEvent) — or, for an entry that carried drafts, verify them
(`speculative/verify.py`: the same two calls per position, then the rejected drafts' KV is
rolled back). A banned string rewinds the sequence here (`engine/rewind.py`). What ended is
handed back to the loop, which owns endings (final events, scheduler removal).

Rollbacks queue KV ops on the scheduler; they ride in the next plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kodkod.engine.backend import Backend
from kodkod.engine.output import Finish, Rewind, emit, next_token
from kodkod.engine.plan import StepPlan
from kodkod.engine.rewind import MAX_REWINDS, rewind_sequence
from kodkod.engine.scheduler import Scheduler
from kodkod.engine.sequence import SeqStatus, Sequence
from kodkod.engine.speculative.speculator import Speculator
from kodkod.engine.speculative.verify import verify_drafts


@dataclass(slots=True)
class Processed:
    """What a step's outputs did (lists reused from step to step: read before the next)."""

    finished: list[tuple[Sequence, Finish]] = field(default_factory=list)
    failed: list[tuple[Sequence, str]] = field(default_factory=list)
    generated: int = 0


class OutputProcessor:
    def __init__(self, backend: Backend, sched: Scheduler, spec: Speculator) -> None:
        self._backend = backend
        self._sched = sched
        self._spec = spec
        self._out = Processed()

    def process(self, plan: StepPlan, indices: list[list[int]]) -> Processed:
        backend = self._backend
        out = self._out
        out.finished.clear()
        out.failed.clear()
        now = time.perf_counter()
        generated = 0
        cfg_rows: dict[int, int] | None = None  # CFG shadows' logits rows, by id
        if any(e.seq.group is not None for e in plan.entries):
            cfg_rows = {id(e.seq): i[-1] for e, i in zip(plan.entries, indices, strict=True) if i}
        for entry, idx in zip(plan.entries, indices, strict=True):
            seq = entry.seq
            group = seq.group
            if not idx or seq.status is not SeqStatus.RUNNING:
                continue
            cfg_index = None
            if group is not None:
                if group.shadow is seq:  # decoded for its row, never sampled
                    continue
                assert cfg_rows is not None
                cfg_index = cfg_rows.get(id(group.shadow))
                if cfg_index is None:  # the shadow is not caught up: sample next step
                    continue
            if seq.stats.first_token_s == 0.0:
                seq.stats.first_token_s = now
            if entry.drafts:  # speculative: emit the accepted drafts + one; drop the rest
                outcome, emitted = verify_drafts(seq, backend, idx, entry.drafts, self._sched, self._spec)
                generated += emitted
            else:
                token, info = next_token(seq, backend, idx[-1], cfg_index)
                generated += 1
                outcome = emit(seq, backend, token, info)
            if isinstance(outcome, Rewind):
                if not rewind_sequence(seq, outcome.output_index, self._sched, backend, self._spec):
                    out.failed.append(
                        (seq, f"could not avoid the banned strings after {MAX_REWINDS} attempts")
                    )
            elif outcome is not None:
                out.finished.append((seq, outcome))
            elif group is not None:
                group.shadow.tokens.append(token)  # CFG groups never draft: token is set
        out.generated = generated
        return out
