"""The load-parameter table is the one declaration: every surface accepts and refuses alike.

For each row of `settings.load_table.LOAD_TABLE` and each surface that lists it — the config
section (config.yml values), its CLI flag, the `/v1/model/load` body (or its `draft_model`
object) and a `tabby_config.yml` block — the same values are accepted, to the same value, and
the same values are refused. A row a surface does not list is not one of its fields (a load
request naming it gets a note, not a refusal). The engine side: the PARAM rows are exactly the
fields of `ModelLoadParams` / `DraftParams`.
"""

from __future__ import annotations

import typing
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kodkod.api.admin.load_request import DraftLoadRequest, ModelLoadRequest, request_notes
from kodkod.models.loading import check_block
from kodkod.models.params import DraftParams, LoadParamError, ModelLoadParams
from kodkod.settings import ConfigError, Settings, load_settings
from kodkod.settings.load_param import MAX_DEVICES, DeviceAmounts, LoadParam, RopeAlpha, Section, Surface, Use
from kodkod.settings.load_table import LOAD_TABLE, names, rows
from kodkod.settings.schema import FieldKind, cli_flag_table, field_kind

SPECIAL: dict[str, tuple[list[Any], list[Any]]] = {
    "cache_mode": (["Q8", "fp16", "8,4", "q4_0", "Q8_0,F16"], ["Q3", "9,9", "a\x00b"]),
    "draft_cache_mode": (["Q4", "6,6"], ["Q5", "banana"]),
    "backend": (["llamacpp", "auto", "exllamav3", "ExLlamaV2"], ["vllm", "a\x00b"]),
    "rpc_servers": (
        [[], ["127.0.0.1:50052"], ["10.0.0.2:1", "worker.lan:50052"]],
        [["nohost"], ["h:0"], ["h:1", "h:1"], [f"h:{p}" for p in range(1, 18)]],
    ),
}


def examples(row: LoadParam) -> tuple[list[Any], list[Any]]:
    """(values every surface accepts, values every surface refuses) for a row."""
    if row.name in SPECIAL:
        return SPECIAL[row.name]
    kind = row.annotation
    if kind in (int, float):
        step = 1 if kind is int else 0.01
        ok: list[Any] = []
        bad: list[Any] = ["many", True]
        if row.multiple_of is not None:
            ok += [row.multiple_of, 4 * row.multiple_of]
            bad += [0, row.multiple_of + 1, -row.multiple_of]
        if row.ge is not None:
            ok.append(row.ge)
            bad.append(row.ge - step)
        if row.gt is not None and row.multiple_of is None:
            ok.append(row.gt + step)
            bad.append(row.gt)
        if row.le is not None:
            ok.append(row.le)
            bad.append(row.le + step)
        if not ok:
            ok = [5, -1] if kind is int else [0.5]
        if kind is int:
            ok = [int(v) for v in ok]
            bad = [v if isinstance(v, str | bool) else int(v) for v in bad] + [1.5]
        return ok, bad
    if kind is bool:
        return [True, False], ["maybe", 2]
    if kind is str:
        return ["x", "<tag>"], ["a\x00b"]
    if kind is DeviceAmounts:
        return [[], [20.0, 25.0], [0.0, 1.5]], [[-1.0], ["x"], [1.0] * (MAX_DEVICES + 1), [True]]
    if kind is RopeAlpha:
        return ["auto", 2.5, "AUTO", "1.5"], ["lots", 0, -1.0, True]
    if typing.get_origin(kind) is typing.Literal:
        choices = list(typing.get_args(kind))
        return [*choices, str(choices[0]).upper()], ["other"]
    if typing.get_origin(kind) is dict:
        return [{"enable_thinking": False}], ["x", [1]]
    raise AssertionError(f"no examples for {row.name}")


def expected(row: LoadParam, value: Any) -> Any:
    """The value a surface holds after accepting `value`."""
    return Settings.model_validate({row.section.value: {row.name: value}}).model_dump()[row.section.value][
        row.name
    ]


# ---- one function per surface: the accepted value, or an exception -----------------------


def via_config(row: LoadParam, value: Any) -> Any:
    settings = Settings.model_validate({row.section.value: {row.name: value}})
    return getattr(getattr(settings, row.section.value), row.name)


def cli_text(value: Any) -> str | list[str]:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return [cli_text(v) for v in value]  # type: ignore[misc]
    return str(value)


def via_cli(row: LoadParam, value: Any) -> Any:
    settings = load_settings(None, {row.name: cli_text(value)}, {}).settings
    return getattr(getattr(settings, row.section.value), row.name)


def via_request(row: LoadParam, value: Any) -> Any:
    if row.section is Section.MODEL:
        return getattr(ModelLoadRequest.model_validate({"model_name": "m", row.name: value}), row.name)
    return getattr(DraftLoadRequest.model_validate({"draft_model_name": "d", row.name: value}), row.name)


