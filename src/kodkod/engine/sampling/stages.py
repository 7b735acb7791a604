"""The sampling pipeline as an ordered list of small stages.

`build_stages(params)` returns only the stages whose parameter is non-neutral, in this order
(the one place the order is defined):

    1. logit bias (incl. banned tokens as -inf, allowed-token whitelist)
    2. penalties: repetition / frequency / presence over `penalty_range` tokens
    3. DRY
    4. temperature (unless `temperature_last`; dynamic temperature when max_temp > min_temp)
    5. top-k → typical → top-p → min-p
    6. temperature (when `temperature_last`)
    7. XTC
    8. final choice: mirostat v2 | adaptive-P | greedy (temperature 0) | seeded random draw

A backend maps each stage onto its native sampler (llama.cpp has all of the above); stages a
backend lacks are executed by the engine on the logits row.
"""

from __future__ import annotations

from dataclasses import dataclass

from kodkod.engine.types import SamplingParams


@dataclass(frozen=True, slots=True)
class LogitBias:
    biases: tuple[tuple[int, float], ...]


@dataclass(frozen=True, slots=True)
class Penalties:
    last_n: int  # -1 = whole context
    repeat: float
    frequency: float
    presence: float


@dataclass(frozen=True, slots=True)
class Dry:
    multiplier: float
    base: float
    allowed_length: int
    last_n: int  # -1 = whole context
    breakers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Temperature:
    value: float


@dataclass(frozen=True, slots=True)
class DynamicTemperature:
    value: float
    delta: float
    exponent: float


@dataclass(frozen=True, slots=True)
class TopK:
    k: int


@dataclass(frozen=True, slots=True)
class Typical:
    p: float


@dataclass(frozen=True, slots=True)
class TopP:
    p: float


@dataclass(frozen=True, slots=True)
class MinP:
    p: float


@dataclass(frozen=True, slots=True)
class Xtc:
    probability: float
    threshold: float
    seed: int


@dataclass(frozen=True, slots=True)
class Mirostat2:
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
class Draw:
    seed: int


Stage = (
    LogitBias | Penalties | Dry | Temperature | DynamicTemperature | TopK | Typical | TopP | MinP
    | Xtc | Mirostat2 | AdaptiveP | Greedy | Draw
)

NEG_INF = float("-inf")


def _bias_stage(p: SamplingParams, n_vocab: int) -> LogitBias | None:
    biases: dict[int, float] = {}
    for tok, b in p.logit_bias.items():
        if 0 <= tok < n_vocab and b != 0.0:
            biases[tok] = biases.get(tok, 0.0) + b
    for tok in p.banned_token_ids:
        if 0 <= tok < n_vocab:
            biases[tok] = NEG_INF
    if p.allowed_token_ids:
        allowed = {t for t in p.allowed_token_ids if 0 <= t < n_vocab}
        for tok in range(n_vocab):
            if tok not in allowed:
                biases[tok] = NEG_INF
    return LogitBias(tuple(sorted(biases.items()))) if biases else None


def _temperature_stage(p: SamplingParams) -> Temperature | DynamicTemperature | None:
    if p.max_temp > p.min_temp:
        mid = (p.max_temp + p.min_temp) / 2.0
        return DynamicTemperature(mid, (p.max_temp - p.min_temp) / 2.0, p.temp_exponent)
    if p.temperature != 1.0:
        return Temperature(p.temperature)
    return None


def build_stages(p: SamplingParams, *, n_vocab: int, seed: int) -> list[Stage]:
    """The ordered, non-neutral stages for `p`; `seed` feeds every random stage."""
    stages: list[Stage] = []
    bias = _bias_stage(p, n_vocab)
    if bias is not None:
        stages.append(bias)
    if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
        stages.append(
            Penalties(p.penalty_range, p.repetition_penalty, p.frequency_penalty, p.presence_penalty)
        )
    if p.dry_multiplier > 0.0:
        stages.append(
            Dry(
                p.dry_multiplier,
                p.dry_base,
                p.dry_allowed_length,
                p.dry_range if p.dry_range > 0 else -1,
                tuple(p.dry_sequence_breakers),
            )
        )
    greedy = p.temperature <= 0.0
    if greedy:
        stages.append(Greedy())
        return stages
    temp = _temperature_stage(p)
    if temp is not None and not p.temperature_last:
        stages.append(temp)
    if p.mirostat_mode == 2:
        if temp is not None and p.temperature_last:
            stages.append(temp)
        stages.append(Mirostat2(p.mirostat_tau, p.mirostat_eta, seed))
        return stages
    if p.top_k > 0:
        stages.append(TopK(p.top_k))
    if 0.0 < p.typical < 1.0:
        stages.append(Typical(p.typical))
    if p.top_p < 1.0:
        stages.append(TopP(p.top_p))
    if p.min_p > 0.0:
        stages.append(MinP(p.min_p))
    if temp is not None and p.temperature_last:
        stages.append(temp)
    if p.xtc_probability > 0.0:
        stages.append(Xtc(p.xtc_probability, p.xtc_threshold, seed))
    if p.adaptive_target < 1.0:
        stages.append(AdaptiveP(p.adaptive_target, p.adaptive_decay, seed))
        return stages
    if p.top_k == 1:
        stages.append(Greedy())
    else:
        stages.append(Draw(seed))
    return stages
