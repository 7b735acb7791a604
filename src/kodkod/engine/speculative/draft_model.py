"""The draft runner for a draft model: its KV mirror and its greedy, batched drafting.

Draft model KV: the draft's context has the same slots as the target's. `dlen[slot]` is how
many of the slot's tokens are in the draft's KV; it only ever holds a prefix of what the
target slot holds (the scheduler's KV ops are mirrored, `mirror()`), so a sequence's draft
catches up lazily from there — its prompt on the first drafting step (at most CATCHUP_TOKENS
per step, so a long prompt does not stall the other streams), the accepted tokens afterwards.
Rejected drafts leave the draft's KV through the scheduler's rollback Truncate, mirrored like
every other op. The drafted tokens themselves are the draft's argmax: deterministic proposals,
which is what makes the verification rule exact (see acceptance.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from kodkod.core.backend_types import BatchRow
from kodkod.engine.backend import Backend
from kodkod.engine.plan import CopyPrefix, Truncate
from kodkod.engine.speculative.costs import StepCosts
from kodkod.engine.speculative.policy import DraftConfidence

if TYPE_CHECKING:
    from kodkod.engine.sequence import Sequence

CATCHUP_TOKENS = 256  # draft-model tokens caught up per step, over all sequences


@dataclass(frozen=True, slots=True)
class DraftCosts:
    """Seconds, per drafting sequence, from the cost models."""

    base: float  # its share of the step without drafts
    call: float  # its share of one draft decode
    row: float  # one more verified row


@dataclass(slots=True)
class _Chain:
    """One sequence's drafts being made this step."""

    seq: Sequence
    want: int  # tokens the policy allows
    greedy: bool
    tokens: list[int] = field(default_factory=list)
    buckets: list[int] = field(default_factory=list)  # confidence bucket of each draft
    p_all: float = 1.0  # estimated chance that every draft so far is accepted
    expected: float = 1.0  # expected tokens from this chain's row(s) this step
    seconds: float = 0.0  # … and what they cost

    def wants_more(self) -> bool:
        return len(self.tokens) < self.want and self.tokens[-1] not in self.seq.stop_ids


