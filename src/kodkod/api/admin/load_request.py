"""The `/v1/model/load` body, derived from the load-parameter table (`settings.load_table`).

`ModelLoadRequest` has the request's own fields (`model_name` with the old alias `name`,
`draft_model` with the old alias `draft`, `skip_queue`) and one optional field per table row
whose surfaces include the request; `DraftLoadRequest` the same for the draft object. The
values are checked by the rows' rules, so a bad value is a 422 naming the field, as on every
other surface.

Unknown fields are not refused (TabbyAPI ignores them, as pydantic does by default): they are
kept aside and each one becomes a note (`request_notes`) naming the closest known field, or
saying where a config-only key belongs. The load logs the notes and sends them in its progress
stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, create_model

from kodkod.api.validation import REQUEST_CONFIG, Name
from kodkod.models.loading import MAX_KEY_NOTES, unknown_key_notes
from kodkod.settings.load_param import Section, Surface
from kodkod.settings.load_table import names, request_fields

_CONFIG = ConfigDict(**{**REQUEST_CONFIG, "extra": "allow"}, populate_by_name=True, protected_namespaces=())


class _DraftBase(BaseModel):
    model_config = _CONFIG

    if TYPE_CHECKING:  # the table's fields are added at runtime

        def __getattr__(self, name: str) -> Any: ...


if TYPE_CHECKING:
    _DraftFields = _DraftBase
else:
    _DraftFields = create_model(
        "_DraftFields", __base__=_DraftBase, __module__=__name__, **request_fields(Section.DRAFT)
    )


class DraftLoadRequest(_DraftFields):
    """The `draft_model` object of a load request."""


class _ModelBase(BaseModel):
    model_config = _CONFIG

    model_name: Name = Field(validation_alias=AliasChoices("model_name", "name"))
    draft_model: DraftLoadRequest | None = Field(None, validation_alias=AliasChoices("draft_model", "draft"))
    skip_queue: bool = False  # cancel the old model's running generations instead of waiting

    if TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any: ...


if TYPE_CHECKING:
    _ModelFields = _ModelBase
else:
    _ModelFields = create_model(
        "_ModelFields", __base__=_ModelBase, __module__=__name__, **request_fields(Section.MODEL)
    )


class ModelLoadRequest(_ModelFields):
    """Every field of TabbyAPI's load request, with the old aliases (`name`, `draft`)."""


_OWN = frozenset({"model_name", "draft_model", "skip_queue"})


def _values(req: BaseModel, section: Section) -> dict[str, Any]:
    return {n: getattr(req, n) for n in names(section, Surface.REQUEST) if getattr(req, n) is not None}


def request_values(req: ModelLoadRequest) -> dict[str, Any]:
    """The load parameters the request sets (nulls and unknown fields left out)."""
    values = _values(req, Section.MODEL)
    if req.draft_model is not None:
        values["draft_model"] = _values(req.draft_model, Section.DRAFT)
    return values


def _notes(extra: dict[str, Any] | None, section: Section, where: str) -> list[str]:
    keys = [str(k) for k in (extra or {})]
    elsewhere = names(section) - names(section, Surface.REQUEST)
    notes = [
        f"{where}: {k!r} ignored: it is set in config.yml or the model's tabby_config.yml, "
        "not in a load request"
        for k in keys
        if k in elsewhere
    ][:MAX_KEY_NOTES]
    known = names(section, Surface.REQUEST) | (_OWN if section is Section.MODEL else frozenset())
    return notes + unknown_key_notes([k for k in keys if k not in elsewhere], known, where)


def request_notes(req: ModelLoadRequest) -> list[str]:
    """A note for each field of the request that no load parameter takes."""
    notes = _notes(req.model_extra, Section.MODEL, "load request")
    if req.draft_model is not None:
        notes += _notes(req.draft_model.model_extra, Section.DRAFT, "load request draft_model")
    return notes
