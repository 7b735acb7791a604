"""How many tokens to draft: measured costs against measured acceptance.

Speculation pays when the extra verified positions (and the draft model's own decodes) cost
less than the tokens they are expected to yield. Both sides are measured while serving:

* `CostModel` keeps an exponential moving average of decode seconds per batch size (tokens in
  one llama_decode), for the target and for the draft. Sizes not seen yet are interpolated
  between measured ones, or extrapolated with the measured slope (a prior of +12 % per token
  until two sizes are known — optimistic on purpose: trying is how a size gets measured).
* `Acceptance` is a per-sequence estimate of α, the chance that the next drafted token is
  accepted given the previous ones were (a geometric model: each verification is α-accepted
  positions then at most one rejection). Counts decay, so α follows the text; a sequence that
  stops drafting drifts back to the prior, so it is probed again later.

`choose_k` then picks, for one decode step, the draft length K (each sequence drafts
min(K, its cap)) that maximises expected tokens per second of the whole step:

    tokens(K)  = Σ_seq (1 + α + … + α^k)                  (the sampled token, plus accepted drafts)
    seconds(K) = step_B(B + Σ k) + Σ_j t_draft(#seqs drafting a j-th token)

step_B is the measured cost of a whole step with B sequences by rows in its batch (one table
per B, `costs.StepCosts`): a step's cost also depends on how much context its sequences attend
to, so eight sequences with one row each cost more than one sequence with eight rows. Both
step_B and t_draft are whole costs — sampling, verification, emitting, and the Python around
each draft call — because the tokens a user waits for pay all of it, not just llama_decode.
With many sequences in the batch the verification rows cost nearly as much as the tokens
they are worth, so K = 0 wins and drafting stops: speculation backs off under load by itself.
Drafting must beat not drafting by MARGIN: near the break-even point the estimates' errors
(noise, context-dependent costs the model does not see) decide, and losing is worse than
missing a marginal gain.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

PRIOR_SLOPE = 0.12  # relative cost of one more token in a batch, before two sizes are measured
MARGIN = 0.15  # drafting must promise this much more throughput than not (model error, noise)
EMA_WEIGHT = 0.25
MAX_SIZE = 512  # batch sizes above this are not tracked (prefill-sized batches)
EXPLORE_K = 4  # the longest trial draft while a load's step cost is known at one size only


class CostModel:
    """Measured seconds per decode call, by number of tokens in the call."""

    __slots__ = ("_ema", "_sizes")

    def __init__(self) -> None:
        self._ema: dict[int, float] = {}
        self._sizes: list[int] = []  # sorted keys of _ema

    def observe(self, n_tokens: int, seconds: float) -> None:
        if n_tokens <= 0 or n_tokens > MAX_SIZE or seconds <= 0.0:
            return
        old = self._ema.get(n_tokens)
        if old is None:
            self._ema[n_tokens] = seconds
            bisect.insort(self._sizes, n_tokens)
        else:
            self._ema[n_tokens] = old + EMA_WEIGHT * (seconds - old)

    @property
    def known(self) -> bool:
        return bool(self._sizes)

    @property
    def num_sizes(self) -> int:
        return len(self._sizes)

    def estimate(self, n: int) -> float:
        """Seconds for a call of n tokens (0.0 when nothing is measured yet)."""
        ema, sizes = self._ema, self._sizes
        hit = ema.get(n)
        if hit is not None:
            return hit
        if not sizes:
            return 0.0
        i = bisect.bisect_left(sizes, n)
        if 0 < i < len(sizes):  # between two measured sizes
            lo, hi = sizes[i - 1], sizes[i]
            return ema[lo] + (ema[hi] - ema[lo]) * (n - lo) / (hi - lo)
        anchor = sizes[-1] if i == len(sizes) else sizes[0]
        return max(ema[anchor] + self.slope() * (n - anchor), 0.0)

    def slope(self) -> float:
        """Seconds per extra token: from the two most distant measured sizes, else the prior."""
        sizes, ema = self._sizes, self._ema
        if len(sizes) >= 2:
            lo, hi = sizes[0], sizes[-1]
            return max((ema[hi] - ema[lo]) / (hi - lo), 0.0)
        n = sizes[0]
        return ema[n] * PRIOR_SLOPE / (1.0 + PRIOR_SLOPE * (n - 1))


@dataclass(slots=True)
class Acceptance:
    """Decaying counts of accepted drafts and of verifications (geometric model of α)."""

    prior: float
    accepted: float = 0.0
    trials: float = 0.0
    decay: float = 0.93  # per verified position: the estimate remembers ~15 of them
    prior_weight: float = 2.0

    @property
    def alpha(self) -> float:
        return (self.accepted + self.prior * self.prior_weight) / (self.trials + self.prior_weight)

    def update(self, drafted: int, accepted: int) -> None:
        """`accepted` of `drafted` tokens matched (a rejection follows when accepted < drafted)."""
        if drafted <= 0:
            return
        trials = accepted + (1 if accepted < drafted else 0)
        d = self.decay**trials
        self.accepted = self.accepted * d + accepted
        self.trials = self.trials * d + trials

    def idle(self) -> None:
        """A step without drafting: forget a little, drifting back toward the prior."""
        self.accepted *= 0.97
        self.trials *= 0.97


@dataclass(slots=True)
class Candidate:
    """A sequence that may draft this step."""

    alpha: float
    cap: int  # most tokens it may draft (length limit, proposal length, draft_num_tokens)
    uses_model: bool  # drafted by the draft model (costs draft decodes) rather than n-grams


def expected_tokens(alpha: float, k: int) -> float:
    """1 + α + … + α^k: the sampled token plus the expected accepted drafts."""
    if k <= 0:
        return 1.0
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def step_rates(
    cands: Sequence[Candidate],
    num_others: int,
    target: CostModel,
    draft: CostModel | None,
    options: Sequence[int],
) -> list[tuple[int, float]]:
    """(K, expected tokens per second of the step) for K = 0 and each of `options`.

    `target` is the measured step cost at this load (seconds by rows in the batch, see
    `costs.StepCosts`); `num_others` sequences in the same decode step do not draft. Runs
    every decode step: one pass over K = 1, 2, … adding each K's tokens, rows and draft call
    to the previous K's (no work per (K, sequence, position) triple)."""
    num_seqs = num_others + len(cands)
    wanted = set(options)
    top = max(wanted, default=0)
    plain = target.estimate(num_seqs)
    out: list[tuple[int, float]] = [(0, num_seqs / plain)] if plain > 0.0 else []
    tokens = float(num_seqs)  # each sequence's sampled token
    extra = 0  # drafted rows
    draft_s = 0.0
    power = [1.0] * len(cands)  # α^k of each candidate at the current k
    for K in range(1, top + 1):
        drafting = 0  # draft-model sequences drafting a K-th token
        for i, c in enumerate(cands):
            if c.cap >= K:
                power[i] *= c.alpha
                tokens += power[i]  # 1 + α + … + α^K: one more term
                extra += 1
                drafting += c.uses_model
        if drafting and draft is not None:
            draft_s += draft.estimate(drafting)
        if K in wanted:
            seconds = target.estimate(num_seqs + extra) + draft_s
            if seconds > 0.0:
                out.append((K, tokens / seconds))
    return out


