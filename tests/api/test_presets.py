"""Sampler override presets (§9.4): loading, validation and how rules meet a request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kodkod.api.convert import resolve_fields
from kodkod.api.presets import PresetError, apply_preset, load_preset, normalise_overrides
from kodkod.api.sampling import FALLBACKS, SamplerRequest, apply_override, sampler_problem
from kodkod.api.state import OverrideState

REPO = Path(__file__).resolve().parents[2]


def resolved(body: dict[str, Any], preset: dict[str, Any]) -> dict[str, Any]:
    state = OverrideState(overrides=normalise_overrides(preset, "test"))
    return resolve_fields(SamplerRequest.model_validate(body), state)


def test_non_forced_fills_only_a_missing_field_under_any_alias() -> None:
    preset = {"repetition_penalty": {"override": 1.3}, "temperature": {"override": 0.5}}
    got = resolved({}, preset)
    assert got["repetition_penalty"] == 1.3 and got["temperature"] == 0.5
    got = resolved({"rep_pen": 1.05, "temperature": 0.9}, preset)
    assert got["repetition_penalty"] == 1.05 and got["temperature"] == 0.9


@pytest.mark.parametrize(
    ("field", "forced", "sent"),
    [
        ("top_k", 0, 40),
        ("temperature", 0.0, 0.7),
        ("temperature_last", False, True),
        ("banned_tokens", [], [1, 2]),
        ("stop", [], ["###"]),
        ("min_p", 0.0, 0.1),
    ],
)
def test_a_forced_falsy_value_is_still_forced(field: str, forced: Any, sent: Any) -> None:
    got = resolved({field: sent}, {field: {"override": forced, "force": True}})
    assert got[field] == forced


def test_forced_replaces_a_value_sent_under_an_alias() -> None:
    got = resolved({"typical_p": 0.5}, {"typical": {"override": 0.9, "force": True}})
    assert got["typical"] == 0.9


def test_additive_lists_prepend() -> None:
    preset = {
        "stop": {"override": ["###"], "additive": True},
        "banned_tokens": {"override": [7], "additive": True},
    }
    got = resolved({"stop": "\nUser:", "banned_tokens": "1,2"}, preset)
    assert got["stop"] == ["###", "\nUser:"]
    assert got["banned_tokens"] == [7, 1, 2]
    assert resolved({}, preset)["stop"] == ["###"]


def test_additive_logit_bias_merges_request_wins() -> None:
    preset = {"logit_bias": {"override": {"5": -10, "6": 2}, "additive": True}}
    got = resolved({"logit_bias": {"6": 1.5, "9": 3}}, preset)
    assert got["logit_bias"] == {5: -10.0, 6: 1.5, 9: 3.0}


def test_apply_override_direct() -> None:
    assert apply_override("top_p", None, {"override": 0.9}) == 0.9
    assert apply_override("top_p", 0.5, {"override": 0.9}) == 0.5
    assert apply_override("top_p", 0.5, {"override": 0.9, "force": True}) == 0.9
    assert apply_override("stop", ["a"], {"override": ["b"], "force": True, "additive": True}) == ["b"]


def test_loading_validates_and_normalises() -> None:
    got = normalise_overrides(
        {
            "top_k": {"override": -1, "force": True},
            "dry_sequence_breakers": {"override": '"\\n", ":"'},
            "rep_pen": {"override": 1.1},  # an alias key
            "min_p": {"override": None},  # null → dropped
            "not_a_sampler": {"override": 1},  # unknown → skipped
            "top_p": 0.8,  # bare value → non-forced override
        },
        "t",
    )
    assert got == {
        "top_k": {"override": 0, "force": True, "additive": False},
        "dry_sequence_breakers": {"override": ["\n", ":"], "force": False, "additive": False},
        "repetition_penalty": {"override": 1.1, "force": False, "additive": False},
        "top_p": {"override": 0.8, "force": False, "additive": False},
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": {"override": "hot"}},
        {"top_p": {"override": 1.5}},
        {"temperature": {"override": 0.5, "force": "yes"}},
        ["temperature"],
    ],
)
def test_loading_refuses_bad_values(bad: Any) -> None:
    with pytest.raises(PresetError):
        normalise_overrides(bad, "bad.yml")


def test_shipped_presets_load(tmp_path: Path) -> None:
    safe = load_preset(REPO / "sampler_overrides", "safe_defaults")
    assert safe == {
        "temperature": {"override": 0.8, "force": False, "additive": False},
        "top_p": {"override": 0.9, "force": False, "additive": False},
    }
    sample = load_preset(REPO / "sampler_overrides", "sample_preset")
    assert "max_tokens" not in sample  # upstream's max_tokens: 150 trap, deliberately absent
    assert not any(rule["force"] for rule in sample.values())
    # selecting the sample preset changes nothing: every value is the fallback
    got = resolve_fields(SamplerRequest.model_validate({}), OverrideState(overrides=sample))
    same_meaning = {"seed": (None, -1), "logit_bias": (None, {})}  # random seed / no bias
    for name in sample:
        if name in same_meaning:
            assert got[name] in same_meaning[name]
        else:
            assert got[name] == FALLBACKS[name], name


def test_apply_preset_and_missing_names(tmp_path: Path) -> None:
    (tmp_path / "mine.yml").write_text("top_k:\n  override: 0\n  force: true\n", encoding="utf-8")
    state = OverrideState()
    apply_preset(state, tmp_path, "mine")
    assert state.selected_preset == "mine"
    assert state.overrides["top_k"] == {"override": 0, "force": True, "additive": False}
    for name in ("missing", "../mine", ""):
        with pytest.raises(PresetError):
            apply_preset(state, tmp_path, name)
    (tmp_path / "broken.yml").write_text("top_k: [unclosed\n", encoding="utf-8")
    with pytest.raises(PresetError):
        load_preset(tmp_path, "broken")


def _values(**kw: Any) -> dict[str, Any]:
    return {**FALLBACKS, **kw}


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        (dict(mirostat_mode=2, adaptive_target=0.5), "adaptive_target"),
        (dict(mirostat_mode=1, skew=0.5), "skew"),
        (dict(adaptive_target=0.5, skew=-1.0), "skew"),
        (dict(dry_multiplier=0.8, dry_base=0.5), "dry_base"),
        (dict(adaptive_target=0.5, adaptive_decay=1.0), "adaptive_decay"),
    ],
)
def test_contradictions_name_the_field(kw: dict[str, Any], field: str) -> None:
    problem = sampler_problem(_values(**kw))
    assert problem is not None and problem[0] == field


def test_client_default_bodies_have_no_contradictions() -> None:
    assert sampler_problem(_values()) is None
    # SillyTavern's TabbyAPI body (mirostat off, skew 0, DRY off) and greedy with leftovers
    assert (
        sampler_problem(
            _values(
                temperature=0.7,
                top_p=0.5,
                top_k=40,
                repetition_penalty=1.2,
                dry_base=1.75,
                dry_multiplier=0,
                xtc_probability=0,
            )
        )
        is None
    )
    assert sampler_problem(_values(temperature=0, mirostat_mode=2, skew=1.0)) is None
