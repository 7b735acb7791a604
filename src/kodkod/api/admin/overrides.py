"""Sampler override presets (reference §6.12, §9.4): list (api), switch / unload (admin).

A preset is `sampler_overrides/<name>.yml`: a mapping of sampler field name → block with
`override` (the value), `force` (replace the client's value, even with 0/false/[]) and
`additive` (lists: prepend to the client's list; mappings such as logit_bias: merge under it).
How a rule meets a request is `api.sampling.apply_override`.

Loading validates every value with the request's rules for that field (`PresetValues`, built
from the sampler table like the request models) (a bad value is a 400 on switch, a
warning at startup) and stores it normalised, so a forced value is as valid as a sent one.
Null values are dropped; request aliases (`rep_pen`, `typical_p`, …) are accepted as keys;
unknown keys are skipped with a warning. `sampling.override_preset` in config.yml selects a
preset at startup (app.py). Unlike upstream (§15 quirk 11), unload and an inline `overrides`
switch clear `selected_preset`, so the list endpoint never names a preset that is not active.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ValidationError

from kodkod.api.deps import ADMIN, API, current_permission
from kodkod.api.errors import ApiError
from kodkod.api.sampling import PresetValues, alias_map
from kodkod.api.state import OverrideState, get_state
from kodkod.api.validation import REQUEST_CONFIG, Name
from kodkod.auth import Permission

log = logging.getLogger(__name__)
router = APIRouter()


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
    if (not name or "/" in name or "\\" in name or ".." in name or "\x00" in name
            or len(name.encode("utf-8", "replace")) > 200):
        raise PresetError(f"invalid preset name {name[:100]!r}")
    path = directory / f"{name}.yml"
    try:
        found = path.is_file()
    except (OSError, ValueError):
        found = False
    if not found:
        raise PresetError(f"sampler override preset {name!r} was not found in {directory.name}/")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PresetError(f"{path.name} is not valid YAML: {exc}") from None
    return normalise_overrides(data, path.name)


def apply_preset(state: OverrideState, directory: Path, name: str) -> None:
    state.overrides = load_preset(directory, name)
    state.selected_preset = name


class OverrideSwitchRequest(BaseModel):
    model_config = REQUEST_CONFIG
    preset: Name | None = None
    overrides: dict[str, Any] | None = None


@router.get("/v1/sampling/overrides", dependencies=[API])
@router.get("/v1/sampling/override/list", dependencies=[API])
async def override_list(request: Request, perm: Permission = Depends(current_permission)) -> dict[str, Any]:
    state = get_state(request)
    return {
        "selected_preset": state.overrides.selected_preset,
        "overrides": state.overrides.overrides,
        "presets": list_presets(state.overrides_dir) if perm is Permission.ADMIN else [],
    }


@router.post("/v1/sampling/override/switch", dependencies=[ADMIN])
async def override_switch(req: OverrideSwitchRequest, request: Request) -> None:
    state = get_state(request)
    try:
        if req.preset is not None:
            apply_preset(state.overrides, state.overrides_dir, req.preset)
        elif req.overrides is not None:
            state.overrides.overrides = normalise_overrides(req.overrides, "overrides")
            state.overrides.selected_preset = None
        else:
            raise ApiError(400, "send a preset name or an overrides object")
    except PresetError as exc:
        raise ApiError(400, str(exc)) from None
    return None


@router.post("/v1/sampling/override/unload", dependencies=[ADMIN])
async def override_unload(request: Request) -> None:
    overrides = get_state(request).overrides
    overrides.overrides = {}
    overrides.selected_preset = None
    return None
