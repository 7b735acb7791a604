"""The row type of the model-load parameter table, and what every surface derives from a row.

A `LoadParam` declares one parameter once: its key, the section it belongs to (`model` or
`draft_model`), its value type and bounds, its default, the surfaces that accept it and what
llama.cpp does with it (`Use`). From a row:

- `config_field()` is its field in the config section (config.yml, environment variables, the
  CLI flag derived from the section, `use_as_default`);
- `request_field()` is its field in the `/v1/model/load` body (draft rows: the body's
  `draft_model` object); every field there defaults to None ("not sent");
- `block_field()` is its field in a model folder's `tabby_config.yml` block (also optional).

The three share one annotation (`value_type()`), so a value is accepted or refused alike on
every surface: numbers never come from booleans, floats are finite, strings hold no NUL,
`multiple_of`, `ge`/`gt`/`le`, item bounds of lists and the row's own normaliser are the
same pydantic metadata everywhere. A surface's error is its own (a config error naming the
origin, a 422, a 400 naming the file and key).
"""

from __future__ import annotations

import difflib
import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import AfterValidator, AliasChoices, BeforeValidator, Field

MAX_DEVICES = 16
"""Longest per-device list (`gpu_split`, …): llama.cpp's device limit."""


class Section(enum.Enum):
    MODEL = "model"
    DRAFT = "draft_model"


class Surface(enum.Flag):
    """Where a load parameter is accepted."""

    CONFIG = enum.auto()  # config.yml section, its environment variables and CLI flag
    REQUEST = enum.auto()  # POST /v1/model/load (draft rows: its draft_model object)
    TABBY = enum.auto()  # a model folder's tabby_config.yml


ALL = Surface.CONFIG | Surface.REQUEST | Surface.TABBY
NOT_IN_REQUEST = Surface.CONFIG | Surface.TABBY


class Use(enum.Enum):
    """What a load does with the value."""

    PARAM = "param"  # a field of models.params.ModelLoadParams / DraftParams
    EXTRA = "extra"  # handed to the chat layer (ModelLoadParams.extra): reasoning, tool_format…
    GPU = "gpu"  # device placement: honoured with devices to split over, else noted and ignored
    IGNORED = "ignored"  # no llama.cpp meaning (exl2/exl3-only, legacy): noted when set
    CHECK = "check"  # checked, then not needed (backend)


# ---- value rules shared by every surface ---------------------------------------------------


def _no_bool(value: Any) -> Any:
    """`max_seq_len: true` is a mistake, not 1."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


def _text(value: Any) -> Any:
    """Numbers are accepted as text (`cache_mode: 8` in YAML); NUL never is."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


def lower(value: Any) -> Any:
    """Choices are case-insensitive."""
    return value.strip().lower() if isinstance(value, str) else value


def _multiple_of(multiple: int) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is not None and (value <= 0 or value % multiple):
            raise ValueError(f"expected a positive multiple of {multiple}, got {value}")
        return value

    return check


def number_or_auto(value: Any) -> Any:
    """A RoPE alpha: a positive finite number, or "auto" (a numeric string is a number)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number or 'auto', got {str(value).lower()}")
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number or 'auto', got {value!r}") from None
    if isinstance(value, int | float):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"expected a positive number or 'auto', got {value!r}")
        return float(value)
    raise ValueError(f"expected a number or 'auto', got {value!r}")


DeviceAmounts = Annotated[
    list[Annotated[float, Field(ge=0, allow_inf_nan=False), BeforeValidator(_no_bool)]],
    Field(max_length=MAX_DEVICES),
]
"""One non-negative amount per device (GB of `gpu_split`, MB of `autosplit_reserve`)."""

RopeAlpha = Annotated[float | Literal["auto"], BeforeValidator(number_or_auto)]


@dataclass(frozen=True, slots=True)
class LoadParam:
    """One load parameter (see the module docstring).

    `annotation` is the plain value type (int, float, bool, str, a Literal, `DeviceAmounts`,
    …); `default` is the config's default (None: the config key is nullable and unset).
    `note` is what a load says instead when a GPU/IGNORED row is set to something other than
    its default (`noted(value)` decides; default: value != default). `aliases` are extra
    names in the request body. `before`/`after` normalise or check the value on every surface.
    """

    name: str
    annotation: Any
    default: Any
    description: str
    section: Section = Section.MODEL
    surfaces: Surface = ALL
    use: Use = Use.PARAM
    aliases: tuple[str, ...] = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    multiple_of: int | None = None
    before: Callable[[Any], Any] | None = None
    after: Callable[[Any], Any] | None = None
    note: str = ""
    noted: Callable[[Any], bool] | None = None
    required_in_request: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def needs_note(self, value: Any) -> bool:
        """The row has a note and the value is one a load has to say something about."""
        if not self.note:
            return False
        if self.noted is not None:
            return self.noted(value)
        return value is not None and value != self.default

    def value_type(self) -> Any:
        """The annotation with every rule of the row (bounds, normalisers) attached."""
        metadata: list[Any] = []
        plain = self.annotation
        if plain in (int, float):
            metadata.append(BeforeValidator(_no_bool))
            if self.multiple_of is not None:
                metadata += [Field(le=self.le), AfterValidator(_multiple_of(self.multiple_of))]
            else:
                metadata.append(Field(ge=self.ge, gt=self.gt, le=self.le))
            if plain is float:
                metadata.append(Field(allow_inf_nan=False))
        elif plain is str:
            metadata.append(BeforeValidator(_text))
        if self.before is not None:
            metadata.append(BeforeValidator(self.before))
        if self.after is not None:
            metadata.append(AfterValidator(self.after))
        return Annotated[(plain, *metadata)] if metadata else plain

    def _default_spec(self) -> dict[str, Any]:
        if isinstance(self.default, list | dict):
            frozen = self.default
            return {"default_factory": lambda: type(frozen)(frozen)}
        return {"default": self.default}

    def config_field(self) -> tuple[Any, Any]:
        """(annotation, FieldInfo) of the config section's field."""
        annotation = self.value_type()
        if self.default is None:
            annotation = annotation | None
        return annotation, Field(description=self.description, **self._default_spec())

    def request_field(self) -> tuple[Any, Any]:
        """(annotation, FieldInfo) of the load request's field (None = not sent)."""
        alias = AliasChoices(*self.names) if self.aliases else None
        if self.required_in_request:
            return self.value_type(), Field(validation_alias=alias)
        return self.value_type() | None, Field(None, validation_alias=alias)

    def block_field(self) -> tuple[Any, Any]:
        """(annotation, FieldInfo) of a tabby_config.yml block's field (None = not set)."""
        return self.value_type() | None, Field(None)


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name most like `name` (difflib), or None when nothing is close."""
    found = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_key_hint(name: str, known: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest known name, or ''."""
    match = closest(name, known)
    return f"; did you mean '{match}'?" if match else ""


def is_literal(annotation: Any) -> bool:
    return get_origin(annotation) is Literal


def literal_choices(annotation: Any) -> tuple[Any, ...]:
    return get_args(annotation) if is_literal(annotation) else ()
