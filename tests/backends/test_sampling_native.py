"""Stages run through the real llama.cpp sampler chain (no model) on hand-built logits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kodkod.backends.llamacpp.sampler import NativeSampler
from kodkod.core.sampling import stages as S
from kodkod.core.types import SamplingParams


def chain(stages: list[S.Stage], n_vocab: int, history: list[int] | None = None) -> NativeSampler:
    return NativeSampler(None, None, n_vocab, 4096, stages, None, history or [])


def logits_of(probs: list[float]) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def survivors(stages: list[S.Stage], row: np.ndarray, history: list[int] | None = None) -> set[int]:
    s = chain(stages, row.shape[0], history)
    try:
        c = s.apply_row(row)
        return set(c.ids[np.isfinite(c.logits)].tolist())
    finally:
        s.close()


def test_min_p_keeps_exactly_the_tokens_at_least_p_times_max() -> None:
    rng = np.random.default_rng(3)
    row = (rng.standard_normal(5000) * 2).astype(np.float32)
    probs = np.exp(row - row.max())
    for p in (0.05, 0.2, 0.5):
        want = set(np.flatnonzero(probs >= p * probs.max() * (1 + 1e-5)).tolist())
        edge = set(np.flatnonzero(np.abs(probs - p * probs.max()) <= 1e-5 * probs.max()).tolist())
        got = survivors([S.MinP(p)], row)
        assert want <= got <= want | edge


def test_top_k_and_top_p() -> None:
    row = logits_of([0.05, 0.4, 0.1, 0.3, 0.15])
    assert survivors([S.TopK(2)], row) == {1, 3}
    assert survivors([S.TopP(0.75)], row) == {1, 3, 4}  # 0.4 + 0.3 < 0.75 ≤ + 0.15


def test_xtc_removes_the_top_choices_above_the_threshold() -> None:
    row = logits_of([0.4, 0.3, 0.2, 0.06, 0.04])
    # three tokens ≥ 0.15: all but the least likely of them go
    assert survivors([S.Xtc(1.0, 0.15, 1)], row) == {2, 3, 4}
    # only one token ≥ 0.35: nothing to exclude
    assert survivors([S.Xtc(1.0, 0.35, 1)], row) == {0, 1, 2, 3, 4}


def test_xtc_fires_with_its_probability() -> None:
    row = logits_of([0.4, 0.3, 0.2, 0.06, 0.04])
    s = chain([S.Xtc(0.3, 0.15, 99)], 5)
    fired = sum(s.apply_row(row).size == 3 for _ in range(3000))
    s.close()
    # binomial(3000, 0.3): mean 900, sd ≈ 25
    assert 780 < fired < 1020


def test_dry_penalises_the_repeat_continuation() -> None:
    row = np.zeros(16, dtype=np.float32)
    s = chain([S.Dry(1.0, 2.0, 2, -1, ())], 16, [1, 2, 3, 4, 5, 6, 1, 2, 3, 4])
    c = s.apply_row(row)
    got = dict(zip(c.ids.tolist(), c.logits.tolist(), strict=True))
    s.close()
    # "1 2 3 4" repeats (4 tokens, 2 allowed): the token that followed it, 5, loses 1·2^(4−2)
    assert got[5] == pytest.approx(-4.0)
    assert all(v == 0.0 for t, v in got.items() if t != 5)


def test_dry_range_forgets_older_repeats() -> None:
    row = np.zeros(16, dtype=np.float32)
    hist = [1, 2, 3, 4, 5, 9, 9, 9, 9, 9, 9, 1, 2, 3, 4]
    assert survivors([S.Dry(1.0, 2.0, 2, -1, ()), S.MinP(0.5)], row, hist) == set(range(16)) - {5}
    s = chain([S.Dry(1.0, 2.0, 2, 8, ())], 16, hist)
    assert s.apply_row(row).logits.min() == 0.0
    s.close()


def test_penalties_native() -> None:
    row = np.array([1.0, 2.0, -1.0, 3.0, 0.5], dtype=np.float32)
    s = chain([S.Penalties(-1, 2.0, 0.25, 0.5)], 5, [1, 1, 2, 4])
    c = s.apply_row(row)
    s.close()
    got = dict(zip(c.ids.tolist(), c.logits.tolist(), strict=True))
    assert got[0] == 1.0 and got[3] == 3.0
    assert got[1] == pytest.approx(2.0 / 2.0 - 2 * 0.25 - 0.5)
    assert got[2] == pytest.approx(-1.0 * 2.0 - 0.25 - 0.5)
    assert got[4] == pytest.approx(0.5 / 2.0 - 0.25 - 0.5)


def test_penalty_window_and_output_only() -> None:
    row = np.ones(5, dtype=np.float32)
    s = chain([S.Penalties(2, 2.0, 0.0, 0.0)], 5, [1, 2, 3])  # only the last two count
    assert s.apply_row(row).logits.tolist() == [1.0, 1.0, 0.5, 0.5, 1.0]
    s.close()
    s = chain([S.Penalties(-1, 1.0, 0.0, 1.0, 0, True)], 5, [1, 2, 3])  # prompt not counted
    assert s.apply_row(row).logits.tolist() == [1.0] * 5
    s.accept(4)
    assert s.apply_row(row).logits.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    s.close()


def test_decaying_penalties_run_in_the_chain() -> None:
    row = np.full(6, 2.0, dtype=np.float32)
    s = chain([S.Penalties(1, 2.0, 0.0, 0.0, 2)], 6, [5, 4, 3, 2])  # most recent: 2, 3, 4
    got = s.apply_row(row).logits.tolist()
    s.close()
    assert got == pytest.approx([2.0, 2.0, 1.0, 1.0, 2.0 / 1.5, 2.0])


def test_logit_bias_plus_100_wins_and_whitelist_restricts() -> None:
    rng = np.random.default_rng(0)
    row = rng.standard_normal(300).astype(np.float32)
    s = chain([S.LogitBias(((17, 100.0),)), S.Draw(5)], 300)
    assert {s.sample_row(row) for _ in range(50)} == {17}
    s.close()
    st = S.build_stages(SamplingParams(allowed_token_ids=[3, 7, 200]), n_vocab=300, seed=1)
    s = chain(st, 300)
    assert {s.sample_row(row) for _ in range(200)} <= {3, 7, 200}
    s.close()


def test_custom_stage_runs_at_its_position() -> None:
    row = logits_of([0.3, 0.25, 0.2, 0.15, 0.1])
    # top-a after top-k sees the renormalised top 3 (p_max 0.4 → threshold 0.32) ...
    assert survivors([S.TopK(3), S.TopA(2.0)], row) == {0, 1}
    # ... and before it the full distribution (p_max 0.3 → threshold 0.18)
    assert survivors([S.TopA(2.0), S.TopK(3)], row) == {0, 1, 2}
    assert survivors([S.TopK(4), S.TailFree(0.01)], row) <= {0, 1, 2, 3}


def test_temperature_last_changes_what_min_p_sees() -> None:
    row = logits_of([0.5, 0.3, 0.2])
    # temperature 3 first flattens the distribution, so min-p 0.6 keeps more
    first = survivors([S.Temperature(3.0), S.MinP(0.6)], row)
    last = survivors([S.MinP(0.6), S.Temperature(3.0)], row)
    assert first == {0, 1, 2} and last == {0, 1}


def test_mirostat_converges_toward_tau() -> None:
    n = 1000
    p = 1.0 / np.arange(1, n + 1) ** 1.1
    row = np.log(p / p.sum()).astype(np.float32)
    for version in (1, 2):
        s = chain([S.Mirostat(version, 3.0, 0.1, 42)], n)
        surprise = []
        for _ in range(500):
            c = s.apply_row(row)  # mirostat updates mu when it chooses
            surprise.append(-math.log2(float(c.data["p"][c.selected])))
            s.accept(int(c.data["id"][c.selected]))
        s.close()
        assert abs(float(np.mean(surprise[-300:])) - 3.0) < 0.3
        assert np.mean(surprise[-300:]) < 5.0 < -np.sum(p / p.sum() * np.log2(p / p.sum()))


def test_adaptive_p_prefers_tokens_near_the_target() -> None:
    row = logits_of([0.7, 0.2, 0.05, 0.05])
    s = chain([S.AdaptiveP(0.2, 0.5, 11)], 4)
    picks = [s.sample_row(row) for _ in range(400)]
    s.close()
    assert picks.count(1) > picks.count(0)


def test_skew_draw_in_the_chain() -> None:
    row = logits_of([0.6, 0.3, 0.1])
    hi = chain([S.SkewDraw(-3.0, 1)], 3)
    lo = chain([S.SkewDraw(3.0, 1)], 3)
    top_hi = sum(hi.sample_row(row) == 0 for _ in range(300))
    top_lo = sum(lo.sample_row(row) == 0 for _ in range(300))
    hi.close()
    lo.close()
    assert top_hi > 250 and top_lo < 100


def test_same_seed_same_tokens_whatever_else_is_sampled() -> None:
    rng = np.random.default_rng(1)
    rows = [rng.standard_normal(500).astype(np.float32) for _ in range(40)]
    params = SamplingParams(
        temperature=0.9, top_k=50, min_p=0.02, xtc_probability=0.5, repetition_penalty=1.1, dry_multiplier=0.5
    )

    def run(seed: int, neighbours: int) -> list[int]:
        mine = chain(S.build_stages(params, n_vocab=500, seed=seed), 500, [1, 2, 3])
        others = [
            chain(S.build_stages(params, n_vocab=500, seed=seed), 500, [1, 2, 3]) for _ in range(neighbours)
        ]
        out = []
        for row in rows:
            for o in others:  # interleaved neighbours sharing the seed and the rows
                o.sample_row(row[::-1].copy())
            out.append(mine.sample_row(row))
        for smpl in [mine, *others]:
            smpl.close()
        return out

    assert run(77, 0) == run(77, 3)
    assert run(77, 0) != run(78, 0)


def test_greedy_only_chain_is_a_plain_argmax() -> None:
    s = chain([S.Greedy()], 10)
    row = np.arange(10, dtype=np.float32)[::-1].copy()
    assert s.sample_row(row) == 0
    s.close()


def test_a_rebuilt_sampler_continues_the_same_draws() -> None:
    """The engine rebuilds a sampler after a rollback with prompt + kept output as history."""
    rng = np.random.default_rng(5)
    rows = [rng.standard_normal(300).astype(np.float32) for _ in range(10)]
    stages = S.build_stages(SamplingParams(temperature=1.2, min_p=0.01), n_vocab=300, seed=9)
    whole = chain(stages, 300, [1, 2, 3])
    tokens = [whole.sample_row(r) for r in rows]
    whole.close()
    rebuilt = chain(stages, 300, [1, 2, 3, *tokens[:5]])
    assert [rebuilt.sample_row(r) for r in rows[5:]] == tokens[5:]
    rebuilt.close()
