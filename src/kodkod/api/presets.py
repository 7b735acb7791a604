"""Sampler override presets, the service behind the override endpoints.

A preset is `sampler_overrides/<name>.yml`: a mapping of sampler field name → block with
`override` (the value), `force` (replace the client's value, even with 0/false/[]) and
`additive` (lists: prepend to the client's list; mappings such as logit_bias: merge under it).
How a rule meets a request is `api.sampling.apply_override`.

Loading validates every value with the request's rules for that field (`PresetValues`, built
from the sampler table like the request models) (a bad value is a `PresetError`, which
the switch endpoint answers with 400 and startup logs as a warning) and stores it normalised,
so a forced value is as valid as a sent one. Null values are dropped; request aliases
(`rep_pen`, `typical_p`, …) are accepted as keys; unknown keys are skipped with a warning.

`SamplerPresets` is the service the app factory builds once: the active `OverrideState` and
the preset directory. Unlike upstream, clearing or replacing the overrides inline also clears
`selected_preset`, so listings never name a preset that is not active.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kodkod.api.sampling import PresetValues, alias_map
from kodkod.fsutil import is_file, plain_name

log = logging.getLogger(__name__)


@dataclass(slots=True)
class OverrideState:
    """The active sampler overrides: param → {override, force, additive}."""

    selected_preset: str | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


class PresetError(ValueError):
    """A preset file is missing or invalid (message is user-facing)."""


def list_presets(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yml")) if directory.is_dir() else []


def _validated(name: str, value: Any, source: str) -> Any:
    """`value` checked and normalised exactly as a request's `name` field would be."""
    try:
        model = PresetValues.model_validate({name: value})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise PresetError(f"{source}: {name}: {err.get('msg', 'invalid value')}") from None
    return getattr(model, name)


def _flag(block: dict[str, Any], key: str, name: str, source: str) -> bool:
    value = block.get(key, False)
    if not isinstance(value, bool):
        raise PresetError(f"{source}: {name}.{key} must be true or false")
    return value


def normalise_overrides(data: Any, source: str) -> dict[str, dict[str, Any]]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PresetError(f"{source}: a preset must be a mapping of sampler names to blocks")
    names = alias_map()
    out: dict[str, dict[str, Any]] = {}
    for key, block in data.items():
        name = names.get(str(key))
        if name is None:
            log.warning("%s: unknown sampler field %r skipped", source, key)
            continue
        if not isinstance(block, dict):
            block = {"override": block}
        block = {k: v for k, v in block.items() if v is not None}
        if "override" not in block:
            continue
        value = _validated(name, block["override"], source)
        if value is None:
            continue
        out[name] = {
            "override": value,
            "force": _flag(block, "force", name, source),
            "additive": _flag(block, "additive", name, source),
        }
    return out


def load_preset(directory: Path, name: str) -> dict[str, dict[str, Any]]:
    if not plain_name(name):
        raise PresetError(f"invalid preset name {name[:100]!r}")
    path = directory / f"{name}.yml"
    if not is_file(path):
        raise PresetError(f"sampler override preset {name!r} was not found in {directory.name}/")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PresetError(f"{path.name} is not valid YAML: {exc}") from None
    return normalise_overrides(data, path.name)


def apply_preset(state: OverrideState, directory: Path, name: str) -> None:
    state.overrides = load_preset(directory, name)
    state.selected_preset = name


@dataclass(slots=True)
class SamplerPresets:
    """The active overrides and the directory their presets come from."""

    directory: Path
    active: OverrideState = field(default_factory=OverrideState)

    def names(self) -> list[str]:
        return list_presets(self.directory)

    def select(self, name: str) -> None:
        """Make preset `name` the active overrides (PresetError: nothing changes)."""
        apply_preset(self.active, self.directory, name)

    def replace(self, data: Any) -> None:
        """Make `data` (a mapping like a preset file's) the active overrides, no preset named."""
        self.active.overrides = normalise_overrides(data, "overrides")
        self.active.selected_preset = None

    def clear(self) -> None:
        self.active.overrides = {}
        self.active.selected_preset = None
