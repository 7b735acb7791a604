"""The engine's speculative decoding: a draft policy and a draft runner that plug into the plan.

The engine calls, on its own thread:

    attach(seq) / detach(seq)   when a sequence starts / ends (decides how it drafts)
    propose(step, busy, rows)   the draft policy, before the KV ops run: each sequence's draft
                                length (policy.choose_k, the step held to `rows` rows) as a
                                `DraftPlan` with the KV cells it needs; the scheduler accepts or
                                refuses it (`accept_drafts`)
    mirror(op)                  replay one of the plan's KV ops on the draft model's context
    draft(drafts)               the draft runner, after the KV ops ran: n-gram lookups, or the
                                draft model (`draft_model.py`); fills `DraftPlan.drafts`
    observe_step(b, r, s)       a DECODE step of b sequences and r rows took s seconds, drafting
                                excluded (`costs.StepCosts`; the draft runner times its calls)
    reset_costs()               after a model or adapter swap: measure everything again
    verified(seq, k, a)         a of k drafted tokens were accepted (acceptance estimate)

The speculator never touches the scheduler or the step plan's entries: the plan takes the
drafts (`StepPlan.take_drafts`) and the model runner decodes them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kodkod.engine.backend import Backend
from kodkod.engine.plan import CopyPrefix, DraftPlan, Entry, StepPlan, Truncate
from kodkod.engine.speculative.costs import CostSummary, StepCosts
from kodkod.engine.speculative.draft_model import DraftCosts, DraftModelRunner
from kodkod.engine.speculative.ngram import NgramIndex
from kodkod.engine.speculative.policy import (
    EXPLORE_K,
    Acceptance,
    Candidate,
    choose_k,
    fit_rows,
    step_rates,
)
from kodkod.engine.speculative.state import NGRAM_SPAN, SpecConfig, SpecMode, SpecState

if TYPE_CHECKING:
    from kodkod.engine.sequence import Sequence

log = logging.getLogger(__name__)

CATCHUP_QUIET = 4  # a draft this far behind its sequence or less catches up without asking
CATCHUP_SAVING = 0.25  # assumed saving per generated token (fraction of a plain step) …
MAX_FAILURES = 3  # consecutive draft model failures after which it is no longer used
PROBE_EVERY = 16  # every this many drafting steps, one step does not draft (see plan())
EXPLORE_EVERY = 64  # every this many steps that could draft but did not, one step drafts
EXPLORE_CATCHUP = 16  # … when no draft model must first catch up on more tokens than this
PRIOR_ALPHA = {True: 0.7, False: 0.5}  # acceptance assumed before anything is measured


class Speculator:
    def __init__(
        self,
        config: SpecConfig,
        draft: Backend | None,
        num_slots: int,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`clock`: seconds, for the cost measurements (tests pass a fake one)."""
        self.config = config
        self.draft_backend = draft
        self.costs = StepCosts()
        self.draft_runner = (
            DraftModelRunner(draft, num_slots, self.costs, clock) if draft is not None else None
        )
        self.active = 0  # sequences attached (gates every per-step call: 0 = no overhead)
        self.drafted = 0
        self.accepted = 0
        self.draft_steps = 0  # sequence-steps that drafted at least one token
        self._global = {k: Acceptance(prior=v, decay=0.995) for k, v in PRIOR_ALPHA.items()}
        self._failures = 0  # consecutive draft model failures
        self._drafting_steps = 0
        self._held: dict[int, int] = {}  # by sequences per step: steps since drafting was tried
        self._exploring = False  # this step drafts to measure, whatever the costs say
        self.summaries: tuple[CostSummary, ...] = ()  # the last cost_summaries()

    # -- sequences --------------------------------------------------------------------------

    def attach(self, seq: Sequence) -> None:
        """Decide how `seq` drafts: per request (`speculative_ngram`), else the model's mode.
        CFG pairs never draft (their two rows must stay in step)."""
        if seq.group is not None:
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
            if spec.uses_model and self.draft_runner is not None:
                confidence = self.draft_runner.confidence
                greedy = seq.request.sampling.is_greedy
                for j, bucket in enumerate(spec.buckets[: accepted + 1]):
                    confidence.update(greedy, bucket, j < accepted)
        self.drafted += drafted
        self.accepted += accepted
        self.draft_steps += 1

    # -- the draft policy -------------------------------------------------------------------

    def propose(self, step: StepPlan, busy: bool, max_rows: int = 0) -> DraftPlan | None:
        """Choose how many tokens each drafting sequence of this DECODE step drafts (None:
        nobody drafts). `busy`: requests wait for admission or prefill. `max_rows` (0: no
        limit): the rows the verify step may hold, its decode rows included (the scheduler's
        decode row cap, `engine/decode_rows.py`); longer drafts are shortened, longest first.

        No drafting while busy: drafting lengthens the decode steps the prefills alternate
        with, and the batch is about to grow anyway. Every PROBE_EVERY-th step that would draft
        does not: the cost of the plain step is then measured again (the cost model only learns
        the sizes it sees; a stale, noisy figure must not lock the policy into drafting). A
        probe step is short, so it costs almost nothing."""
        if self.config.dynamic and busy:
            for e in step.entries:
                if e.seq.spec is not None:
                    e.seq.spec.want = 0
            return None
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
            return None
        dynamic = self.config.dynamic
        self._exploring = False
        num_seqs = len(step.entries)
        if dynamic:
            table = self.costs.table(num_seqs)
            draft_cost = self.costs.draft if self.draft_backend is not None else None
            options = range(1, max(c.cap for c in cands) + 1)
            k = choose_k(cands, others, table, draft_cost, options)
            if k:
                self._held[num_seqs] = 0
                self._drafting_steps += 1
                if self._drafting_steps % PROBE_EVERY == 0:
                    k = 0  # a probe: re-measure the plain step, which drafting stops measuring
            elif table.known:
                k = self._explore(num_seqs, entries, cands, others, options)
        else:  # static speculation: draft_num_tokens every step (capped by length, proposal)
            k = self.config.max_tokens(True)
        planned: list[Entry] = []
        wants: list[int] = []
        measured = self.costs.draft.known and self.costs.table(num_seqs).known and not self._exploring
        lengths = [
            # a draft model's chain stops by the draft's own confidence (DraftModelRunner)
            c.cap if k and c.uses_model and dynamic and measured else min(k, c.cap)
            for c in cands
        ]
        if max_rows:
            lengths = fit_rows(lengths, max_rows - num_seqs)
        for e, want in zip(entries, lengths, strict=True):
            spec = e.seq.spec
            assert spec is not None
            spec.want = want
            if want:
                planned.append(e)
                wants.append(want)
            else:
                spec.acceptance.idle()
        if not planned:
            return None
        return DraftPlan(planned, wants, len(step.entries) + sum(wants))

    def _explore(
        self, num_seqs: int, entries: list[Entry], cands: list[Candidate], others: int, options: range
    ) -> int:
        """K for a step the policy would not draft in: 0, except every EXPLORE_EVERY-th such
        step at this load, which drafts the best length (at most EXPLORE_K) to measure what
        drafting costs now — costs move (a longer context, a neighbour's load, a slower or
        faster draft model) and a figure only re-measured by drafting would otherwise never
        change its mind. One such step in EXPLORE_EVERY bounds what a wrong guess costs."""
        held = self._held.get(num_seqs, 0) + 1
        if held < EXPLORE_EVERY:
            self._held[num_seqs] = held
            return 0
        runner = self.draft_runner
        # a draft model must first compute what it missed while it did not draft, at a cost
        # per token that repeats however rarely it is done: only sequences whose draft is
        # nearly current (short prompts, recent drafters) explore
        pairs = zip(entries, cands, strict=True)
        if runner is not None and any(
            c.uses_model and runner.behind(e.seq) > EXPLORE_CATCHUP for e, c in pairs
        ):
            return 0
        self._held[num_seqs] = 0
        table = self.costs.table(num_seqs)
        draft_cost = self.costs.draft if self.draft_backend is not None else None
        rates = [r for r in step_rates(cands, others, table, draft_cost, options) if r[0] > 0]
        if not rates:
            return 0
        self._exploring = True
        return min(max(rates, key=lambda r: r[1])[0], EXPLORE_K)

    def _catch_up_pays(self, seq: Sequence, num_rows: int) -> bool:
        """A draft far behind its sequence (a long prompt, or drafting paused under load) must
        compute those tokens first: worth it only if the tokens left to generate repay it."""
        runner = self.draft_runner
        behind = runner.behind(seq) if runner is not None else 0
        table = self.costs.table(num_rows)
        if behind <= CATCHUP_QUIET or not (self.costs.draft.known and table.known):
            return True
        plain = table.estimate(num_rows) / num_rows
        remaining = seq.max_len - len(seq.tokens)  # … which must repay the catch-up
        return self.costs.draft.slope() * behind < CATCHUP_SAVING * plain * remaining

    # -- the draft runner -------------------------------------------------------------------

    def draft(self, drafts: DraftPlan, num_rows: int) -> None:
        """Fill `drafts.drafts` (after the plan's KV ops ran): n-gram proposals, or the draft
        model's greedy chains. A failing draft model drafts nothing (its cache is cleared)."""
        out: list[list[int] | tuple[int, ...]] = [()] * len(drafts.entries)
        model: list[int] = []
        for i, (e, want) in enumerate(zip(drafts.entries, drafts.wants, strict=True)):
            spec = e.seq.spec
            assert spec is not None
            if spec.uses_model:
                model.append(i)
            else:
                out[i] = spec.proposal[:want]
        runner = self.draft_runner
        if model and runner is not None:
            seqs = [drafts.entries[i].seq for i in model]
            try:
                chains = runner.run(
                    seqs, [drafts.wants[i] for i in model], lambda n: self._costs(n, num_rows)
                )
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
                self.clear()
            else:
                for i, seq, (tokens, buckets) in zip(model, seqs, chains, strict=True):
                    out[i] = tokens
                    if tokens:
                        seq.spec.buckets = buckets  # type: ignore[union-attr]
        drafts.drafts = out

    def _costs(self, num_drafting: int, num_rows: int) -> DraftCosts | None:
        """What a chain's tokens cost this step (None until both models are measured, and on
        an exploring step: its chains draft what was planned, so that it measures)."""
        table, draft = self.costs.table(num_rows), self.costs.draft
        if (
            not (table.known and draft.known)
            or not self.config.dynamic
            or num_drafting == 0
            or self._exploring
        ):
            return None
        return DraftCosts(
            base=table.estimate(num_rows) / num_rows,
            call=draft.estimate(num_drafting) / num_drafting,
            row=table.slope(),
        )

    # -- draft KV mirror --------------------------------------------------------------------

    def mirror(self, op: CopyPrefix | Truncate) -> None:
        """Replay one scheduler KV op on the draft's context."""
        if self.draft_runner is not None:
            self.draft_runner.mirror(op)

    def clear(self) -> None:
        """Forget the draft's KV (after a failure, when its state is unknown)."""
        if self.draft_runner is not None:
            self.draft_runner.clear()

    # -- measured costs ---------------------------------------------------------------------

    def observe_step(self, num_seqs: int, num_rows: int, seconds: float) -> None:
        """A DECODE step of `num_seqs` sequences, `num_rows` rows, took `seconds` (drafting
        excluded)."""
        self.costs.observe_step(num_seqs, num_rows, seconds)

    def reset_costs(self) -> None:
        """Exclusive work ran (a model or adapter swap, …): what was measured no longer holds."""
        self.costs.reset()
        self._held.clear()

    def cost_summaries(self) -> tuple[CostSummary, ...]:
        """`cost_summary` for every load measured so far (kept in `summaries`)."""
        found = (self.cost_summary(b) for b in sorted(self.costs.target))
        self.summaries = tuple(c for c in found if c is not None)
        return self.summaries

    def cost_summary(self, num_seqs: int) -> CostSummary | None:
        """Measured costs and break-even at this load, at the acceptance seen so far."""
        uses_model = self.draft_backend is not None
        return self.costs.summary(
            num_seqs, self._global[uses_model].alpha, self.config.max_tokens(uses_model)
        )
