"""The engine's speculative-decoding driver: per decode step, who drafts how much, and the drafts.

The engine loop calls, on its own thread:

    attach(seq) / detach(seq)   when a sequence starts / ends (decides how it drafts)
    plan(step, scheduler)       before the KV ops are replayed: choose each sequence's draft
                                length (policy.choose_k) and reserve the KV cells it needs
    mirror(ops)                 replay the scheduler's KV ops (prefix copies, truncations,
                                evictions, rollbacks) on the draft model's context
    draft(step)                 propose the tokens: n-gram lookups, or the draft model run
                                greedily for up to k batched decodes; fills Entry.drafts
    observe_target(n, s)        the target's decode time for n tokens (cost model)
    verified(seq, k, a)         a of k drafted tokens were accepted (acceptance estimate)

Draft model KV: the draft's context has the same slots as the target's. `_dlen[slot]` is how
many of the slot's tokens are in the draft's KV; it only ever holds a prefix of what the
target slot holds (ops are mirrored), so a sequence's draft catches up lazily from there —
its prompt on the first drafting step (at most CATCHUP_TOKENS per step, so a long prompt
does not stall the other streams), the accepted tokens afterwards. Rejected drafts leave the
draft's KV through the scheduler's rollback Truncate, mirrored like every other op. The
drafted tokens themselves are the draft's argmax: deterministic proposals, which is what
makes the verification rule exact (see acceptance.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from kodkod.core.backend_types import BatchRow
from kodkod.engine.backend import Backend
from kodkod.engine.scheduler import CopyPrefix, Entry, Scheduler, StepPlan, Truncate
from kodkod.engine.speculative.ngram import NgramIndex
from kodkod.engine.speculative.policy import (
    Acceptance,
    Candidate,
    CostModel,
    DraftConfidence,
    choose_k,
)
from kodkod.engine.speculative.state import NGRAM_SPAN, SpecConfig, SpecMode, SpecState

if TYPE_CHECKING:
    from kodkod.engine.sequence import Sequence

log = logging.getLogger(__name__)

CATCHUP_TOKENS = 256  # draft-model tokens caught up per step, over all sequences
CATCHUP_QUIET = 4  # a draft this far behind its sequence or less catches up without asking
CATCHUP_SAVING = 0.25  # assumed saving per generated token (fraction of a plain step) …
MAX_FAILURES = 3  # consecutive draft model failures after which it is no longer used
PROBE_EVERY = 16  # every this many drafting steps, one step does not draft (see plan())
PRIOR_ALPHA = {True: 0.7, False: 0.5}  # acceptance assumed before anything is measured


class Speculator:
    def __init__(self, config: SpecConfig, draft: Backend | None, num_slots: int) -> None:
        self.config = config
        self.draft_backend = draft
        self.target_cost = CostModel()
        self.draft_cost = CostModel()
        self.active = 0  # sequences attached (gates every per-step call: 0 = no overhead)
        self.drafted = 0
        self.accepted = 0
        self.draft_steps = 0  # sequence-steps that drafted at least one token
        self._dlen = [0] * num_slots
        self._planned: list[Entry] = []
        self._global = {k: Acceptance(prior=v, decay=0.995) for k, v in PRIOR_ALPHA.items()}
        self.confidence = DraftConfidence()
        self._failures = 0  # consecutive draft model failures
        self._drafting_steps = 0

    # -- sequences --------------------------------------------------------------------------

    def attach(self, seq: Sequence) -> None:
        """Decide how `seq` drafts: per request (`speculative_ngram`), else the model's mode.
        CFG pairs never draft (their two rows must stay in step)."""
        if seq.partner is not None or seq.is_shadow:
            return
        mode, flag = self.config.mode, seq.request.speculative_ngram
        has_model = mode is SpecMode.MODEL and self.draft_backend is not None
        if flag:
            uses_model = False
        elif has_model:
            uses_model = True
        elif mode is SpecMode.NGRAM and flag is None:
            uses_model = False
        else:
            return
        prior = min(max(self._global[uses_model].alpha, 0.2), 0.95)
        n_min = self.config.ngram_match_min
        seq.spec = SpecState(
            uses_model=uses_model,
            max_tokens=self.config.max_tokens(uses_model),
            acceptance=Acceptance(prior=prior),
            ngram=None if uses_model else NgramIndex(n_min, n_min + NGRAM_SPAN),
        )
        self.active += 1

    def detach(self, seq: Sequence) -> None:
        if seq.spec is not None:
            seq.spec = None
            self.active -= 1

    def rewound(self, seq: Sequence) -> None:
        """The sequence's tokens were cut back (banned string): re-index its n-grams."""
        if seq.spec is not None and seq.spec.ngram is not None:
            seq.spec.ngram.reset()

    def verified(self, seq: Sequence, drafted: int, accepted: int) -> None:
        spec = seq.spec
        if spec is not None:
            spec.acceptance.update(drafted, accepted)
            self._global[spec.uses_model].update(drafted, accepted)
            if spec.uses_model:
                greedy = seq.request.sampling.is_greedy
                for j, bucket in enumerate(spec.buckets[: accepted + 1]):
                    self.confidence.update(greedy, bucket, j < accepted)
        self.drafted += drafted
        self.accepted += accepted
        self.draft_steps += 1

    # -- planning ---------------------------------------------------------------------------

    def plan(self, step: StepPlan, sched: Scheduler) -> bool:
        """Choose how many tokens each drafting sequence of this DECODE step drafts, and reserve
        KV cells for them. True when anything will be drafted (then call draft()).

        No drafting while requests wait for admission or prefill: drafting lengthens the decode
        steps they alternate with, and the batch is about to grow anyway. Every PROBE_EVERY-th
        step that would draft does not: the cost of the plain step is then measured again (the
        cost model only learns the sizes it sees; a stale, noisy figure must not lock the
        policy into drafting). A probe step is short, so it costs almost nothing."""
        self._planned = []
        if self.config.dynamic and (sched.waiting or any(s.in_prefill for s in sched.running)):
            for e in step.entries:
                if e.seq.spec is not None:
                    e.seq.spec.want = 0
            return False
        cands: list[Candidate] = []
        entries: list[Entry] = []
        others = 0
        for e in step.entries:
            seq = e.seq
            spec = seq.spec
            if spec is None:
                others += 1
                continue
            spec.want = 0
            cap = min(spec.max_tokens, seq.max_len - len(seq.tokens) - 1)
            if spec.ngram is not None:
                spec.proposal = spec.ngram.propose(seq.tokens, cap) if cap > 0 else []
                cap = len(spec.proposal)
            elif self._failures >= MAX_FAILURES or (
                cap > 0 and self.config.dynamic and not self._catch_up_pays(seq, len(step.entries))
            ):
                cap = 0
            if cap <= 0:
                spec.acceptance.idle()
                others += 1
                continue
            cands.append(Candidate(spec.acceptance.alpha, cap, spec.uses_model))
            entries.append(e)
        if not cands:
            return False
        dynamic = self.config.dynamic
        if dynamic:
            has_model = self.draft_backend is not None
            k = choose_k(
                cands,
                others,
                self.target_cost,
                self.draft_cost if has_model else None,
                range(1, max(c.cap for c in cands) + 1),
            )
            if k:
                self._drafting_steps += 1
                if self._drafting_steps % PROBE_EVERY == 0:
                    k = 0  # a probe: re-measure the plain step, which drafting stops measuring
        else:  # static speculation: draft_num_tokens every step (capped by length, proposal)
            k = self.config.max_tokens(True)
        total = 0
        measured = self.draft_cost.known and self.target_cost.known
        for e, c in zip(entries, cands, strict=True):
            want = min(k, c.cap)
            if want and c.uses_model and dynamic and measured:
                want = c.cap  # its chain stops by the draft's own confidence (_extend)
            e.seq.spec.want = want  # type: ignore[union-attr]
            total += want
            if want:
                self._planned.append(e)
            else:
                e.seq.spec.acceptance.idle()  # type: ignore[union-attr]
        if not total or not sched.reserve(len(step.entries) + total):
            self._planned = []
            return False
        return True

    def _catch_up_pays(self, seq: Sequence, num_rows: int) -> bool:
        """A draft far behind its sequence (a long prompt, or drafting paused under load) must
        compute those tokens first: worth it only if the tokens left to generate repay it."""
        behind = len(seq.tokens) - 1 - self._dlen[seq.slot]
        if behind <= CATCHUP_QUIET or not (self.draft_cost.known and self.target_cost.known):
            return True
        plain = self.target_cost.estimate(num_rows) / num_rows
        remaining = seq.max_len - len(seq.tokens)  # … which must repay the catch-up
        return self.draft_cost.slope() * behind < CATCHUP_SAVING * plain * remaining

    # -- drafting ---------------------------------------------------------------------------

    def draft(self, step: StepPlan) -> None:
        """Fill `Entry.drafts` of the planned entries (after the KV ops were replayed)."""
        planned, self._planned = self._planned, []
        model_entries: list[Entry] = []
        for e in planned:
            spec = e.seq.spec
            assert spec is not None
            if spec.uses_model:
                model_entries.append(e)
            else:
                _set_drafts(e, spec.proposal[: spec.want])
        if model_entries:
            try:
                self._run_draft_model(model_entries, len(step.entries))
                self._failures = 0
            except Exception:
                self._failures += 1
                if self._failures >= MAX_FAILURES:
                    log.exception(
                        "the draft model failed %d times in a row; drafting with it "
                        "stops until the model is reloaded",
                        self._failures,
                    )
                else:
                    log.warning("the draft model failed (its cache is cleared)", exc_info=True)
                for e in model_entries:
                    _set_drafts(e, ())
                self.clear()

    def _run_draft_model(self, entries: list[Entry], num_rows: int) -> None:
        """Greedy drafting, batched over sequences: call 1 catches each draft KV up to the
        pending token and proposes d1; call j proposes d_j from d_{j-1}. A chain stops early
        once the chance that all its drafts get accepted (from the draft's confidence) no
        longer pays for another draft decode and verified row (`_extend`)."""
        backend = self.draft_backend
        assert backend is not None
        dlen = self._dlen
        budget = CATCHUP_TOKENS
        rows: list[BatchRow] = []
        chains: list[_Chain] = []
        for e in entries:
            seq = e.seq
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
                _set_drafts(e, ())
                continue
            budget -= behind
            rows.append(BatchRow(seq.slot, seq.tokens[start:end], start, 1))
            dlen[seq.slot] = end
            chains.append(_Chain(e, seq.request.sampling.is_greedy))
        costs = self._costs(len(chains), num_rows)
        for c in chains:
            c.seconds = costs.base + costs.call if costs is not None else 0.0
        idx = self._decode(backend, rows)
        live: list[_Chain] = []
        j = 0
        for row, ix in zip(rows, idx, strict=True):
            if row.num_logits:
                chain = chains[j]
                j += 1
                if self._extend(chain, backend.logits(ix[-1]), costs):
                    live.append(chain)
        while True:
            live = [c for c in live if c.wants_more()]
            if not live:
                break
            rows = []
            for c in live:
                pos = len(c.entry.seq.tokens) + len(c.tokens) - 1
                rows.append(BatchRow(c.entry.seq.slot, c.tokens[-1:], pos, 1))
                dlen[c.entry.seq.slot] = pos + 1
            idx = self._decode(backend, rows)
            for c in live:
                c.seconds += costs.call if costs is not None else 0.0
            live = [
                c for c, ix in zip(live, idx, strict=True) if self._extend(c, backend.logits(ix[-1]), costs)
            ]
        for c in chains:
            _set_drafts(c.entry, c.tokens)
            c.entry.seq.spec.buckets = c.buckets  # type: ignore[union-attr]

    def _costs(self, num_drafting: int, num_rows: int) -> _Costs | None:
        """What a chain's tokens cost this step (None until both models are measured)."""
        target, draft = self.target_cost, self.draft_cost
        if not (target.known and draft.known) or not self.config.dynamic or num_drafting == 0:
            return None
        return _Costs(
            base=target.estimate(num_rows) / num_rows,
            call=draft.estimate(num_drafting) / num_drafting,
            row=target.slope(),
        )

    def _extend(self, chain: _Chain, row: np.ndarray, costs: _Costs | None) -> bool:
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

    def _decode(self, backend: Backend, rows: list[BatchRow]) -> list[list[int]]:
        t0 = time.perf_counter()
        idx = backend.decode(rows)
        self.draft_cost.observe(sum(len(r.tokens) for r in rows), time.perf_counter() - t0)
        return idx

    # -- draft KV mirror --------------------------------------------------------------------

    def mirror(self, op: CopyPrefix | Truncate) -> None:
        """Replay one scheduler KV op on the draft's context."""
        backend = self.draft_backend
        if backend is None:
            return
        dlen = self._dlen
        if isinstance(op, CopyPrefix):  # dst is empty and shares src's first cells
            n = min(op.length, dlen[op.src])
            if n > 0:
                backend.kv_copy(op.src, op.dst, 0, n)
            dlen[op.dst] = n
        elif dlen[op.slot] > op.length:
            backend.kv_remove(op.slot, op.length, -1)
            dlen[op.slot] = op.length

    def clear(self) -> None:
        """Forget the draft's KV (after a failure, when its state is unknown)."""
        if self.draft_backend is not None:
            self.draft_backend.kv_clear()
        self._dlen = [0] * len(self._dlen)

    def observe_target(self, n_tokens: int, seconds: float) -> None:
        self.target_cost.observe(n_tokens, seconds)


@dataclass(frozen=True, slots=True)
class _Costs:
    """Seconds, per drafting sequence, from the cost models."""

    base: float  # its share of the step without drafts
    call: float  # its share of one draft decode
    row: float  # one more verified row


@dataclass(slots=True)
class _Chain:
    """One sequence's drafts being made this step."""

    entry: Entry
    greedy: bool
    tokens: list[int] = field(default_factory=list)
    buckets: list[int] = field(default_factory=list)  # confidence bucket of each draft
    p_all: float = 1.0  # estimated chance that every draft so far is accepted
    expected: float = 1.0  # expected tokens from this chain's row(s) this step
    seconds: float = 0.0  # … and what they cost

    def wants_more(self) -> bool:
        spec = self.entry.seq.spec
        return (
            spec is not None
            and len(self.tokens) < spec.want
            and self.tokens[-1] not in self.entry.seq.stop_ids
        )


def _set_drafts(e: Entry, drafts: list[int] | tuple[int, ...]) -> None:
    e.drafts = drafts
    e.num_tokens = e.num_logits = 1 + len(drafts)
