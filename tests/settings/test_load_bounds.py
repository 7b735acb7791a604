"""Model-load bounds are declared once (`settings.load_bounds`): every way a load parameter
arrives — config.yml section, CLI flag, /v1/model/load request, a model's tabby_config.yml —
accepts the values at each bound and refuses the values just outside, the same for all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from kodkod.api.admin.model import DraftLoadRequest, ModelLoadRequest
from kodkod.models.loading import _DRAFT_KEYS, _EXTRA_KEYS, _PARAM_KEYS, build_params
from kodkod.models.params import LoadParamError
from kodkod.models.registry import ModelEntry
from kodkod.settings import ConfigError, Settings, load_settings
from kodkod.settings.load_bounds import LOAD_BOUNDS, LoadBound
from kodkod.settings.model_section import ModelSettings
from kodkod.settings.sections import DraftModelSettings


def cases(b: LoadBound) -> tuple[list[Any], list[Any]]:
    """(values at the bounds, values just outside)."""
    step = 1 if b.kind is int else 0.01
    ok: list[Any] = []
    bad: list[Any] = ["many"]
    if b.multiple_of is not None:
        ok += [b.multiple_of, 4 * b.multiple_of]
        bad += [0, b.multiple_of + 1, -b.multiple_of]
    if b.ge is not None:
        ok.append(b.ge)
        bad.append(b.ge - step)
    if b.gt is not None and b.multiple_of is None:
        ok.append(b.gt + step)
        bad.append(b.gt)
    if b.le is not None:
        ok.append(b.le)
        bad.append(b.le + step)
    if b.kind is int:
        ok, bad = [int(v) for v in ok], [v if isinstance(v, str) else int(v) for v in bad]
    return ok, bad


def section_of(name: str) -> tuple[str, type[BaseModel]]:
    if name in ModelSettings.model_fields:
        return "model", ModelSettings
    assert name in DraftModelSettings.model_fields, name
    return "draft_model", DraftModelSettings


ROWS = list(LOAD_BOUNDS.values())
IDS = [b.name for b in ROWS]


@pytest.mark.parametrize("b", ROWS, ids=IDS)
def test_config_section_and_cli_flag(b: LoadBound, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./config.yml
    section, _ = section_of(b.name)
    ok, bad = cases(b)
    for value in ok:
        settings = Settings.model_validate({section: {b.name: value}})
        assert getattr(getattr(settings, section), b.name) == value
        cli = load_settings(None, {b.name: str(value)}, {}).settings
        assert getattr(getattr(cli, section), b.name) == value
    for value in bad:
        with pytest.raises(ValidationError):
            Settings.model_validate({section: {b.name: value}})
        with pytest.raises(ConfigError):
            load_settings(None, {b.name: str(value)}, {})


def request_model(name: str) -> tuple[type[BaseModel], dict[str, Any]] | None:
    if name in ModelLoadRequest.model_fields:
        return ModelLoadRequest, {"model_name": "m"}
    if name in DraftLoadRequest.model_fields:
        return DraftLoadRequest, {"draft_model_name": "d"}
    return None


REQUEST_ROWS = [b for b in ROWS if request_model(b.name) is not None]


@pytest.mark.parametrize("b", REQUEST_ROWS, ids=[b.name for b in REQUEST_ROWS])
def test_load_request(b: LoadBound) -> None:
    found = request_model(b.name)
    assert found is not None
    model, base = found
    ok, bad = cases(b)
    for value in ok:
        assert getattr(model.model_validate({**base, b.name: value}), b.name) == value
    for value in bad:
        with pytest.raises(ValidationError):
            model.model_validate({**base, b.name: value})


def test_the_request_lists_every_bounded_load_key_but_config_only_ones() -> None:
    config_only = {b.name for b in ROWS} - {b.name for b in REQUEST_ROWS}
    assert config_only == {"n_threads", "cpu_moe_offload_layers"}


TABBY_ROWS = [b for b in ROWS if b.name in _PARAM_KEYS | _DRAFT_KEYS]


def folder(tmp_path: Path, text: str) -> ModelEntry:
    path = tmp_path / "models" / "m"
    path.mkdir(parents=True, exist_ok=True)
    (path / "m.gguf").write_bytes(b"GGUF")
    (path / "tabby_config.yml").write_text(text, encoding="utf-8")
    return ModelEntry("m", path / "m.gguf", path)


@pytest.mark.parametrize("b", TABBY_ROWS, ids=[b.name for b in TABBY_ROWS])
def test_tabby_config(b: LoadBound, tmp_path: Path) -> None:
    section, _ = section_of(b.name)
    ok, bad = cases(b)
    for value in ok:
        params = build_params(
            Settings(), folder(tmp_path, f"{section}:\n  {b.name}: {value}\n"), {}, startup=False
        )
        assert params is not None
    for value in bad:
        entry = folder(tmp_path, f"{section}:\n  {b.name}: {value}\n")
        with pytest.raises(LoadParamError, match=b.name):
            build_params(Settings(), entry, {}, startup=False)


def test_cache_size_is_a_multiple_of_256_on_every_surface() -> None:
    """The load request used to round 1000 up to 1024; the config refused it. Now all refuse."""
    with pytest.raises(ValidationError, match="multiple of 256"):
        ModelLoadRequest.model_validate({"model_name": "m", "cache_size": 1000})
    with pytest.raises(ValidationError, match="multiple of 256"):
        Settings.model_validate({"model": {"cache_size": 1000}})


def test_request_and_tabby_config_keys_are_config_keys() -> None:
    """The load request and tabby_config.yml name nothing the config sections do not declare
    (so a key has one meaning and, via LOAD_BOUNDS, one set of bounds everywhere)."""
    assert set(ModelLoadRequest.model_fields) - set(ModelSettings.model_fields) == {
        "skip_queue",
        "draft_model",
    }
    assert set(DraftLoadRequest.model_fields) <= set(DraftModelSettings.model_fields)
    assert set(ModelSettings.model_fields) >= _PARAM_KEYS | _EXTRA_KEYS
    assert set(DraftModelSettings.model_fields) >= _DRAFT_KEYS
    numeric = {
        name
        for name, info in {**ModelSettings.model_fields, **DraftModelSettings.model_fields}.items()
        if "int" in str(info.annotation) or "float" in str(info.annotation)
    }
    unbounded = numeric - set(LOAD_BOUNDS)
    # Keys with no bound: ignored legacy keys, rope_alpha ("auto" too), GPU lists, the grace
    # period (config only, checked >= 0 there), reasoning budget (negative = no limit).
    assert unbounded == {
        "override_base_seq_len",
        "num_experts_per_token",
        "rope_alpha",
        "draft_rope_alpha",
        "autosplit_reserve",
        "gpu_split",
        "draft_gpu_split",
        "unload_grace_s",
        "reasoning_budget_tokens",
    }, unbounded
