"""The sampling pipeline as an ordered list of small stages.

`build_stages(params)` returns only the stages whose parameter is non-neutral, in this order
(the one place the order is defined; it extends the reference's exl3 order — logit bias →
penalties → banned tokens → temperature → top-k → top-p → min-p → temperature-last → XTC
→ adaptive-P — with the exl2-era stages at exl2's positions):

     1. logit bias: `logit_bias`, `banned_tokens` (-inf), `allowed_tokens` (every other token
        -inf). Banned/allowed masks commute with the penalties (-inf stays -inf), so they share
        this one stage.
     2. penalties: repetition / frequency / presence over the last `penalty_range` tokens
        (prompt included; -1 = whole context). With -1 and a frequency or presence penalty the
        window is the generated tokens only (TabbyAPI's auto-scaled range; OpenAI's meaning).
        `repetition_decay` > 0 fades the penalties out linearly over that many older tokens.
     3. DRY (`dry_range` 0 = whole context)
     4. smoothing (quadratic sampling: `smoothing_factor`, `smoothing_curve`)
     5. temperature, unless `temperature_last` (dynamic temperature when max_temp > min_temp
        takes the temperature's place, first or last alike)
     6. top-n-sigma → top-k → top-p → top-a → min-p → tail-free → typical
     7. temperature, when `temperature_last`
     8. XTC
     9. the choice: greedy (temperature 0 or top_k 1: argmax after stages 1–3) | mirostat
        v1/v2 | adaptive-P | skewed draw (`skew` ≠ 0) | seeded random draw (Gumbel-max keyed
        by seed, position in the sequence and token id)

Every random stage gets its own seed derived from the request's seed, and the draws depend on
nothing but that seed and the logits, so one seed reproduces a text whatever else runs in the
batch (the draw also shrugs off the last-bit logit noise llama.cpp can show across layouts). A
backend maps each stage onto a native sampler where it has one and runs the rest as its own
code at the same position (`kernels.py` holds vectorised versions of the stages llama.cpp
lacks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kodkod.core.types import SamplingParams

NEG_INF = float("-inf")


@dataclass(frozen=True, slots=True)
class LogitBias:
    biases: tuple[tuple[int, float], ...]  # (token id, bias); -inf bans


@dataclass(frozen=True, slots=True)
class Penalties:
    last_n: int  # -1 = whole context
    repeat: float
    frequency: float
    presence: float
    decay: int = 0  # tokens beyond the window over which the penalties fade out
    output_only: bool = False  # the window is the generated tokens (prompt not counted)


@dataclass(frozen=True, slots=True)
class Dry:
    multiplier: float
    base: float
    allowed_length: int
    last_n: int  # -1 = whole context
    breakers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Smoothing:
    factor: float
    curve: float


@dataclass(frozen=True, slots=True)
class Temperature:
    value: float


@dataclass(frozen=True, slots=True)
class DynamicTemperature:
    value: float  # midpoint of [min_temp, max_temp]
    delta: float  # half the range
    exponent: float


@dataclass(frozen=True, slots=True)
class TopNSigma:
    n: float


@dataclass(frozen=True, slots=True)
class TopK:
    k: int


@dataclass(frozen=True, slots=True)
class TopP:
    p: float


@dataclass(frozen=True, slots=True)
class TopA:
    a: float


@dataclass(frozen=True, slots=True)
class MinP:
    p: float


@dataclass(frozen=True, slots=True)
class TailFree:
    z: float


@dataclass(frozen=True, slots=True)
class Typical:
    p: float


@dataclass(frozen=True, slots=True)
class Xtc:
    probability: float
    threshold: float
    seed: int


@dataclass(frozen=True, slots=True)
class Mirostat:
    version: int  # 1 or 2
    tau: float
    eta: float
    seed: int


@dataclass(frozen=True, slots=True)
class AdaptiveP:
    target: float
    decay: float
    seed: int


@dataclass(frozen=True, slots=True)
class Greedy:
    pass


@dataclass(frozen=True, slots=True)
class SkewDraw:
    skew: float
    seed: int


@dataclass(frozen=True, slots=True)
class Draw:
    seed: int


Stage = (
    LogitBias
    | Penalties
    | Dry
    | Smoothing
    | Temperature
    | DynamicTemperature
    | TopNSigma
    | TopK
    | TopP
    | TopA
    | MinP
    | TailFree
    | Typical
    | Xtc
    | Mirostat
    | AdaptiveP
    | Greedy
    | SkewDraw
    | Draw
)


def sub_seed(seed: int, k: int) -> int:
    """A 32-bit seed for the k-th random stage (never llama.cpp's 'random' 0xFFFFFFFF)."""
    x = (seed * 0x9E3779B1 + k * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    x ^= x >> 12
    return x if x != 0xFFFFFFFF else 0


def bias_stage(p: SamplingParams, n_vocab: int) -> LogitBias | None:
    """Stage 1: logit bias with bans and the allowed-token whitelist folded in."""
    if not p.logit_bias and not p.banned_token_ids and not p.allowed_token_ids:
        return None
    bias = np.zeros(n_vocab, dtype=np.float32)
    for tok, b in p.logit_bias.items():
        if 0 <= tok < n_vocab:
            bias[tok] += b
    banned = [t for t in p.banned_token_ids if 0 <= t < n_vocab]
    bias[banned] = NEG_INF
    if p.allowed_token_ids:
        allowed = np.zeros(n_vocab, dtype=bool)
        allowed[[t for t in p.allowed_token_ids if 0 <= t < n_vocab]] = True
        bias[~allowed] = NEG_INF
    ids = np.flatnonzero(bias)
    if ids.size == 0:
        return None
    return LogitBias(tuple(zip(ids.tolist(), bias[ids].tolist(), strict=True)))


def penalty_stage(p: SamplingParams) -> Penalties | None:
    """Stage 2, or None when neutral (all penalties off, or a window of 0 tokens)."""
    if p.repetition_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0:
        return None
    last_n = -1 if p.penalty_range < 0 else p.penalty_range
    decay = max(0, p.repetition_decay)
    output_only = last_n < 0 and (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0)
    if last_n < 0 and not output_only:
        decay = 0  # the window is the whole context: nothing lies beyond it to fade over
    if last_n == 0 and decay == 0:
        return None
    return Penalties(
        last_n, p.repetition_penalty, p.frequency_penalty, p.presence_penalty, decay, output_only
    )


def temperature_stage(p: SamplingParams) -> Temperature | DynamicTemperature | None:
    if p.max_temp > p.min_temp:
        mid = (p.max_temp + p.min_temp) / 2.0
        return DynamicTemperature(mid, (p.max_temp - p.min_temp) / 2.0, p.temp_exponent)
    if p.temperature != 1.0:
        return Temperature(p.temperature)
    return None


def truncation_stages(p: SamplingParams) -> list[Stage]:
    """Stage 6, in order."""
    out: list[Stage] = []
    if p.top_n_sigma > 0.0:
        out.append(TopNSigma(p.top_n_sigma))
    if p.top_k > 0:
        out.append(TopK(p.top_k))
    if p.top_p < 1.0:
        out.append(TopP(p.top_p))
    if p.top_a > 0.0:
        out.append(TopA(p.top_a))
    if p.min_p > 0.0:
        out.append(MinP(p.min_p))
    if 0.0 < p.tfs < 1.0:
        out.append(TailFree(p.tfs))
    if 0.0 < p.typical < 1.0:
        out.append(Typical(p.typical))
    return out


def selector_stage(p: SamplingParams, seed: int) -> Stage:
    """Stage 9 for a non-greedy request (validation has refused contradictory pairs)."""
    if p.mirostat_mode in (1, 2):
        return Mirostat(p.mirostat_mode, p.mirostat_tau, p.mirostat_eta, sub_seed(seed, 2))
    if p.adaptive_target < 1.0:
        return AdaptiveP(p.adaptive_target, p.adaptive_decay, sub_seed(seed, 3))
    if p.skew != 0.0:
        return SkewDraw(p.skew, sub_seed(seed, 4))
    return Draw(sub_seed(seed, 5))


def build_stages(p: SamplingParams, *, n_vocab: int, seed: int) -> list[Stage]:
    """The ordered, non-neutral stages for `p`; `seed` feeds every random stage."""
    stages: list[Stage] = []
    bias = bias_stage(p, n_vocab)
    if bias is not None:
        stages.append(bias)
    pen = penalty_stage(p)
    if pen is not None:
        stages.append(pen)
    if p.dry_multiplier > 0.0:
        dry_n = p.dry_range if p.dry_range > 0 else -1
        stages.append(
            Dry(p.dry_multiplier, p.dry_base, p.dry_allowed_length, dry_n, tuple(p.dry_sequence_breakers))
        )
    if p.is_greedy:
        stages.append(Greedy())  # later stages keep the top token, so they cannot matter
        return stages
    if p.smoothing_factor > 0.0:
        stages.append(Smoothing(p.smoothing_factor, p.smoothing_curve))
    temp = temperature_stage(p)
    if temp is not None and not p.temperature_last:
        stages.append(temp)
    stages.extend(truncation_stages(p))
    if temp is not None and p.temperature_last:
        stages.append(temp)
    if p.xtc_probability > 0.0 and p.xtc_threshold <= 0.5:
        # above 0.5 at most one token can pass the threshold, so XTC never removes anything
        stages.append(Xtc(p.xtc_probability, p.xtc_threshold, sub_seed(seed, 1)))
    stages.append(selector_stage(p, seed))
    return stages
