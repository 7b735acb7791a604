"""Prompt-template endpoints: list (api), switch and unload (admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from kodkod.api.deps import ADMIN, API, current_permission
from kodkod.api.errors import ApiError
from kodkod.api.state import Models, Templates, get_model
from kodkod.api.validation import REQUEST_CONFIG, Name
from kodkod.auth import Permission
from kodkod.chat import TemplateError, TemplateFileError

router = APIRouter()


class TemplateSwitchRequest(BaseModel):
    model_config = ConfigDict(**REQUEST_CONFIG, populate_by_name=True)
    prompt_template_name: Name = Field(validation_alias=AliasChoices("prompt_template_name", "name"))


@router.get("/v1/templates", dependencies=[API])
@router.get("/v1/template/list", dependencies=[API])
async def template_list(
    templates: Templates, models: Models, perm: Permission = Depends(current_permission)
) -> dict[str, Any]:
    if perm is Permission.ADMIN:
        names = templates.names()
    else:
        current = models.current
        names = [current.template.name] if current is not None and current.template else []
    return {"object": "list", "data": names}


@router.post("/v1/template/switch", dependencies=[ADMIN])
async def template_switch(req: TemplateSwitchRequest, request: Request, templates: Templates) -> None:
    model = get_model(request)
    if not req.prompt_template_name.strip():
        raise ApiError(400, "prompt_template_name must not be empty")
    try:
        model.template = templates.load(req.prompt_template_name)
    except TemplateFileError as exc:
        raise ApiError(400, str(exc)) from None
    except TemplateError as exc:
        raise ApiError(400, f"TemplateError: {exc}") from None
    return None


@router.post("/v1/template/unload", dependencies=[ADMIN])
async def template_unload(request: Request) -> None:
    get_model(request).template = None
    return None