class DraftModelRunner:
    """Runs the draft model on its own context (engine thread only)."""

    def __init__(
        self, backend: Backend, num_slots: int, costs: StepCosts, clock: Callable[[], float]
    ) -> None:
        """`costs.draft` learns what each draft call costs (timed with `clock`)."""
        self.backend = backend
        self.costs = costs
        self.clock = clock
        self.confidence = DraftConfidence()
        self.dlen = [0] * num_slots

    def behind(self, seq: Sequence) -> int:
        """Tokens before the pending one that the draft's KV lacks."""
        return len(seq.tokens) - 1 - self.dlen[seq.slot]

    def run(
        self,
        seqs: list[Sequence],
        wants: list[int],
        costs_for: Callable[[int], DraftCosts | None],
    ) -> list[tuple[list[int], list[int]]]:
        """Greedy drafting, batched over sequences: call 1 catches each draft KV up to the
        pending token and proposes d1; call j proposes d_j from d_{j-1}. A chain stops early
        once the chance that all its drafts get accepted (from the draft's confidence) no
        longer pays for another draft decode and verified row (`_extend`). Returns each
        sequence's (drafts, confidence buckets); raises when the draft model fails.
        `costs_for(n)`: the costs when n sequences draft (None: not measured yet)."""
        backend = self.backend
        dlen = self.dlen
        budget = CATCHUP_TOKENS
        rows: list[BatchRow] = []
        chains: list[_Chain | None] = []
        for seq, want in zip(seqs, wants, strict=True):
            end = len(seq.tokens)
            start = dlen[seq.slot]
            if start > end - 1:  # never expected: the draft holds more than the target
                backend.kv_remove(seq.slot, end - 1, -1)
                start = dlen[seq.slot] = end - 1
            behind = end - 1 - start  # tokens before the pending one not in the draft KV
            if behind > budget:  # a long catch-up: a chunk now, drafting in a later step
                if budget > 0:
                    rows.append(BatchRow(seq.slot, seq.tokens[start : start + budget], start, 0))
                    dlen[seq.slot] = start + budget
                    budget = 0
                chains.append(None)
                continue
            budget -= behind
            rows.append(BatchRow(seq.slot, seq.tokens[start:end], start, 1))
            dlen[seq.slot] = end
            chains.append(_Chain(seq, want, seq.request.sampling.is_greedy))
        started = [c for c in chains if c is not None]
        costs = costs_for(len(started))
        for c in started:
            c.seconds = costs.base + costs.call if costs is not None else 0.0
        t0 = self.clock()
        idx = backend.decode(rows)
        live: list[_Chain] = []
        j = 0
        for row, ix in zip(rows, idx, strict=True):
            if row.num_logits:
                chain = started[j]
                j += 1
                if self._extend(chain, backend.logits(ix[-1]), costs):
                    live.append(chain)
        self._observe(rows, t0)
        while True:
            live = [c for c in live if c.wants_more()]
            if not live:
                break
            rows = []
            for c in live:
                pos = len(c.seq.tokens) + len(c.tokens) - 1
                rows.append(BatchRow(c.seq.slot, c.tokens[-1:], pos, 1))
                dlen[c.seq.slot] = pos + 1
            t0 = self.clock()
            idx = backend.decode(rows)
            for c in live:
                c.seconds += costs.call if costs is not None else 0.0
            live = [
                c for c, ix in zip(live, idx, strict=True) if self._extend(c, backend.logits(ix[-1]), costs)
            ]
            self._observe(rows, t0)
        return [(c.tokens, c.buckets) if c is not None else ([], []) for c in chains]

    def _extend(self, chain: _Chain, row: np.ndarray, costs: DraftCosts | None) -> bool:
        """Consider the draft's argmax at `row` for the chain; True to draft another token.

        A chain maximises its step's expected tokens per second: a token accepted with
        probability p (all earlier drafts accepted, times its own chance from the draft's
        confidence) is worth its verified row while p / row ≥ tokens / seconds so far, and
        worth another draft decode while p / (decode + row) ≥ tokens / seconds (the next
        token is assumed about as likely). Its own decode is already paid for; so a chain
        typically ends on a near-tie: that token is verified, and when it is right the
        target's bonus token follows it for free."""
        best = int(row.argmax())
        top = row[best]
        if chain.greedy:  # how far ahead of the runner-up: near-ties are where models differ
            row[best] = -np.inf
            confidence = float(top - row.max())
            row[best] = top
        else:
            confidence = 1.0 / float(np.exp(row - top, dtype=np.float32).sum())
        bucket = DraftConfidence.bucket(chain.greedy, confidence)
        p = chain.p_all * self.confidence.estimate(chain.greedy, bucket)
        if costs is not None:
            if p * chain.seconds < costs.row * chain.expected:
                return False
            chain.expected += p
            chain.seconds += costs.row
        chain.tokens.append(best)
        chain.buckets.append(bucket)
        chain.p_all = p
        return costs is None or p * chain.seconds >= (costs.call + costs.row) * chain.expected

    def _observe(self, rows: list[BatchRow], t0: float) -> None:
        """One draft call's cost: its decode and the Python around it (logits rows, argmax,
        confidence), which a draft call costs as surely as the decode itself."""
        self.costs.draft.observe(sum(len(r.tokens) for r in rows), self.clock() - t0)

    def mirror(self, op: CopyPrefix | Truncate) -> None:
        """Replay one scheduler KV op on the draft's context."""
        dlen = self.dlen
        if isinstance(op, CopyPrefix):  # dst is empty and shares src's first cells
            n = min(op.length, dlen[op.src])
            if n > 0:
                self.backend.kv_copy(op.src, op.dst, 0, n)
            dlen[op.dst] = n
        elif dlen[op.slot] > op.length:
            self.backend.kv_remove(op.slot, op.length, -1)
            dlen[op.slot] = op.length

    def clear(self) -> None:
        """Forget the draft's KV (after a failure, when its state is unknown)."""
        self.backend.kv_clear()
        self.dlen = [0] * len(self.dlen)
