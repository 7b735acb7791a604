"""Rewinding a sequence when a banned string appears in its output (engine thread).

The banned string began at output token `keep`: drop that token and everything after it, ban
it at that position, and let the next step sample the position again. Everything that looked
at the dropped tokens starts over from the kept ones: KV (scheduler rollback, mirrored on a
draft model), n-gram index, detokenizer, loop detector, sampler chain (rebuilt from the kept
history; the seeded draw is keyed by position, so it continues the same noise stream) and any
constraint or processor that can roll back. A CFG shadow is cut back in step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kodkod.engine.backend import Backend
from kodkod.engine.sequence import Sequence

if TYPE_CHECKING:
    from kodkod.engine.scheduler import Scheduler
    from kodkod.engine.speculative.speculator import Speculator

MAX_REWINDS = 1000  # banned-string rewinds per sequence before giving up


def rewind_sequence(seq: Sequence, keep: int, sched: Scheduler, backend: Backend, spec: Speculator) -> bool:
    """Cut `seq` back to `keep` output tokens and ban the next one there; False (nothing
    done) once the sequence has rewound MAX_REWINDS times."""
    seq.rewinds += 1
    if seq.rewinds > MAX_REWINDS:
        return False
    banned_token = seq.tokens[seq.num_prompt + keep]
    seq.bans.setdefault(keep, set()).add(banned_token)
    new_len = seq.num_prompt + keep
    del seq.tokens[new_len:]
    sched.rollback(seq, new_len - 1)
    spec.rewound(seq)
    seq.detok = seq.detok.restart()
    if seq.loops is not None:
        seq.loops.reset(seq.output_ids)
    if seq.sampler is not None:
        seq.sampler.close()
    seq.sampler = backend.new_sampler(seq.request.sampling, seq.tokens, seq.num_prompt)
    req = seq.request
    for obj in (req.constraint, *req.processors):
        rollback = getattr(obj, "rollback_to", None)
        if rollback is not None:
            rollback(seq.output_ids)
    if seq.group is not None:
        shadow = seq.group.shadow
        del shadow.tokens[shadow.num_prompt + keep :]
        sched.rollback(shadow, len(shadow.tokens) - 1)
    return True
