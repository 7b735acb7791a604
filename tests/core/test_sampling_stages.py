"""The stage list: only non-neutral stages, in the one documented order, with distinct seeds."""

from __future__ import annotations

import math

from kodkod.core.sampling import stages as S
from kodkod.core.types import SamplingParams

V = 1000


def kinds(**kw: object) -> list[str]:
    return [type(s).__name__ for s in S.build_stages(SamplingParams(**kw), n_vocab=V, seed=7)]


def test_neutral_params_are_a_plain_draw() -> None:
    assert kinds() == ["Draw"]


def test_greedy_keeps_bias_penalties_and_dry_only() -> None:
    assert kinds(temperature=0.0) == ["Greedy"]
    got = kinds(
        temperature=0.0,
        logit_bias={5: 2.0},
        repetition_penalty=1.2,
        dry_multiplier=0.8,
        top_p=0.5,
        min_p=0.1,
        xtc_probability=0.5,
        mirostat_mode=2,
        skew=1.0,
    )
    assert got == ["LogitBias", "Penalties", "Dry", "Greedy"]
    assert kinds(top_k=1, top_p=0.3, temperature=0.7) == ["Greedy"]


def test_full_order_matches_the_docstring() -> None:
    everything = dict(
        logit_bias={1: 1.0},
        repetition_penalty=1.1,
        dry_multiplier=0.8,
        smoothing_factor=0.2,
        temperature=0.7,
        top_n_sigma=1.5,
        top_k=40,
        top_p=0.9,
        top_a=0.1,
        min_p=0.05,
        tfs=0.95,
        typical=0.9,
        xtc_probability=0.5,
        xtc_threshold=0.1,
    )
    assert kinds(**everything) == [
        "LogitBias",
        "Penalties",
        "Dry",
        "Smoothing",
        "Temperature",
        "TopNSigma",
        "TopK",
        "TopP",
        "TopA",
        "MinP",
        "TailFree",
        "Typical",
        "Xtc",
        "Draw",
    ]
    assert kinds(**everything, temperature_last=True) == [
        "LogitBias",
        "Penalties",
        "Dry",
        "Smoothing",
        "TopNSigma",
        "TopK",
        "TopP",
        "TopA",
        "MinP",
        "TailFree",
        "Typical",
        "Temperature",
        "Xtc",
        "Draw",
    ]


def test_dynamic_temperature_takes_the_temperature_slot() -> None:
    st = S.build_stages(
        SamplingParams(min_temp=0.5, max_temp=1.5, temp_exponent=2.0, min_p=0.1, temperature_last=True),
        n_vocab=V,
        seed=1,
    )
    assert [type(s).__name__ for s in st] == ["MinP", "DynamicTemperature", "Draw"]
    assert st[1] == S.DynamicTemperature(1.0, 0.5, 2.0)
    assert kinds(min_temp=1.0, max_temp=1.0, temperature=0.5) == ["Temperature", "Draw"]


def test_final_choice() -> None:
    assert kinds(mirostat_mode=2, top_k=50)[-1] == "Mirostat"
    assert "TopK" in kinds(mirostat_mode=2, top_k=50)  # truncation still runs before mirostat
    st = S.build_stages(SamplingParams(mirostat_mode=1, mirostat_tau=4.0), n_vocab=V, seed=1)
    assert isinstance(st[-1], S.Mirostat) and st[-1].version == 1 and st[-1].tau == 4.0
    assert kinds(adaptive_target=0.6)[-1] == "AdaptiveP"
    assert kinds(skew=0.5)[-1] == "SkewDraw"


def test_neutral_values_build_nothing() -> None:
    assert kinds(
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        typical=1.0,
        tfs=1.0,
        top_a=0.0,
        skew=0.0,
        smoothing_factor=0.0,
        smoothing_curve=2.0,
        xtc_probability=0.0,
        dry_multiplier=0.0,
        mirostat_mode=0,
        adaptive_target=1.0,
    ) == ["Draw"]
    assert kinds(tfs=0.0, typical=1.0) == ["Draw"]  # exl2: tfs 0 is off too
    assert kinds(xtc_probability=0.5, xtc_threshold=0.6) == ["Draw"]  # can never remove a token


def test_penalty_windows() -> None:
    def pen(**kw: object) -> S.Penalties | None:
        return S.penalty_stage(SamplingParams(**kw))

    assert pen() is None
    assert pen(repetition_penalty=1.2, penalty_range=0) is None  # a window of no tokens
    assert pen(repetition_penalty=1.2) == S.Penalties(-1, 1.2, 0.0, 0.0, 0, False)
    assert pen(repetition_penalty=1.2, penalty_range=64, repetition_decay=32) == S.Penalties(
        64, 1.2, 0.0, 0.0, 32, False
    )
    # whole context: nothing beyond it to decay over
    assert pen(repetition_penalty=1.2, repetition_decay=32).decay == 0
    # -1 with frequency/presence → generated tokens only (TabbyAPI's auto-scaled range)
    got = pen(frequency_penalty=0.5, repetition_decay=8)
    assert got is not None and got.output_only and got.decay == 8
    assert not pen(frequency_penalty=0.5, penalty_range=100).output_only
    assert pen(repetition_penalty=1.2, penalty_range=0, repetition_decay=16).decay == 16


def test_bias_stage_folds_bans_and_whitelist() -> None:
    st = S.bias_stage(SamplingParams(logit_bias={3: 2.5, 4000: 1.0}, banned_token_ids=[5, -1]), V)
    assert st == S.LogitBias(((3, 2.5), (5, -math.inf)))
    st = S.bias_stage(SamplingParams(allowed_token_ids=[10, 11], logit_bias={10: 1.0}), V)
    assert st is not None
    table = dict(st.biases)
    assert table[10] == 1.0 and 11 not in table  # allowed, unbiased → no entry
    assert len(table) == V - 1 and all(table[t] == -math.inf for t in (0, 12, V - 1))
    assert S.bias_stage(SamplingParams(logit_bias={2: 0.0}), V) is None


def test_random_stages_get_distinct_reproducible_seeds() -> None:
    p = SamplingParams(xtc_probability=0.5, seed=1)
    a = S.build_stages(p, n_vocab=V, seed=1234)
    b = S.build_stages(p, n_vocab=V, seed=1234)
    c = S.build_stages(p, n_vocab=V, seed=1235)
    assert a == b and a != c
    xtc, draw = a[-2], a[-1]
    assert isinstance(xtc, S.Xtc) and isinstance(draw, S.Draw) and xtc.seed != draw.seed
    seeds = {S.sub_seed(s, k) for s in range(200) for k in range(6)}
    assert len(seeds) == 1200 and 0xFFFFFFFF not in seeds
