"""The numpy kernels for the stages llama.cpp lacks, on hand-built logits."""

from __future__ import annotations

import numpy as np
import pytest

from kodkod.core.sampling import kernels as K


def cands(probs: list[float]) -> K.Candidates:
    return K.Candidates.from_logits(np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32))


def live(c: K.Candidates) -> list[int]:
    return sorted(c.ids.tolist())


def test_keep_compacts_in_order_and_never_empties() -> None:
    c = cands([0.1, 0.2, 0.3, 0.4])
    c.keep(np.array([False, True, False, True]))
    assert c.size == 2 and c.ids.tolist() == [1, 3]
    c.keep(np.zeros(2, dtype=bool))
    assert c.ids.tolist() == [3]  # the best survives


def test_smoothing_quadratic_and_cubic() -> None:
    c = K.Candidates.from_logits(np.array([5.0, 4.0, 2.0, -np.inf], dtype=np.float32))
    K.smooth(c, 1.0, 1.0)  # max − f·d²
    assert c.logits.tolist() == [5.0, 4.0, -4.0, -np.inf]
    c = K.Candidates.from_logits(np.array([5.0, 4.0, 2.0], dtype=np.float32))
    K.smooth(c, 0.5, 3.0)  # max + f·d³
    assert c.logits.tolist() == pytest.approx([5.0, 4.5, -8.5])


def test_smoothing_factor_sharpens_the_top() -> None:
    c = cands([0.5, 0.3, 0.2])
    before = K.probs(c.logits)
    K.smooth(c, 2.0, 1.0)
    after = K.probs(c.logits)
    assert after[0] > before[0] and after[2] < before[2]


def test_top_a_keeps_probabilities_above_a_times_pmax_squared() -> None:
    c = cands([0.5, 0.3, 0.15, 0.05])  # threshold 0.5·0.25 = 0.125
    K.top_a(c, 0.5)
    assert live(c) == [0, 1, 2]
    c = cands([0.5, 0.3, 0.15, 0.05])
    K.top_a(c, 1.5)  # 0.375
    assert live(c) == [0]


def test_tail_free_cuts_where_the_curve_flattens() -> None:
    probs = [0.4, 0.3, 0.15, 0.08, 0.04, 0.02, 0.01]
    sp = np.array(probs)
    d2 = np.abs(sp[:-2] - 2 * sp[1:-1] + sp[2:])
    share = np.cumsum(d2 / d2.sum())
    for z in (0.3, 0.6, 0.9, 0.99):
        c = cands(probs)
        K.tail_free(c, z)
        assert c.size == int(np.sum(share <= z)) + 1
        assert live(c) == list(range(c.size))  # always the head of the distribution


def test_tail_free_leaves_tiny_sets_alone() -> None:
    c = cands([0.6, 0.4])
    K.tail_free(c, 0.1)
    assert c.size == 2


def test_skew_zero_is_an_ordinary_draw() -> None:
    probs = [0.2, 0.5, 0.3]  # descending: token 1 (0.5), 2 (0.3), 0 (0.2)
    for u, want in ((0.1, 1), (0.45, 1), (0.6, 2), (0.79, 2), (0.85, 0)):
        c = cands(probs)
        K.skew_choice(c, 0.0, u)
        assert c.data["id"][c.selected] == want


def test_skew_bends_the_draw() -> None:
    probs = [0.5, 0.3, 0.2]
    c = cands(probs)
    K.skew_choice(c, float(np.log(2.0)), 0.6)  # 0.6^0.5 = 0.775 → second token
    assert c.data["id"][c.selected] == 1
    c = cands(probs)
    K.skew_choice(c, float(np.log(2.0)), 0.7)  # 0.837 → third
    assert c.data["id"][c.selected] == 2
    rng = np.random.default_rng(0)

    def top_share(skew: float) -> float:
        hits = 0
        for _ in range(2000):
            c = cands(probs)
            K.skew_choice(c, skew, float(rng.random()))
            hits += int(c.data["id"][c.selected] == 0)
        return hits / 2000

    assert top_share(-2.0) > 0.9 > 0.6 > top_share(0.0) > 0.4 > 0.15 > top_share(2.0)


