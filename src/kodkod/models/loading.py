"""Which parameters a load uses, as a `LoadPlan`.

Sources, low → high priority (the newest upstream order, 2026-07-18+):

    1. `model.use_as_default` keys of config.yml (API and inline loads only)
    2. the request's fields — or, for the startup load, the whole `model` / `draft_model` config
    3. the model folder's `tabby_config.yml` (`model:` and `draft_model:` blocks; the older flat
       layout with `draft:`/`draft_model:` sub-blocks is accepted too)

Top-level keys merge shallowly; the draft block merges on its own. Request nulls are dropped
before merging. The config and the request were validated by pydantic from the load-parameter
table (`settings.load_table`); a `tabby_config.yml` block is validated here by a model built
from the same rows, so a bad value is a 400 naming the file and key before any loading starts,
and an unknown key is a note naming the closest known one. The merged values are then split
by each row's `use`: `ModelLoadParams` / `DraftParams` fields, chat-layer extras, GPU placement
(`models.placement`) and notes for keys llama.cpp has no use for; the notes travel with the
plan (`LoadPlan.notes`) to the log and the load progress stream.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from kodkod.models.params import DraftParams, LoadParamError, LoadPlan, ModelLoadParams
from kodkod.models.placement import gpu_placement, ignored_note
from kodkod.models.registry import ModelEntry, ModelNameError, resolve
from kodkod.settings import Settings
from kodkod.settings.load_param import Section, Surface, Use, unknown_key_hint
from kodkod.settings.load_table import names, rows

log = logging.getLogger(__name__)

MAX_KEY_NOTES = 16
"""Most unknown-key notes one source produces (the rest are counted in one more)."""


class _Block(BaseModel):
    """A tabby_config.yml block: one optional field per row the file may set."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


def _block_model(section: Section) -> type[BaseModel]:
    fields: dict[str, Any] = {r.name: r.block_field() for r in rows(section, Surface.TABBY)}
    return create_model(f"TabbyConfig_{section.value}", __base__=_Block, **fields)


_BLOCKS = {section: _block_model(section) for section in Section}


def unknown_key_notes(keys: list[str], known: frozenset[str], where: str) -> list[str]:
    """One note per unknown key (at most MAX_KEY_NOTES), naming the closest known key."""
    notes = []
    for key in keys[:MAX_KEY_NOTES]:
        shown = key if len(key) <= 64 else key[:61] + "..."
        notes.append(f"{where}: unknown key {shown!r} ignored{unknown_key_hint(key, known)}")
    if len(keys) > MAX_KEY_NOTES:
        notes.append(f"{where}: {len(keys) - MAX_KEY_NOTES} more unknown keys ignored")
    return notes


def check_block(raw: dict[str, Any], section: Section, where: str) -> tuple[dict[str, Any], list[str]]:
    """A tabby_config.yml block validated by the table's rules: (values set, notes)."""
    known = names(section, Surface.TABBY)
    unknown = [str(k) for k in raw if k not in known]
    try:
        block = _BLOCKS[section].model_validate({k: v for k, v in raw.items() if k in known})
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        key = ".".join(str(p) for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        raise LoadParamError(f"{where}: {section.value}.{key}: {message}") from None
    values = {k: getattr(block, k) for k in raw if k in known}
    return values, unknown_key_notes(unknown, known, f"{where}: {section.value}")


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


def _layers(
    settings: Settings, entry: ModelEntry, request: dict[str, Any], startup: bool
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    model_layer: dict[str, Any] = {}
    draft_layer: dict[str, Any] = {}
    if startup:
        model_layer.update(settings.model.model_dump(exclude_none=True, include=set(names(Section.MODEL))))
        draft_layer.update(
            settings.draft_model.model_dump(exclude_none=True, include=set(names(Section.DRAFT)))
        )
    else:
        model_layer.update(settings.model_defaults())
        draft_layer.update(settings.draft_defaults())
        req = dict(request)
        req_draft = req.pop("draft_model", None) or {}
        model_layer.update({k: v for k, v in req.items() if v is not None})
        draft_layer.update({k: v for k, v in req_draft.items() if v is not None})
    folder_model, folder_draft = read_tabby_config(entry.folder)
    where = f"tabby_config.yml in {entry.folder.name}" if entry.folder is not None else ""
    model_values, notes = check_block(folder_model, Section.MODEL, where)
    draft_values, draft_notes = check_block(folder_draft, Section.DRAFT, where)
    model_layer.update(model_values)
    draft_layer.update(draft_values)
    return model_layer, draft_layer, notes + draft_notes


def _split(
    section: Section, layer: dict[str, Any], notes: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(PARAM values set, EXTRA values) of a merged layer; notes for CHECK/IGNORED rows."""
    params: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for row in rows(section):
        value = layer.get(row.name)
        if row.use is Use.PARAM and value is not None:
            params[row.name] = value
        elif row.use is Use.EXTRA and row.name in layer:
            extra[row.name] = value
        elif row.use in (Use.CHECK, Use.IGNORED) and row.needs_note(value):
            notes.append(ignored_note(row, value, row.note))
    return params, extra


def build_plan_params(
    settings: Settings,
    entry: ModelEntry,
    request: dict[str, Any],
    *,
    startup: bool,
    gpu_available: bool = False,
) -> tuple[ModelLoadParams, list[str]]:
    """Merge the sources above into load parameters and notes (LoadParamError on bad values)."""
    model_layer, draft_layer, notes = _layers(settings, entry, request, startup)
    values, extra = _split(Section.MODEL, model_layer, notes)
    values.setdefault("n_threads", settings.model.n_threads)
    values.setdefault("flash_attention", settings.model.flash_attention)
    values.setdefault("batch_invariant", settings.model.batch_invariant)
    values.setdefault("kv_layout", settings.model.kv_layout)
    if values.get("vision"):
        raise LoadParamError(
            "vision: true needs a vision projector, and this server has no vision support yet; "
            "load the model without vision"
        )
    params = ModelLoadParams(**values, extra=extra)
    draft_values, _ = _split(Section.DRAFT, draft_layer, notes)
    if draft_values.get("draft_model_name") or draft_values.get("draft_mode") in ("ngram", "mtp"):
        params.draft = DraftParams(**draft_values)
    params.placement, gpu_notes = gpu_placement(model_layer, draft_layer, devices_available=gpu_available)
    return params, notes + gpu_notes


def build_params(
    settings: Settings,
    entry: ModelEntry,
    request: dict[str, Any],
    *,
    startup: bool,
    gpu_available: bool = False,
) -> ModelLoadParams:
    """The load parameters alone (`build_plan_params` without its notes)."""
    return build_plan_params(settings, entry, request, startup=startup, gpu_available=gpu_available)[0]


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
    params, notes = build_plan_params(settings, entry, request, startup=startup, gpu_available=gpu_available)
    draft_entry = None
    if params.draft is not None and params.draft.wants_model:
        try:
            draft_entry = resolve(draft_dir, params.draft.draft_model_name or "")
        except ModelNameError as exc:
            raise ModelNameError(f"draft model: {exc}") from None
    return LoadPlan(entry, params, draft_entry, tuple(notes))