def via_tabby(row: LoadParam, value: Any) -> Any:
    values, notes = check_block({row.name: value}, row.section, "t")
    assert notes == []
    return values[row.name]


REFUSALS = (ValidationError, ConfigError, LoadParamError)
SURFACES = {
    "config": (Surface.CONFIG, via_config),
    "cli": (Surface.CONFIG, via_cli),
    "request": (Surface.REQUEST, via_request),
    "tabby_config": (Surface.TABBY, via_tabby),
}


def surface_applies(name: str, row: LoadParam, value: Any) -> bool:
    surface, _ = SURFACES[name]
    if surface not in row.surfaces:
        return False
    if name == "cli":  # mappings get no flag; an empty list cannot be typed as a flag
        return field_kind(row.config_field()[0]) is not FieldKind.STRUCTURED and value != []
    return True


CASES = [(r, s) for r in LOAD_TABLE for s in SURFACES]


@pytest.mark.parametrize(("row", "surface"), CASES, ids=[f"{r.name}-{s}" for r, s in CASES])
def test_every_surface_accepts_and_refuses_the_same_values(
    row: LoadParam, surface: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./config.yml
    _, accept = SURFACES[surface]
    ok, bad = examples(row)
    for value in ok:
        if surface_applies(surface, row, value):
            assert accept(row, value) == expected(row, value), (row.name, value)
    for value in bad:
        if surface_applies(surface, row, value):
            with pytest.raises(REFUSALS):
                accept(row, value)


def test_config_refusals_name_the_key_and_tabby_refusals_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--cache-size: expected a positive multiple of 256"):
        load_settings(None, {"cache_size": "1000"}, {})
    with pytest.raises(LoadParamError, match=r"^t: draft_model\.draft_num_tokens: .*32"):
        check_block({"draft_num_tokens": 33}, Section.DRAFT, "t")


@pytest.mark.parametrize("section", list(Section), ids=[s.value for s in Section])
def test_surfaces_list_exactly_the_rows_that_name_them(section: Section) -> None:
    config_cls = type(getattr(Settings(), section.value))
    assert names(section, Surface.CONFIG) <= set(config_cls.model_fields)
    request_cls = ModelLoadRequest if section is Section.MODEL else DraftLoadRequest
    own = {"model_name", "draft_model", "skip_queue"} if section is Section.MODEL else set()
    assert set(request_cls.model_fields) - own == names(section, Surface.REQUEST)
    # every config key but mappings gets a CLI flag
    flags = {r.name for r in rows(section, Surface.CONFIG)} & set(cli_flag_table())
    assert flags == {
        r.name
        for r in rows(section, Surface.CONFIG)
        if field_kind(r.config_field()[0]) is not FieldKind.STRUCTURED
    }


def test_a_row_the_request_does_not_list_is_a_note_not_a_field() -> None:
    body = {"model_name": "m", "reasoning": True, "gpu_splt": [1], "draft": {"name": "d", "n_gram": 2}}
    req = ModelLoadRequest.model_validate(body)
    assert req.model_extra == {"reasoning": True, "gpu_splt": [1]}
    assert request_notes(req) == [
        "load request: 'reasoning' ignored: it is set in config.yml or the model's "
        "tabby_config.yml, not in a load request",
        "load request: unknown key 'gpu_splt' ignored; did you mean 'gpu_split'?",
        "load request draft_model: unknown key 'n_gram' ignored",
    ]
    flood = ModelLoadRequest.model_validate({"model_name": "m", **{f"k{i}" * 40: 1 for i in range(100)}})
    notes = request_notes(flood)
    assert len(notes) == 17 and notes[-1].endswith("84 more unknown keys ignored")
    assert all(len(n) < 200 for n in notes)  # a long key is shortened


def test_aliases_are_request_names() -> None:
    assert DraftLoadRequest.model_validate({"name": "d"}).draft_model_name == "d"
    assert ModelLoadRequest.model_validate({"name": "m", "draft": {"name": "d"}}).draft_model is not None
    with pytest.raises(ValidationError):
        DraftLoadRequest.model_validate({"draft_rope_scale": 2})  # the draft object needs a name


def test_param_rows_are_the_engine_side_fields() -> None:
    model_params = {f.name for f in dc_fields(ModelLoadParams)} - {"placement", "draft", "extra"}
    assert model_params == {r.name for r in rows(Section.MODEL, use=Use.PARAM)}
    assert {f.name for f in dc_fields(DraftParams)} == {r.name for r in rows(Section.DRAFT, use=Use.PARAM)}


def test_gpu_and_ignored_rows_say_what_is_done_instead() -> None:
    for row in LOAD_TABLE:
        if row.use in (Use.GPU, Use.IGNORED):
            assert row.note, row.name
            assert not row.needs_note(row.default), row.name
        if row.use in (Use.GPU, Use.IGNORED, Use.CHECK):
            assert Surface.TABBY in row.surfaces and Surface.CONFIG in row.surfaces
