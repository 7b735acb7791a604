"""The generation-parameter schema shared by the OpenAI and Kobold APIs.

The fields, their aliases, bounds and fallbacks are declared once, in
`api.sampler_table.SAMPLER_TABLE`; this module builds the request model (`SamplerRequest`), the
preset value model (`PresetValues`) and `FALLBACKS` from it, and holds the rules that involve
several fields. Every field defaults to None, meaning "not sent": the value used is then the
sampler override preset's or the fallback in `FALLBACKS`. Range violations are 422s. Unknown
fields are ignored, like TabbyAPI.
Every known field is honoured (stage order: `core.sampling.stages`); combinations that
contradict each other are 400s naming the field (`sampler_problem`).

Where the reference is silent or upstream is an accident, we chose:
- `seed` (alias `sampler_seed`) is honoured, -1/null = random; one seed gives one text
  whatever runs beside it in the batch.
- `mirostat_mode` 1 is Mirostat v1 (llama.cpp has it), not silently off as upstream.
- dynamic temperature (max_temp > min_temp) replaces `temperature` and follows
  `temperature_last`; temperature 0 (or top_k 1) is greedy after bias, penalties and DRY and
  makes every later setting moot (never an error, so client leftovers do no harm).
- `penalty_range` 0 is a window of no tokens (penalties off), -1 the whole context, except
  that -1 with a frequency or presence penalty counts generated tokens only (TabbyAPI's
  auto-scaled range). `repetition_decay` fades the penalties out over that many older tokens.
- `dry_base` falls back to 1.75 (upstream's 0 would make DRY do nothing); an active DRY with
  a base below 1 is refused. `dry_range` 0 = whole context.
- `frequency_penalty`/`presence_penalty` accept OpenAI's negative range (down to -2).
- `top_n_sigma` (Kobold `nsigma`) is supported; `smoothing_curve` shapes smoothing as in
  text-generation-webui/KoboldCpp (1 = exl2's quadratic).
- `logit_bias` keys must be token ids (422 otherwise). Token ids outside the vocabulary, in
  `logit_bias`, `banned_tokens`, `allowed_tokens` or `stop`, are a 400 naming the field and id
  (like OpenAI's "invalid logit_bias key"; upstream skips them silently).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from kodkod.api.sampler_table import (
    INT32_MAX,
    RequestLora,
    Surface,
    params_for,
    request_fields,
    shared_names,
)
from kodkod.api.validation import REQUEST_CONFIG

__all__ = [
    "FALLBACKS",
    "INT32_MAX",
    "SAMPLER_FIELDS",
    "PresetValues",
    "RequestLora",
    "SamplerRequest",
    "alias_map",
    "apply_override",
    "sampler_problem",
]


class SamplerFieldsBase(BaseModel):
    """What every model built from the sampler table shares: aliases by name and the C-int rule.

    The fields themselves come from `api.sampler_table.SAMPLER_TABLE` (`create_model`)."""

    model_config = ConfigDict(**REQUEST_CONFIG, populate_by_name=True)

    if TYPE_CHECKING:  # the table's fields are added at runtime

        def __getattr__(self, name: str) -> Any: ...

        def __setattr__(self, name: str, value: Any) -> None: ...

    @field_validator("*")
    @classmethod
    def _int32(cls, v: Any, info: ValidationInfo) -> Any:
        """Integers reach llama.cpp as C ints: one that does not fit is a 422, not a crash."""
        is_int = isinstance(v, int) and not isinstance(v, bool)
        if is_int and info.field_name != "seed" and not -INT32_MAX <= v <= INT32_MAX:
            raise ValueError(f"must be between {-INT32_MAX} and {INT32_MAX}")
        return v


class _CrossChecked(SamplerFieldsBase):
    @model_validator(mode="after")
    def _cross_checks(self) -> _CrossChecked:
        if (
            self.min_tokens is not None
            and self.max_tokens is not None
            and self.max_tokens > 0
            and self.min_tokens > self.max_tokens
        ):
            raise ValueError("min_tokens must not exceed max_tokens")
        if (
            self.min_temp is not None
            and self.max_temp is not None
            and self.min_temp > 0
            and self.max_temp > 0
            and self.min_temp > self.max_temp
        ):
            raise ValueError("min_temp must not exceed max_temp")
        return self


if TYPE_CHECKING:
    _SharedFields = _CrossChecked
    _PresetFields = SamplerFieldsBase
else:
    _SharedFields = create_model(
        "_SharedFields",
        __base__=_CrossChecked,
        **request_fields(Surface.OPENAI | Surface.KOBOLD),
    )
    _PresetFields = create_model(
        "_PresetFields", __base__=SamplerFieldsBase, **request_fields(Surface.PRESET)
    )


class SamplerRequest(_SharedFields):
    """Generation fields common to /v1/completions, /v1/chat/completions and Kobold."""


class PresetValues(_PresetFields):
    """The parameters a sampler override preset may set, validated like a request's fields."""


