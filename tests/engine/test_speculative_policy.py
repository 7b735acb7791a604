"""Speculative decoding, pure parts: the acceptance rule (statistically), n-gram lookup, and the
policy that picks the draft length from measured costs and acceptance."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kodkod.engine.speculative.acceptance import accept_or_resample, point_mass, residual
from kodkod.engine.speculative.ngram import NgramIndex
from kodkod.engine.speculative.policy import (
    EXPLORE_K,
    Acceptance,
    Candidate,
    CostModel,
    choose_k,
    expected_tokens,
    fit_rows,
)

DRAWS = 20_000


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of Pearson's chi-square (Wilson–Hilferty approximation of the tail)."""
    n = counts.sum()
    keep = probs > 0
    if counts[~keep].sum():
        return 0.0  # drew a token of probability 0: certainly not this distribution
    expected = n * probs[keep]
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    df = int(keep.sum()) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def draw_with_rule(p: np.ndarray, q: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = np.zeros(p.shape[0], dtype=np.int64)
    drafts = rng.choice(q.shape[0], size=DRAWS, p=q)
    for d in drafts:
        _, token = accept_or_resample(p, q, int(d), rng)
        counts[token] += 1
    return counts


def dist(rng: np.random.Generator, n: int, sharp: float) -> np.ndarray:
    x = rng.gamma(sharp, size=n)
    return x / x.sum()


@pytest.mark.parametrize("case", range(4))
def test_acceptance_rule_reproduces_the_target_distribution(case: int) -> None:
    rng = np.random.default_rng(100 + case)
    n = (6, 10, 12, 16)[case]
    p = dist(rng, n, 0.7)
    q = dist(rng, n, 1.5)
    if case == 3:
        p[:3] = 0.0  # the target forbids tokens the draft likes (a grammar mask)
        p /= p.sum()
    counts = draw_with_rule(p, q, seed=case)
    assert counts[p == 0].sum() == 0
    assert chi_square_p(counts, p) > 1e-3
    # the test has power: the draft's own distribution is rejected
    assert chi_square_p(np.bincount(rng.choice(n, DRAWS, p=q), minlength=n), p) < 1e-6


def test_point_mass_rule_is_sample_and_compare() -> None:
    """With a deterministic draft, the rule is: draw t ~ p, accept iff t == d (what verify does)."""
    rng = np.random.default_rng(7)
    p = dist(rng, 8, 1.0)
    d = int(np.argmax(p))
    q = point_mass(8, d)
    counts = draw_with_rule(p, q, seed=11)
    assert chi_square_p(counts, p) > 1e-3
    accepted = sum(accept_or_resample(p, q, d, np.random.default_rng(s))[0] for s in range(4000))
    assert abs(accepted / 4000 - p[d]) < 0.03  # accepted with probability p(d)
    r = residual(p, q)  # the resample is p without d, renormalised
    assert r[d] == 0.0 and np.allclose(r, np.where(np.arange(8) == d, 0, p) / (1 - p[d]))


def test_residual_of_equal_distributions_is_the_target() -> None:
    p = np.array([0.5, 0.25, 0.25])
    assert np.allclose(residual(p, p), p)


# -- n-grams ------------------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_latest_occurrence() -> None:
    idx = NgramIndex(2, 4)
    tokens = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    # tail [1,2,3] last occurred at 6..8, followed by 7, 8
    assert idx.propose(tokens, 3) == [7, 8, 1]
    assert idx.propose(tokens, 1) == [7]


def test_ngram_prefers_the_longest_match_and_never_matches_itself() -> None:
    idx = NgramIndex(2, 3)
    tokens = [5, 6, 1, 9, 4, 5, 6, 2, 7, 6, 1]
    # [6, 1] occurs at 1..2 (→ 9); 3-gram [7, 6, 1] never occurred
    assert idx.propose(tokens, 2) == [9, 4]
    assert NgramIndex(2, 4).propose([1, 2, 3, 4], 4) == []  # no earlier occurrence
    assert NgramIndex(2, 4).propose([3, 3], 4) == []  # the tail alone is no match


def test_ngram_index_is_incremental_and_resets() -> None:
    idx = NgramIndex(2, 2)
    tokens = [1, 2, 3]
    assert idx.propose(tokens, 2) == []
    tokens += [1, 2]
    assert idx.propose(tokens, 2) == [3, 1]
    del tokens[3:]
    tokens += [8, 1, 2]
    idx.reset()  # after a rewind the stale positions are gone
    assert idx.propose(tokens, 3) == [3, 8, 1]


# -- policy ---------------------------------------------------------------------------------


def costs(base: float, per_token: float, sizes: range) -> CostModel:
    m = CostModel()
    for n in sizes:
        m.observe(n, base + per_token * (n - 1))
    return m


# measured here (2 threads): F32 SmolLM2 target, Q4_1 draft; seconds per llama_decode
TARGET = costs(0.021, 0.0029, range(1, 41))
DRAFT = costs(0.0097, 0.0047, range(1, 17))


def test_cost_model_interpolates_and_extrapolates() -> None:
    m = CostModel()
    assert m.estimate(4) == 0.0 and not m.known
    m.observe(1, 0.010)
    assert m.estimate(9) > 0.010  # prior slope until two sizes are known
    m.observe(5, 0.018)
    assert m.estimate(3) == pytest.approx(0.014)
    assert m.estimate(9) == pytest.approx(0.026)
    m.observe(5, 0.028)  # moving average
    assert 0.018 < m.estimate(5) < 0.028


def test_single_stream_drafts_long_runs_when_acceptance_is_high() -> None:
    k = choose_k([Candidate(0.98, 8, True)], 0, TARGET, DRAFT, range(1, 9))
    assert k >= 5
    k_ngram = choose_k([Candidate(0.9, 12, False)], 0, TARGET, None, range(1, 13))
    assert k_ngram >= 8


def test_low_acceptance_or_a_full_batch_turns_drafting_off() -> None:
    assert choose_k([Candidate(0.2, 8, True)], 0, TARGET, DRAFT, range(1, 9)) == 0
    eight = [Candidate(0.9, 8, True) for _ in range(8)]
    assert choose_k(eight, 0, TARGET, DRAFT, range(1, 9)) == 0
    # free n-gram drafts still pay in a batch when they are very likely right
    assert choose_k([Candidate(0.95, 8, False)] * 8, 0, TARGET, None, range(1, 9)) > 0
    # fixed draft length: all or nothing
    assert choose_k([Candidate(0.98, 8, True)], 0, TARGET, DRAFT, [4]) == 4
    assert choose_k(eight, 0, TARGET, DRAFT, [4]) == 0


def test_a_load_is_measured_plain_first_then_tried_with_a_short_draft() -> None:
    # nothing measured at this load: a plain step measures it
    assert choose_k([Candidate(0.5, 3, True)], 0, CostModel(), None, range(1, 4)) == 0
    assert choose_k([Candidate(0.5, 3, True)], 1, CostModel(), None, range(1, 4)) == 0
    # the plain step is known: a trial (optimistic prior slope), at most EXPLORE_K long
    plain_only = CostModel()
    plain_only.observe(1, 0.02)
    assert choose_k([Candidate(0.9, 16, True)], 0, plain_only, CostModel(), range(1, 17)) == EXPLORE_K
    # an unmeasured draft model costs nothing until its first call measures it
    assert choose_k([Candidate(0.5, 3, True)], 0, TARGET, CostModel(), range(1, 4)) > 0


def test_acceptance_estimate_follows_the_text() -> None:
    a = Acceptance(prior=0.5)
    for _ in range(20):
        a.update(4, 4)
    assert a.alpha > 0.9
    for _ in range(40):
        a.update(4, 0)
    assert a.alpha < 0.2
    for _ in range(200):
        a.idle()
    assert 0.4 < a.alpha < 0.6  # back to the prior: it will be probed again
    assert expected_tokens(0.5, 2) == pytest.approx(1.75) and expected_tokens(1.0, 3) == 4


def test_fit_rows_shortens_the_longest_drafts_first_and_keeps_short_ones() -> None:
    assert fit_rows([15] * 8, 55) == [7] * 7 + [6]  # even; ties: the later one loses first
    assert fit_rows([2, 10, 3], 9) == [2, 4, 3]  # only the long one is cut
    assert fit_rows([2, 10, 3], 20) == [2, 10, 3]  # within the budget: as wanted
    assert fit_rows([5, 5], 0) == fit_rows([5, 5], -3) == [0, 0]  # no rows left: no drafts
    assert fit_rows([1, 9, 9, 2], 8) == [1, 3, 2, 2]  # level 2, one spare row to the earlier 9
    many = fit_rows([32] * 10 + [3], 50)  # a wide step: each cut draft 4 or 5 tokens
    assert many == [5] * 7 + [4] * 3 + [3]
    assert fit_rows([32] * 63, 0) == [0] * 63
