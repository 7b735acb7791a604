"""Verification of one sequence's drafted tokens, from the logits rows of the batched decode.

The row at batch index `indices[j]` holds the target's logits after the pending token and
drafts d_1..d_j. For j = 0, 1, … : sample t_j from that row with the sequence's full normal
pipeline (`output.next_token`: logits processors, grammar mask, bans, the native sampler
chain), then `output.emit` it exactly as a non-speculative step would (stop strings, banned
strings, limits, loop detection). Continue while t_j equals d_{j+1}; the first mismatch is the
correction token, and when every draft matched, the last row gives a bonus token.

Why this is exact: drafts are deterministic (q is a point mass on d), and for a point mass the
speculative-sampling rule — accept with min(1, p(d)/q(d)), else resample from
norm(max(0, p − q)) — is "sample t ~ p; accept iff t = d; else t is the resample"
(acceptance.py). Every emitted token is therefore drawn from the same distribution as without
speculation, and samplers, grammars and processors only ever see emitted tokens, so none of
their state needs rolling back. Greedy requests get the longest matching prefix.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from kodkod.engine.backend import Backend
from kodkod.engine.output import Finish, Rewind, emit, next_token
from kodkod.engine.scheduler import Scheduler
from kodkod.engine.sequence import Sequence
from kodkod.engine.speculative.speculator import Speculator


def verify_drafts(
    seq: Sequence,
    backend: Backend,
    indices: Seq[int],
    drafts: Seq[int],
    sched: Scheduler,
    spec: Speculator,
) -> tuple[Finish | Rewind | None, int]:
    """Emit tokens from the rows in `indices` while they match `drafts`, then drop the KV
    positions of the rejected drafts. Returns (outcome of the last emit, tokens emitted)."""
    length = len(seq.tokens)  # the pending token is at length - 1, the drafts after it
    outcome, accepted, emitted = _accept(seq, backend, indices, drafts)
    sched.rollback(seq, length + accepted)  # keeps num_computed == len(tokens) - 1
    seq.stats.drafted += len(drafts)
    seq.stats.accepted += accepted
    spec.verified(seq, len(drafts), accepted)
    return outcome, emitted


def _accept(
    seq: Sequence, backend: Backend, indices: Seq[int], drafts: Seq[int]
) -> tuple[Finish | Rewind | None, int, int]:
    """(outcome of the last emit, drafts accepted, tokens emitted)."""
    accepted = 0
    n_drafts = len(drafts)
    for j, index in enumerate(indices):
        token, info = next_token(seq, backend, index)
        outcome = emit(seq, backend, token, info)
        hit = j < n_drafts and token == drafts[j]
        if hit:
            accepted += 1
        if outcome is not None or not hit:
            return outcome, accepted, j + 1
    return None, accepted, len(indices)