def fit_rows(lengths: Sequence[int], budget: int) -> list[int]:
    """`lengths` (drafted tokens per sequence, one row each) shortened so that they add up to at
    most `budget` rows: the longest drafts lose tokens first, down to one level L that all cut
    drafts share, and the rows left over go one each to the earliest of them (so ties lose at
    the end of the list first); drafts of L tokens or fewer keep theirs; order kept."""
    out = list(lengths)
    budget = max(0, budget)
    if sum(out) <= budget:
        return out
    lo, hi = 0, max(out)  # the highest level L with sum(min(n, L)) <= budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in out) <= budget:
            lo = mid
        else:
            hi = mid - 1
    spare = budget - sum(min(n, lo) for n in out)
    for i, n in enumerate(out):
        if n > lo:
            out[i] = lo + (1 if spare > 0 else 0)
            spare -= 1
    return out


def choose_k(
    cands: Sequence[Candidate],
    num_others: int,
    target: CostModel,
    draft: CostModel | None,
    options: Sequence[int],
) -> int:
    """The draft length K from `options` with the best expected tokens per second (0: none).

    Until the plain step at this load is measured, K = 0 (it measures it). A size not measured
    yet is extrapolated optimistically (PRIOR_SLOPE; an unmeasured draft model costs nothing),
    so the first drafting step at a load is a trial that measures it — limited to EXPLORE_K
    tokens while only one batch size is known, so a trial at a large batch stays cheap.
    """
    if not target.known:
        return 0
    if target.num_sizes < 2:
        options = [k for k in options if k <= EXPLORE_K] or [min(options, default=0)]
    best_k, best_rate = 0, 0.0
    for K, rate in step_rates(cands, num_others, target, draft, options):
        if K == 0:
            rate *= 1.0 + MARGIN
        if rate > best_rate * 1.0001:
            best_k, best_rate = K, rate
    return best_k


# Draft-model confidence → acceptance. Greedy requests accept a drafted token when the target's
# argmax agrees, which is near-certain unless the draft's top two logits are nearly tied (the
# two models' rounding differences only flip near-ties); sampled requests accept it with the
# target's probability of it, which the draft's own probability approximates. Both mappings
# are learned from this engine's verifications, per bucket, starting from these priors.
GAP_EDGES = (0.25, 0.5, 1.0, 2.0)  # greedy: draft logit gap top-1 − top-2
GAP_PRIOR = (0.75, 0.95, 0.99, 0.995, 0.998)
PROB_EDGES = (0.2, 0.4, 0.6, 0.8, 0.9)  # sampled: the draft's probability of its token
PROB_PRIOR = (0.1, 0.3, 0.5, 0.7, 0.85, 0.95)
CONFIDENCE_PRIOR_WEIGHT = 4.0


class DraftConfidence:
    """Acceptance of a drafted token by the draft's confidence bucket, learned online."""

    __slots__ = ("_hits", "_seen")

    def __init__(self) -> None:
        self._hits = {
            True: [p * CONFIDENCE_PRIOR_WEIGHT for p in GAP_PRIOR],
            False: [p * CONFIDENCE_PRIOR_WEIGHT for p in PROB_PRIOR],
        }
        self._seen = {
            True: [CONFIDENCE_PRIOR_WEIGHT] * len(GAP_PRIOR),
            False: [CONFIDENCE_PRIOR_WEIGHT] * len(PROB_PRIOR),
        }

    @staticmethod
    def bucket(greedy: bool, confidence: float) -> int:
        """`confidence`: the logit gap (greedy) or the draft's probability (sampled)."""
        return bisect.bisect_right(GAP_EDGES if greedy else PROB_EDGES, confidence)

    def estimate(self, greedy: bool, bucket: int) -> float:
        return self._hits[greedy][bucket] / self._seen[greedy][bucket]

    def update(self, greedy: bool, bucket: int, accepted: bool) -> None:
        self._seen[greedy][bucket] += 1.0
        if accepted:
            self._hits[greedy][bucket] += 1.0
