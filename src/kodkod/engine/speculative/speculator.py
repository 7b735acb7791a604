"""The engine's speculative decoding: a draft policy and a draft runner that plug into the plan.

The engine calls, on its own thread:

    attach(seq) / detach(seq)   when a sequence starts / ends (decides how it drafts)
    propose(step, busy)         the draft policy, before the KV ops run: each sequence's draft
                                length (policy.choose_k) as a `DraftPlan` with the KV cells it
                                needs; the scheduler accepts or refuses it (`accept_drafts`)
    mirror(op)                  replay one of the plan's KV ops on the draft model's context
    draft(drafts)               the draft runner, after the KV ops ran: n-gram lookups, or the
                                draft model (`draft_model.py`); fills `DraftPlan.drafts`
    observe_target(n, s)        the target's decode time for n tokens (cost model)
    verified(seq, k, a)         a of k drafted tokens were accepted (acceptance estimate)

The speculator never touches the scheduler or the step plan's entries: the plan takes the
drafts (`StepPlan.take_drafts`) and the model runner decodes them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kodkod.engine.backend import Backend
from kodkod.engine.plan import CopyPrefix, DraftPlan, Entry, StepPlan, Truncate
from kodkod.engine.speculative.draft_model import DraftCosts, DraftModelRunner
from kodkod.engine.speculative.ngram import NgramIndex
from kodkod.engine.speculative.policy import Acceptance, Candidate, CostModel, choose_k
from kodkod.engine.speculative.state import NGRAM_SPAN, SpecConfig, SpecMode, SpecState

if TYPE_CHECKING:
    from kodkod.engine.sequence import Sequence

log = logging.getLogger(__name__)

CATCHUP_QUIET = 4  # a draft this far behind its sequence or less catches up without asking
CATCHUP_SAVING = 0.25  # assumed saving per generated token (fraction of a plain step) …
MAX_FAILURES = 3  # consecutive draft model failures after which it is no longer used
PROBE_EVERY = 16  # every this many drafting steps, one step does not draft (see plan())
PRIOR_ALPHA = {True: 0.7, False: 0.5}  # acceptance assumed before anything is measured


class Speculator:
    def __init__(self, config: SpecConfig, draft: Backend | None, num_slots: int) -> None:
        self.config = config
        self.draft_backend = draft
        self.draft_runner = DraftModelRunner(draft, num_slots) if draft is not None else None
        self.target_cost = CostModel()
        self.draft_cost = self.draft_runner.cost if self.draft_runner is not None else CostModel()
        self.active = 0  # sequences attached (gates every per-step call: 0 = no overhead)
        self.drafted = 0
        self.accepted = 0
        self.draft_steps = 0  # sequence-steps that drafted at least one token
        self._global = {k: Acceptance(prior=v, decay=0.995) for k, v in PRIOR_ALPHA.items()}
        self._failures = 0  # consecutive draft model failures
        self._drafting_steps = 0

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

    def propose(self, step: StepPlan, busy: bool) -> DraftPlan | None:
        """Choose how many tokens each drafting sequence of this DECODE step drafts (None:
        nobody drafts). `busy`: requests wait for admission or prefill.

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
        if dynamic:
            k = choose_k(
                cands,
                others,
                self.target_cost,
                self.draft_cost if self.draft_backend is not None else None,
                range(1, max(c.cap for c in cands) + 1),
            )
            if k:
                self._drafting_steps += 1
                if self._drafting_steps % PROBE_EVERY == 0:
                    k = 0  # a probe: re-measure the plain step, which drafting stops measuring
        else:  # static speculation: draft_num_tokens every step (capped by length, proposal)
            k = self.config.max_tokens(True)
        planned: list[Entry] = []
        wants: list[int] = []
        measured = self.draft_cost.known and self.target_cost.known
        for e, c in zip(entries, cands, strict=True):
            want = min(k, c.cap)
            if want and c.uses_model and dynamic and measured:
                want = c.cap  # its chain stops by the draft's own confidence (DraftModelRunner)
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

    def _catch_up_pays(self, seq: Sequence, num_rows: int) -> bool:
        """A draft far behind its sequence (a long prompt, or drafting paused under load) must
        compute those tokens first: worth it only if the tokens left to generate repay it."""
        runner = self.draft_runner
        behind = runner.behind(seq) if runner is not None else 0
        if behind <= CATCHUP_QUIET or not (self.draft_cost.known and self.target_cost.known):
            return True
        plain = self.target_cost.estimate(num_rows) / num_rows
        remaining = seq.max_len - len(seq.tokens)  # … which must repay the catch-up
        return self.draft_cost.slope() * behind < CATCHUP_SAVING * plain * remaining

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
        """What a chain's tokens cost this step (None until both models are measured)."""
        target, draft = self.target_cost, self.draft_cost
        if not (target.known and draft.known) or not self.config.dynamic or num_drafting == 0:
            return None
        return DraftCosts(
            base=target.estimate(num_rows) / num_rows,
            call=draft.estimate(num_drafting) / num_drafting,
            row=target.slope(),
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

    def observe_target(self, n_tokens: int, seconds: float) -> None:
        self.target_cost.observe(n_tokens, seconds)
