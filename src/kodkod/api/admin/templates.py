"""Prompt-template endpoints: list (api), switch and unload (admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from kodkod.api.deps import ADMIN, API, current_permission
from kodkod.api.errors import ApiError
from kodkod.api.state import get_model, get_state
from kodkod.api.validation import REQUEST_CONFIG, Name
from kodkod.auth import Permission
from kodkod.chat import TemplateError, TemplateFileError, list_templates, load_named_template

router = APIRouter()


class TemplateSwitchRequest(BaseModel):
    model_config = ConfigDict(**REQUEST_CONFIG, populate_by_name=True)
    prompt_template_name: Name = Field(validation_alias=AliasChoices("prompt_template_name", "name"))


@router.get("/v1/templates", dependencies=[API])
@router.get("/v1/template/list", dependencies=[API])
async def template_list(request: Request, perm: Permission = Depends(current_permission)) -> dict[str, Any]:
    state = get_state(request)
    if perm is Permission.ADMIN:
        names = list_templates(state.templates_dir)
    else:
        current = state.models.current
        names = [current.template.name] if current is not None and current.template else []
    return {"object": "list", "data": names}


@router.post("/v1/template/switch", dependencies=[ADMIN])
async def template_switch(req: TemplateSwitchRequest, request: Request) -> None:
    state = get_state(request)
    model = get_model(request)
    if not req.prompt_template_name.strip():
        raise ApiError(400, "prompt_template_name must not be empty")
    try:
        model.template = load_named_template(state.templates_dir, req.prompt_template_name)
    except TemplateFileError as exc:
        raise ApiError(400, str(exc)) from None
    except TemplateError as exc:
        raise ApiError(400, f"TemplateError: {exc}") from None
    return None


@router.post("/v1/template/unload", dependencies=[ADMIN])
async def template_unload(request: Request) -> None:
    get_model(request).template = None
    return None
