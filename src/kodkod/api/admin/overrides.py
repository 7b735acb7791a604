"""Sampler override presets: list (api), switch / unload (admin).

The routes translate HTTP to the `SamplerPresets` service (`kodkod.api.presets`, which has the
preset file format and its validation): a bad preset or override value is a 400.
`sampling.override_preset` in config.yml selects a preset at startup (app.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from kodkod.api.deps import ADMIN, API, current_permission
from kodkod.api.errors import ApiError
from kodkod.api.presets import PresetError
from kodkod.api.state import Presets
from kodkod.api.validation import REQUEST_CONFIG, Name
from kodkod.auth import Permission

router = APIRouter()


class OverrideSwitchRequest(BaseModel):
    model_config = REQUEST_CONFIG
    preset: Name | None = None
    overrides: dict[str, Any] | None = None


@router.get("/v1/sampling/overrides", dependencies=[API])
@router.get("/v1/sampling/override/list", dependencies=[API])
async def override_list(presets: Presets, perm: Permission = Depends(current_permission)) -> dict[str, Any]:
    return {
        "selected_preset": presets.active.selected_preset,
        "overrides": presets.active.overrides,
        "presets": presets.names() if perm is Permission.ADMIN else [],
    }


@router.post("/v1/sampling/override/switch", dependencies=[ADMIN])
async def override_switch(req: OverrideSwitchRequest, presets: Presets) -> None:
    try:
        if req.preset is not None:
            presets.select(req.preset)
        elif req.overrides is not None:
            presets.replace(req.overrides)
        else:
            raise ApiError(400, "send a preset name or an overrides object")
    except PresetError as exc:
        raise ApiError(400, str(exc)) from None
    return None


@router.post("/v1/sampling/override/unload", dependencies=[ADMIN])
async def override_unload(presets: Presets) -> None:
    presets.clear()
    return None
