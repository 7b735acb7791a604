"""The sampler table is the one declaration: every surface it names accepts and rejects alike.

For each row and each surface that lists it (OpenAI request, Kobold request, override preset):
a value at each bound is accepted, a value just outside is rejected, every alias is accepted
and lands in the field, and a parameter the surface does not list is not one of its fields.
The engine side: every `SamplingParams` field is set by exactly one row, from the fallbacks
and from sent values.
"""

from __future__ import annotations

from dataclasses import fields as dc_fields
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from kodkod.api.convert import sampling_params
from kodkod.api.kobold.schemas import KoboldGenerateRequest
from kodkod.api.openai.schemas import ChatCompletionRequest, CompletionRequest
from kodkod.api.presets import PresetError, normalise_overrides
from kodkod.api.sampler_table import INT32_MAX, SAMPLER_TABLE, SamplerParam, Surface
from kodkod.api.sampling import FALLBACKS, SamplerRequest
from kodkod.core.types import SamplingParams

REQUESTS: dict[Surface, list[tuple[type[BaseModel], dict[str, Any]]]] = {
    Surface.OPENAI: [
        (CompletionRequest, {"prompt": "x"}),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}]}),
    ],
    Surface.KOBOLD: [(KoboldGenerateRequest, {"prompt": "x"})],
}
SURFACES = (Surface.OPENAI, Surface.KOBOLD, Surface.PRESET)


def _step(row: SamplerParam) -> float:
    return 1 if row.annotation is int else 0.01


def bound_cases(row: SamplerParam) -> tuple[list[Any], list[Any]]:
    """(values inside the bounds, values just outside) of a row."""
    ok: list[Any] = []
    bad: list[Any] = []
    step = _step(row)
    if row.ge is not None:
        ok.append(row.ge)
        bad.append(row.ge - step)
    if row.gt is not None:
        ok.append(row.gt + step)
        bad.append(row.gt)
    if row.le is not None:
        ok.append(row.le)
        bad.append(row.le + step)
    if row.annotation is int and row.name != "seed":
        bad += [INT32_MAX + 1, -INT32_MAX - 1]
    if row.annotation is int:
        ok = [int(v) for v in ok]
        bad = [int(v) for v in bad]
    return ok, bad


def accepts(surface: Surface, name: str, value: Any) -> list[Any]:
    """The field's value after validation on every model of `surface`; raises if refused."""
    if surface is Surface.PRESET:
        rules = normalise_overrides({name: {"override": value}}, "test")
        return [rules[next(iter(rules))]["override"]] if rules else [None]
    out = []
    for model, base in REQUESTS[surface]:
        req = model.model_validate({**base, name: value})
        out.append(req)
    return out


def refuses(surface: Surface, name: str, value: Any) -> bool:
    try:
        accepts(surface, name, value)
    except (ValidationError, PresetError):
        return True
    return False


def field_of(surface: Surface, row: SamplerParam, got: Any) -> Any:
    return got if surface is Surface.PRESET else getattr(got, row.name)


BOUNDED = [r for r in SAMPLER_TABLE if (r.ge, r.gt, r.le) != (None, None, None) or r.annotation is int]
CASES = [(r, s) for r in BOUNDED for s in SURFACES if s in r.surfaces]


@pytest.mark.parametrize(("row", "surface"), CASES, ids=[f"{r.name}-{s.name}" for r, s in CASES])
def test_every_surface_keeps_the_same_bounds(row: SamplerParam, surface: Surface) -> None:
    ok, bad = bound_cases(row)
    for value in ok:
        for got in accepts(surface, row.name, value):
            expect = 0 if row.name == "top_k" and value == -1 else value  # -1 means off
            assert field_of(surface, row, got) == expect, (row.name, value)
    for value in bad:
        assert refuses(surface, row.name, value), (row.name, value)
    if row.annotation in (int, float):
        assert refuses(surface, row.name, "not a number")


ALIASED = [(r, s, a) for r in SAMPLER_TABLE for s in SURFACES if s in r.surfaces for a in r.aliases]


def example(row: SamplerParam) -> Any:
    """A valid value that differs from the fallback (so a dropped alias would show)."""
    ok, _ = bound_cases(row)
    candidates = [v for v in ok if v != row.fallback and v != -1]
    if candidates:
        return candidates[0]
    by_type: dict[Any, Any] = {int: 7, float: 0.5, bool: True, str: "a"}
    return by_type.get(row.annotation, [5] if "tokens" in row.name else ["a"])


@pytest.mark.parametrize(
    ("row", "surface", "alias"), ALIASED, ids=[f"{r.name}-{s.name}-{a}" for r, s, a in ALIASED]
)
def test_every_alias_is_accepted_on_every_surface(row: SamplerParam, surface: Surface, alias: str) -> None:
    value = example(row)
    for got in accepts(surface, alias, value):
        assert field_of(surface, row, got) == value


@pytest.mark.parametrize("row", SAMPLER_TABLE, ids=[r.name for r in SAMPLER_TABLE])
def test_surfaces_list_exactly_the_rows_that_name_them(row: SamplerParam) -> None:
    for surface in (Surface.OPENAI, Surface.KOBOLD):
        for model, _ in REQUESTS[surface]:
            assert (row.name in model.model_fields) is (surface in row.surfaces), (row, model)
    assert (row.name in FALLBACKS) is (Surface.PRESET in row.surfaces)
    if Surface.PRESET not in row.surfaces:
        assert normalise_overrides({row.name: {"override": example(row)}}, "test") == {}


def test_every_engine_sampling_field_comes_from_one_row() -> None:
    mapped = [r.engine for r in SAMPLER_TABLE if r.engine is not None]
    assert sorted(mapped) == sorted(f.name for f in dc_fields(SamplingParams))


def test_fallbacks_are_valid_and_reach_the_engine() -> None:
    for name, value in FALLBACKS.items():
        if value is not None:
            assert not refuses(Surface.PRESET, name, value), name
    params = sampling_params(dict(FALLBACKS), n_vocab=100)
    assert params.dry_sequence_breakers == FALLBACKS["dry_sequence_breakers"]
    assert params.seed is None and params.logit_bias == {} and params.temperature == 1.0


def test_sent_values_reach_the_engine_field_they_name() -> None:
    body = {
        "nsigma": 1.5,
        "rep_pen": 1.2,
        "typical_p": 0.5,
        "dynatemp_low": 0.2,
        "custom_token_bans": "3,4",
        "allowed_token_ids": [5],
        "logit_bias": {"9": -1},
        "sampler_seed": 42,
        "dry_penalty_last_n": 64,
        "mirostat": 2,
    }
    values = {**FALLBACKS, **SamplerRequest.model_validate(body).model_dump(exclude_unset=True)}
    params = sampling_params(values, n_vocab=100)
    assert (params.top_n_sigma, params.repetition_penalty, params.typical) == (1.5, 1.2, 0.5)
    assert params.min_temp == 0.2 and params.banned_token_ids == [3, 4]
    assert params.allowed_token_ids == [5] and params.logit_bias == {9: -1.0}
    assert (params.seed, params.dry_range, params.mirostat_mode) == (42, 64, 2)
