"""Which parameters a load uses, as a `LoadPlan`.

Sources, low → high priority (the newest upstream order, 2026-07-18+):

    1. `model.use_as_default` keys of config.yml (API and inline loads only)
    2. the request's fields — or, for the startup load, the whole `model` / `draft_model` config
    3. the model folder's `tabby_config.yml` (`model:` and `draft_model:` blocks; the older flat
       layout with `draft:`/`draft_model:` sub-blocks is accepted too)

Top-level keys merge shallowly; the draft block merges on its own. Request nulls are dropped
before merging. Values from YAML are type-checked here (the request was checked by pydantic),
so a bad `tabby_config.yml` is a 400 naming the key, before any loading starts; numeric keys
use the bounds of `settings.load_bounds`, like the config and the request.
"""

from __future__ import annotations

import logging
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import Any

import yaml

from kodkod.models.params import (
    DraftParams,
    LoadParamError,
    LoadPlan,
    ModelLoadParams,
    check_backend,
    gpu_placement,
    normalise_cache_mode,
)
from kodkod.models.registry import ModelEntry, ModelNameError, resolve
from kodkod.settings import Settings
from kodkod.settings.load_bounds import LOAD_BOUNDS

log = logging.getLogger(__name__)

_PARAM_KEYS = {f.name for f in dc_fields(ModelLoadParams)} - {"draft", "extra", "placement"}
_DRAFT_KEYS = {f.name for f in dc_fields(DraftParams)}
_EXTRA_KEYS = {
    "reasoning",
    "reasoning_start_token",
    "reasoning_end_token",
    "start_in_reasoning",
    "tool_calls_in_reasoning",
    "reasoning_budget_tokens",
    "reasoning_budget_message",
    "tool_format",
    "harmony",
    "muse_glimmer",
    "template_vars_default",
    "template_vars_force",
    "force_enable_thinking",
}
_BOOL_KEYS = {"flash_attention", "vision", "output_chunking", "dynamic_draft"}
_STR_KEYS = {"cache_mode", "draft_cache_mode", "prompt_template", "draft_model_name", "draft_mode"}


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
    if isinstance(data.get("model"), dict) or (data and set(data) <= {"model", "draft_model"}):
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


def _checked(values: dict[str, Any]) -> dict[str, Any]:
    """Type-check merged values (YAML sources are not validated elsewhere)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            out[key] = None
        elif key in LOAD_BOUNDS:  # the same bounds as the config and the load request
            try:
                out[key] = LOAD_BOUNDS[key].check(value)
            except ValueError as exc:
                raise LoadParamError(str(exc)) from None
        elif key in _BOOL_KEYS:
            if not isinstance(value, bool):
                raise LoadParamError(f"{key} must be true or false, not {value!r}")
            out[key] = value
        elif key in _STR_KEYS:
            if not isinstance(value, str):
                raise LoadParamError(f"{key} must be a string, not {value!r}")
            out[key] = value.strip().lower() if key == "draft_mode" else value
        else:
            out[key] = value
    return out


def _layers(
    settings: Settings, entry: ModelEntry, request: dict[str, Any], startup: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
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
    return model_layer, draft_layer


def build_params(
    settings: Settings,
    entry: ModelEntry,
    request: dict[str, Any],
    *,
    startup: bool,
    gpu_available: bool = False,
) -> ModelLoadParams:
    """Merge the sources above into load parameters (LoadParamError on bad values)."""
    model_layer, draft_layer = _layers(settings, entry, request, startup)
    check_backend(model_layer.get("backend"))
    values = _checked({k: v for k, v in model_layer.items() if k in _PARAM_KEYS})
    if values.get("n_threads") is None:
        values["n_threads"] = settings.model.n_threads
    if values.get("flash_attention") is None:
        values["flash_attention"] = settings.model.flash_attention
    for key in ("cache_mode", "chunk_size", "output_chunking", "vision"):
        if values.get(key) is None:
            values.pop(key, None)
    if values.get("vision"):
        raise LoadParamError(
            "vision: true needs a vision projector, and this server has no vision support yet; "
            "load the model without vision"
        )
    params = ModelLoadParams(**values)
    params.cache_mode = normalise_cache_mode(params.cache_mode)  # 400 before any stream starts
    params.extra = {k: v for k, v in model_layer.items() if k in _EXTRA_KEYS}
    draft_values = _checked({k: v for k, v in draft_layer.items() if k in _DRAFT_KEYS})
    draft_values = {k: v for k, v in draft_values.items() if v is not None}
    if draft_values.get("draft_model_name") or draft_values.get("draft_mode") in ("ngram", "mtp"):
        draft = DraftParams(**draft_values)
        if draft.draft_mode not in ("model", "disabled", "ngram", "mtp"):
            raise LoadParamError("draft_mode must be one of model, disabled, ngram, mtp")
        draft.draft_cache_mode = normalise_cache_mode(draft.draft_cache_mode)
        params.draft = draft
    params.placement = gpu_placement(
        gpu_available=gpu_available,
        gpu_split_auto=bool(model_layer.get("gpu_split_auto", True)),
        gpu_split=model_layer.get("gpu_split") or [],
        tensor_parallel=bool(model_layer.get("tensor_parallel", False)),
        tensor_parallel_backend=str(model_layer.get("tensor_parallel_backend") or "native"),
        autosplit_reserve=model_layer.get("autosplit_reserve"),
        draft_gpu_split=draft_values.get("draft_gpu_split") or [],
    )
    return params


def plan_load(
    settings: Settings,
    model_dir: Path,
    draft_dir: Path,
    name: str,
    request: dict[str, Any],
    *,
    startup: bool,
    gpu_available: bool = False,
) -> LoadPlan:
    """Resolve the model (and draft) names and merge the parameters: 400-type errors only."""
    entry = resolve(model_dir, name)
    params = build_params(settings, entry, request, startup=startup, gpu_available=gpu_available)
    draft_entry = None
    if params.draft is not None and params.draft.wants_model:
        try:
            draft_entry = resolve(draft_dir, params.draft.draft_model_name or "")
        except ModelNameError as exc:
            raise ModelNameError(f"draft model: {exc}") from None
    return LoadPlan(entry, params, draft_entry)
