"""Which parameters a load uses (reference §11.1, §11.5, §11.7).

Sources, low → high priority (the newest upstream order, 2026-07-18+):

    1. `model.use_as_default` keys of config.yml (API and inline loads only)
    2. the request's fields — or, for the startup load, the whole `model` / `draft_model` config
    3. the model folder's `tabby_config.yml` (`model:` and `draft_model:` blocks; the older flat
       layout with `draft:`/`draft_model:` sub-blocks is accepted too)

Top-level keys merge shallowly; the draft block merges on its own.
"""

from __future__ import annotations

import logging
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import Any

import yaml

from kodkod.models.manager import LoadedModel, ModelManager, ProgressFn
from kodkod.models.params import DraftParams, LoadParamError, ModelLoadParams, cache_types
from kodkod.models.registry import ModelEntry
from kodkod.settings import Settings

log = logging.getLogger(__name__)

_PARAM_KEYS = {f.name for f in dc_fields(ModelLoadParams)} - {"draft", "extra"}
_DRAFT_KEYS = {f.name for f in dc_fields(DraftParams)}
_EXTRA_KEYS = {
    "reasoning", "reasoning_start_token", "reasoning_end_token", "start_in_reasoning",
    "tool_calls_in_reasoning", "reasoning_budget_tokens", "reasoning_budget_message",
    "tool_format", "harmony", "muse_glimmer", "template_vars_default", "template_vars_force",
    "force_enable_thinking",
}


def read_tabby_config(folder: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model block, draft block) of a model folder's tabby_config.yml ({} when absent)."""
    if folder is None:
        return {}, {}
    path = folder / "tabby_config.yml"
    if not path.is_file():
        return {}, {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise LoadParamError(f"{path.name} in {folder.name} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise LoadParamError(f"{path.name} in {folder.name} must be a mapping")
    if isinstance(data.get("model"), dict):
        model = data.get("model") or {}
        draft = data.get("draft_model") or {}
    else:  # older flat layout
        model = {k: v for k, v in data.items() if k not in ("draft", "draft_model")}
        draft = data.get("draft_model") or data.get("draft") or {}
        if data:
            log.warning("%s uses the old flat layout; nest keys under 'model:'", path)
    if not isinstance(model, dict) or not isinstance(draft, dict):
        raise LoadParamError(f"{path.name} in {folder.name}: 'model' and 'draft_model' must be mappings")
    return model, draft


def build_params(settings: Settings, entry: ModelEntry, request: dict[str, Any], *, startup: bool) -> ModelLoadParams:
    """Merge the sources above into load parameters (LoadParamError on bad values)."""
    model_layer: dict[str, Any] = {}
    draft_layer: dict[str, Any] = {}
    if startup:
        model_layer.update(settings.model.model_dump(exclude_none=True))
        draft_layer.update(settings.draft_model.model_dump(exclude_none=True))
    else:
        model_layer.update(settings.model_defaults())
        draft_layer.update(settings.draft_defaults())
        req = dict(request)
        req_draft = req.pop("draft_model", None) or {}
        model_layer.update({k: v for k, v in req.items() if v is not None})
        draft_layer.update({k: v for k, v in req_draft.items() if v is not None})
    folder_model, folder_draft = read_tabby_config(entry.folder)
    model_layer.update(folder_model)
    draft_layer.update(folder_draft)

    values = {k: v for k, v in model_layer.items() if k in _PARAM_KEYS}
    if "n_threads" not in values and settings.model.n_threads:
        values["n_threads"] = settings.model.n_threads
    values.setdefault("flash_attention", settings.model.flash_attention)
    params = ModelLoadParams(**values)
    params.extra = {k: v for k, v in model_layer.items() if k in _EXTRA_KEYS}
    cache_types(params.cache_mode)  # validate early: 400 before any stream starts
    if draft_layer.get("draft_model_name"):
        params.draft = DraftParams(**{k: v for k, v in draft_layer.items() if k in _DRAFT_KEYS})
    for key in ("gpu_split", "tensor_parallel"):
        value = model_layer.get(key)
        if value:
            raise LoadParamError(
                f"{key} needs a GPU, and this llama.cpp build has none (CPU only); remove it"
            )
    return params


async def load_model(
    manager: ModelManager, entry: ModelEntry, params: ModelLoadParams, progress: ProgressFn | None = None
) -> LoadedModel:
    return await manager.load(entry, params, progress)