def test_decayed_penalties_match_exl2() -> None:
    """sustain 1, decay 2: j=0,1 full, j=2 half strength; once per token, most recent wins."""
    V = 8
    logits = np.array([2.0, 2.0, -2.0, 2.0, 2.0, 1.0, 1.0, 1.0], dtype=np.float32)
    c = K.Candidates.from_logits(logits.copy())
    recent = np.array([1, 2, 3, 1, 4, 5], dtype=np.int64)  # most recent first
    K.decayed_penalties(c, recent, sustain=1, decay=2, repeat=2.0, frequency=0.1, presence=0.5)
    out = c.logits
    assert out[0] == 2.0 and out[4] == 2.0 and out[5] == 1.0  # unseen, or beyond the window
    # token 1: j=0 (full): 2/2 − 0.5 − 0.1 − j=3 is outside the window (sustain+decay = 3)
    assert out[1] == pytest.approx(2.0 / 2.0 - 0.5 - 0.1)
    # token 2: j=1 (full), negative logit → multiplied
    assert out[2] == pytest.approx(-2.0 * 2.0 - 0.5 - 0.1)
    # token 3: j=2 → m=1, strength 1/2: rep 1.5, presence 0.25, frequency 0.05
    assert out[3] == pytest.approx(2.0 / 1.5 - 0.25 - 0.05)
    assert c.size == V


def test_decayed_penalties_on_a_compacted_array() -> None:
    c = K.Candidates.from_logits(np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32))
    c.keep(np.array([False, True, False, True]))  # ids [1, 3]
    K.decayed_penalties(
        c, np.array([3, 0], dtype=np.int64), sustain=5, decay=0, repeat=2.0, frequency=0.0, presence=0.0
    )
    assert c.ids.tolist() == [1, 3] and c.logits.tolist() == [2.0, 2.0]


def test_gumbel_draw_samples_the_softmax() -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    counts = np.zeros(4)
    for step in range(8000):
        c = cands(probs.tolist())
        K.gumbel_choice(c, 7, step)
        counts[c.ids[c.selected]] += 1
    # each share within ~4 standard deviations of its probability
    assert np.all(np.abs(counts / 8000 - probs) < 4 * np.sqrt(probs * (1 - probs) / 8000))


def test_gumbel_noise_is_keyed_by_seed_step_and_token() -> None:
    ids = np.arange(100, dtype=np.int32)
    a = K.gumbel_noise(ids, 1, 5)
    assert np.array_equal(a, K.gumbel_noise(ids, 1, 5))
    assert not np.array_equal(a, K.gumbel_noise(ids, 1, 6))
    assert not np.array_equal(a, K.gumbel_noise(ids, 2, 5))
    assert np.array_equal(a[[3, 50]], K.gumbel_noise(np.array([3, 50]), 1, 5))
    # so dropping a losing candidate never changes the winner
    rng = np.random.default_rng(2)
    for step in range(200):
        row = rng.standard_normal(50).astype(np.float32)
        c = K.Candidates.from_logits(row)
        K.gumbel_choice(c, 3, step)
        win = int(c.ids[c.selected])
        c2 = K.Candidates.from_logits(row)
        c2.keep(np.arange(50) != (win + 1) % 50)
        K.gumbel_choice(c2, 3, step)
        assert int(c2.ids[c2.selected]) == win


def test_gumbel_draw_shrugs_off_kernel_noise() -> None:
    """Logits 1e-3 apart (llama.cpp across batch shapes) keep a seeded flat draw in place."""
    rng = np.random.default_rng(4)
    same = 0
    for step in range(300):
        row = (rng.standard_normal(49152) * 0.5).astype(np.float32)  # a flat distribution
        noisy = row + (rng.standard_normal(row.shape[0]) * 1e-3).astype(np.float32)
        a, b = K.Candidates.from_logits(row), K.Candidates.from_logits(noisy)
        K.gumbel_choice(a, 9, step)
        K.gumbel_choice(b, 9, step)
        same += int(a.ids[a.selected] == b.ids[b.selected])
    assert same >= 290
