"""Measured step costs for the draft policy: what a decode step of B sequences really costs.

The policy's question is "does drafting k tokens per sequence raise tokens per second at this
load?", so the costs it needs are the ones a user's tokens wait for, measured while serving:

* `StepCosts.target[B]` — seconds of the whole step (plan, decode, sampling, verification,
  emitting; the draft model's calls excluded) of a DECODE step with B sequences, by the number
  of rows R in its batch: R = B is a plain decode step, R = B + Σk verifies Σk drafted tokens.
  Keyed per B because the cost of a row depends on what the batch attends to (eight sequences
  with one row each cost more than one sequence with eight rows).
* `StepCosts.draft` — seconds of one draft model call (its decode plus the Python around it:
  fetching each logits row, argmax, confidence), by the tokens in the call.

Timing is taken from an injected clock (`EngineConfig.clock`), so tests drive it with a fake
backend that advances a fake clock by set per-call costs. The tables are exponential moving
averages: they follow the context growing, a draft model swapped in, a neighbour's load. After
exclusive work (a model or adapter swap) they are cleared (`reset`) and measured again.

`summary(B)` condenses them into what the benchmark prints: plain step, cost of one more
verified row, draft call — and the acceptance at which drafting starts to pay (break-even).
"""

from __future__ import annotations

from dataclasses import dataclass

from kodkod.engine.speculative.policy import CostModel, expected_tokens

MAX_TRACKED_BATCH = 64  # sequences per step tracked separately (larger steps share the last)


@dataclass(frozen=True, slots=True)
class CostSummary:
    """Measured costs at one load (B sequences per step), in seconds, and their break-even."""

    num_seqs: int
    plain_s: float  # one plain decode step
    row_s: float  # one more verified row (per drafted token)
    draft_call_s: float  # one draft model call drafting one token for each of the B sequences
    breakeven_alpha: float | None  # acceptance above which drafting k=1 pays (None: never)
    best_k: int  # the best draft length at acceptance `alpha`
    best_speedup: float  # its expected tokens/s relative to plain decoding
    alpha: float  # the acceptance used for best_k


class StepCosts:
    """Per-load tables of measured step costs (engine thread only)."""

    __slots__ = ("target", "draft")

    def __init__(self) -> None:
        self.target: dict[int, CostModel] = {}
        self.draft = CostModel()

    def reset(self) -> None:
        self.target.clear()
        self.draft = CostModel()

    def table(self, num_seqs: int) -> CostModel:
        b = min(num_seqs, MAX_TRACKED_BATCH)
        t = self.target.get(b)
        if t is None:
            t = self.target[b] = CostModel()
        return t

    def observe_step(self, num_seqs: int, num_rows: int, seconds: float) -> None:
        """A DECODE step of `num_seqs` sequences and `num_rows` rows took `seconds` (drafting
        excluded)."""
        self.table(num_seqs).observe(num_rows, seconds)

    def plain(self, num_seqs: int) -> float:
        return self.table(num_seqs).estimate(num_seqs)

    def summary(self, num_seqs: int, alpha: float, max_k: int = 16) -> CostSummary | None:
        """The measured costs at B = num_seqs and the break-even (None: not measured yet)."""
        t = self.target.get(min(num_seqs, MAX_TRACKED_BATCH))
        if t is None or not t.known:
            return None
        b = num_seqs
        plain = t.estimate(b)
        row = t.slope()
        call = self.draft.estimate(b) if self.draft.known else 0.0
        # k = 1 pays when b·(1 + α) / (plain + b·row + call) > b / plain
        cost1 = t.estimate(2 * b) + call
        breakeven = cost1 / plain - 1.0 if plain > 0 else None
        best_k, best = 0, 1.0
        for k in range(1, max_k + 1):
            seconds = t.estimate(b * (k + 1)) + k * call
            gain = expected_tokens(alpha, k) * plain / seconds if seconds > 0 else 0.0
            if gain > best:
                best_k, best = k, gain
        return CostSummary(
            num_seqs=b,
            plain_s=plain,
            row_s=row,
            draft_call_s=call,
            breakeven_alpha=breakeven if breakeven is not None and breakeven < 1.0 else None,
            best_k=best_k,
            best_speedup=best,
            alpha=alpha,
        )