_PRESET_ROWS = params_for(Surface.PRESET)

# Values used when neither the request nor the override preset sets a field.
FALLBACKS: dict[str, Any] = {p.name: p.fallback for p in _PRESET_ROWS}

SAMPLER_FIELDS = frozenset(FALLBACKS)
if not shared_names() >= SAMPLER_FIELDS:
    raise RuntimeError("sampler table: a preset parameter must be accepted by every request")


def alias_map() -> dict[str, str]:
    """Every accepted JSON name of a sampler field (aliases included) → the field name."""
    names: dict[str, str] = {}
    for p in _PRESET_ROWS:
        for choice in p.names:
            names.setdefault(choice, p.name)
    return names


def _as_list(name: str, value: Any) -> list[Any]:
    if isinstance(value, str):
        if name in ("banned_tokens", "allowed_tokens"):
            return [int(p) for p in (x.strip() for x in value.split(",")) if p.isdigit()]
        return [value] if value else []
    return list(value)


def apply_override(name: str, sent: Any, rule: dict[str, Any]) -> Any:
    """One field's value under a preset rule; `sent` is None when the request left it out.

    Forced: the override, whatever was sent — a forced 0, false, [] or "" is still forced
    (upstream skips falsy forced values; we don't). Additive (not forced): a list override is
    prepended to the sent list; a mapping override (logit_bias) is merged under the sent one.
    Otherwise the override is the default for a field the request did not send.
    """
    override = rule["override"]
    if rule.get("force"):
        return override
    if sent is None:
        return override
    if rule.get("additive"):
        if isinstance(override, list) and isinstance(sent, str | list | tuple):
            return list(override) + _as_list(name, sent)
        if isinstance(override, dict) and isinstance(sent, dict):
            return {**override, **sent}
    return sent


def sampler_problem(values: dict[str, Any]) -> tuple[str, str] | None:
    """The first contradictory or unusable combination as (field, message), else None.

    Only active settings are checked: a neutral value never causes an error, and temperature 0
    (greedy) makes every later stage moot, so it never conflicts with them.
    """
    greedy = float(values["temperature"]) <= 0.0 or int(values["top_k"]) == 1
    mirostat = int(values["mirostat_mode"]) in (1, 2)
    adaptive = float(values["adaptive_target"]) < 1.0
    skew = float(values["skew"]) != 0.0
    if float(values["dry_multiplier"]) > 0.0 and float(values["dry_base"]) < 1.0:
        return "dry_base", (
            "dry_base must be at least 1 when dry_multiplier > 0 (DRY's penalty is multiplier·base^excess)"
        )
    if adaptive and float(values["adaptive_decay"]) > 0.99:
        return "adaptive_decay", (
            "adaptive_decay must be at most 0.99 when adaptive-P is on (adaptive_target < 1)"
        )
    if greedy:
        return None
    if mirostat and adaptive:
        return "adaptive_target", (
            "adaptive-P (adaptive_target < 1) and mirostat both choose the token: use one"
        )
    if skew and mirostat:
        return "skew", "skew shapes the final random draw and cannot be combined with mirostat"
    if skew and adaptive:
        return "skew", (
            "skew shapes the final random draw and cannot be combined with adaptive-P (adaptive_target < 1)"
        )
    return None
