"""The one declaration of every generation (sampler) parameter.

`SAMPLER_TABLE` lists each parameter once: its field name, the other JSON names it is accepted
under, its value type, bounds, the fallback used when neither the request nor the override
preset sets it, the API surfaces that accept it, and how it reaches the engine. Everything else
is derived from it:

- the request models: `api.sampling.SamplerRequest` (fields every generation surface shares)
  and the Kobold-only fields of `api.kobold.schemas.KoboldGenerateRequest` (`request_fields`);
- the preset side: `FALLBACKS`, `PRESET_FIELDS` and the model a preset value is validated with
  (`api.sampling.PresetValues`); a preset key may be any name of a `PRESET` parameter;
- the engine side: `engine_kwargs` builds the keyword arguments of `SamplingParams` from the
  resolved values (every `SamplingParams` field is set by exactly one row). Parameters without an
  `engine` field are consumed by `api.convert.build_generation` (request-level settings such as
  `max_tokens`, `stop`) or by the surface's own conversion (Kobold's `dynatemp_range`, …).

Bounds are pydantic's: a value outside them is a 422 naming the field, on every surface that
accepts the parameter and in a preset (there a 400 naming the file and key). Integers must also
fit a C int (except `seed`), because they reach llama.cpp.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, AliasChoices, BaseModel, BeforeValidator, Field

from kodkod.api.errors import ApiError
from kodkod.api.validation import REQUEST_CONFIG, Name

INT32_MAX = 2**31 - 1


class Surface(enum.Flag):
    """Where a parameter is accepted."""

    OPENAI = enum.auto()  # /v1/completions, /v1/chat/completions
    KOBOLD = enum.auto()  # /api/v1/generate, /api/extra/generate/stream
    PRESET = enum.auto()  # sampler override presets (files and /v1/sampling/override/switch)


ALL = Surface.OPENAI | Surface.KOBOLD | Surface.PRESET
KOBOLD_ONLY = Surface.KOBOLD


# ---- normalisers (run by pydantic on the field, before or after type validation) ----------


def _top_k(value: int | None) -> int | None:
    return 0 if value == -1 else value


def _logprobs(value: Any) -> Any:
    if value is True:
        return 1
    if value is False:
        return 0
    return value


def _breakers(value: Any) -> Any:
    """A string is a JSON array, brackets optional; one that does not parse means []."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if not text.startswith("["):
            text = f"[{text}]"
        try:
            parsed = json.loads(text)
        except ValueError:
            return []
        return [str(x) for x in parsed] if isinstance(parsed, list) else []
    return value


def _json_schema(value: Any) -> Any:
    if value == {} or value == "":
        return None  # SillyTavern sends {} for "no schema"
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError("json_schema must be a JSON object") from None
    return value


# ---- engine conversions (resolved value → SamplingParams field) ---------------------------


def id_list(value: Any, field: str) -> list[int]:
    """Token ids from a list or a "1,2,3" string (non-digits skipped); 422 for a non-id item."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [int(part) for part in (p.strip() for p in value.split(",")) if part.isdigit()]
    out = []
    for item in value:
        try:
            out.append(int(item))
        except (TypeError, ValueError):
            raise ApiError(422, f"{field} must be a list of token ids") from None
    return out


def _bias(value: Any) -> dict[int, float]:
    bias: dict[int, float] = {}
    for key, b in (value or {}).items():
        try:
            tok = int(key)
        except (TypeError, ValueError):
            continue
        bias[tok] = float(b)  # ids outside the vocabulary: 400 from EngineClient.check
    return bias


def _seed(value: Any) -> int | None:
    return int(value) if value is not None and int(value) >= 0 else None


@dataclass(frozen=True, slots=True)
class SamplerParam:
    """One generation parameter. `annotation` is its value type (None is always allowed, and
    means "not sent"); `ge`/`gt`/`le` are its bounds; `engine` names the `SamplingParams` field
    it sets, converted by `to_engine` (default: the plain type of `annotation`)."""

    name: str
    annotation: Any
    fallback: Any = None
    aliases: tuple[str, ...] = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    surfaces: Surface = ALL
    engine: str | None = None
    to_engine: Callable[[Any], Any] | None = None
    before: Callable[[Any], Any] | None = None
    after: Callable[[Any], Any] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Every JSON name the parameter is accepted under, its own first."""
        return (self.name, *self.aliases)

    def engine_value(self, value: Any) -> Any:
        if self.to_engine is not None:
            return self.to_engine(value)
        if self.annotation in (int, float, bool):
            return self.annotation(value)
        return value

    def field_spec(self) -> tuple[Any, Any]:
        """(annotation, FieldInfo) for `pydantic.create_model`."""
        annotation: Any = self.annotation if self.annotation is Any else self.annotation | None
        extras: list[Any] = []
        if self.before is not None:
            extras.append(BeforeValidator(self.before))
        if self.after is not None:
            extras.append(AfterValidator(self.after))
        if extras:
            annotation = Annotated[(annotation, *extras)]
        alias = AliasChoices(*self.names) if self.aliases else None
        info = Field(None, ge=self.ge, gt=self.gt, le=self.le, validation_alias=alias)
        return annotation, info


class RequestLora(BaseModel):
    """One LoRA adapter a request runs with (kodkod extension; see engine/adapters.py)."""

    model_config = REQUEST_CONFIG
    name: Name = Field(min_length=1)
    scaling: float = Field(1.0, ge=0.0)


P = SamplerParam

SAMPLER_TABLE: tuple[SamplerParam, ...] = (
    P("max_tokens", int, None, ("max_length", "max_completion_tokens"), ge=0),
    P("min_tokens", int, 0, ("min_length",), ge=0),
    P("stop", str | list[str | int], [], ("stop_sequence",)),
    P("banned_strings", str | list[str], []),
    P(
        "banned_tokens",
        list[int] | str,
        [],
        ("custom_token_bans",),
        engine="banned_token_ids",
        to_engine=lambda v: id_list(v, "banned_tokens"),
    ),
    P(
        "allowed_tokens",
        list[int] | str,
        [],
        ("allowed_token_ids",),
        engine="allowed_token_ids",
        to_engine=lambda v: id_list(v, "allowed_tokens"),
    ),
    P("token_healing", bool, False),
    P("temperature", float, 1.0, ge=0.0, le=10.0, engine="temperature"),
    P("temperature_last", bool, False, engine="temperature_last"),
    P("smoothing_factor", float, 0.0, ge=0.0, engine="smoothing_factor"),
    P("smoothing_curve", float, 1.0, gt=0.0, engine="smoothing_curve"),
    P("top_k", int, 0, ge=-1, engine="top_k", after=_top_k),
    P("top_p", float, 1.0, ge=0.0, le=1.0, engine="top_p"),
    P("top_a", float, 0.0, ge=0.0, engine="top_a"),
    P("top_n_sigma", float, 0.0, ("nsigma",), ge=0.0, engine="top_n_sigma"),
    P("min_p", float, 0.0, ge=0.0, le=1.0, engine="min_p"),
    P("tfs", float, 1.0, ge=0.0, le=1.0, engine="tfs"),
    P("typical", float, 1.0, ("typical_p",), gt=0.0, le=1.0, engine="typical"),
    P("skew", float, 0.0, engine="skew"),
    P("xtc_probability", float, 0.0, ge=0.0, le=1.0, engine="xtc_probability"),
    P("xtc_threshold", float, 0.1, ge=0.0, le=1.0, engine="xtc_threshold"),
    # TabbyAPI rejects negative penalties; we accept OpenAI's -2 floor, no ceiling
    # (docs/compatibility.md).
    P("frequency_penalty", float, 0.0, ge=-2.0, engine="frequency_penalty"),
    P("presence_penalty", float, 0.0, ge=-2.0, engine="presence_penalty"),
    P("repetition_penalty", float, 1.0, ("rep_pen",), gt=0.0, engine="repetition_penalty"),
    P(
        "penalty_range",
        int,
        -1,
        ("repetition_range", "repetition_penalty_range", "rep_pen_range"),
        ge=-1,
        engine="penalty_range",
    ),
    P("repetition_decay", int, 0, ge=0, engine="repetition_decay"),
    P("dry_multiplier", float, 0.0, ge=0.0, engine="dry_multiplier"),
    P("dry_base", float, 1.75, ge=0.0, engine="dry_base"),
    P("dry_allowed_length", int, 2, ge=0, engine="dry_allowed_length"),
    P("dry_range", int, 0, ("dry_penalty_last_n",), ge=-1, engine="dry_range"),
    P(
        "dry_sequence_breakers",
        list[str] | str,
        ["\n", ":", '"', "*"],
        engine="dry_sequence_breakers",
        to_engine=lambda v: list(v or []),
        before=_breakers,
    ),
    P("mirostat_mode", int, 0, ("mirostat",), ge=0, le=2, engine="mirostat_mode"),
    P("mirostat_tau", float, 1.5, ge=0.0, engine="mirostat_tau"),
    P("mirostat_eta", float, 0.3, ge=0.0, engine="mirostat_eta"),
    P("max_temp", float, 1.0, ("dynatemp_high",), ge=0.0, engine="max_temp"),
    P("min_temp", float, 1.0, ("dynatemp_low",), ge=0.0, engine="min_temp"),
    P("temp_exponent", float, 1.0, ("dynatemp_exponent",), ge=0.0, engine="temp_exponent"),
    P("add_bos_token", bool, None),
    P("ban_eos_token", bool, False, ("ignore_eos",)),
    P("skip_special_tokens", bool, True),
    P("logit_bias", dict[int, float], None, engine="logit_bias", to_engine=_bias),
    P("negative_prompt", str, None),
    P("cfg_scale", float, 1.0, ("guidance_scale",)),
    P("json_schema", Any, None, before=_json_schema),
    P("regex_pattern", str, None),
    P("grammar_string", str, None),
    P("speculative_ngram", bool, None),
    P("logprobs", int, 0, ge=0, before=_logprobs),
    P("top_logprobs", int, 0, ge=0, le=20),
    P("adaptive_target", float, 1.0, ge=0.0, le=1.0, engine="adaptive_target"),
    P("adaptive_decay", float, 0.9, ge=0.0, le=1.0, engine="adaptive_decay"),
    P("loop_detect_window", int, 800, ge=0),
    P("seed", int, None, ("sampler_seed",), engine="seed", to_engine=_seed),
    # kodkod extension: this request's LoRA adapters from lora_dir with their scaling, instead
    # of the active ones (/v1/lora/load); [] = the base model.
    P("loras", list[RequestLora], None),
    # Kobold-only fields; their meaning is mapped in api.kobold.
    P("dynatemp_range", float, None, surfaces=KOBOLD_ONLY),
    P("use_default_badwordsids", bool, None, surfaces=KOBOLD_ONLY),
    P("bypass_eos", bool, None, surfaces=KOBOLD_ONLY),
    P("trim_stop", bool, None, surfaces=KOBOLD_ONLY),
    P("render_special", bool, None, surfaces=KOBOLD_ONLY),
    P("singleline", bool, None, surfaces=KOBOLD_ONLY),
    P("grammar", str, None, surfaces=KOBOLD_ONLY),
)

GENERATION_SURFACES = Surface.OPENAI | Surface.KOBOLD


def params_for(surface: Surface) -> tuple[SamplerParam, ...]:
    """The rows a surface accepts."""
    return tuple(p for p in SAMPLER_TABLE if surface in p.surfaces)


def request_fields(
    surface: Surface, *, exclude: frozenset[str] = frozenset(), extra: tuple[SamplerParam, ...] = ()
) -> dict[str, Any]:
    """`create_model` field specs of the rows `surface` accepts (and `extra`), minus `exclude`."""
    rows = (*params_for(surface), *extra)
    return {p.name: p.field_spec() for p in rows if p.name not in exclude}


def shared_names() -> frozenset[str]:
    """Fields every generation surface accepts (the shared SamplerRequest)."""
    return frozenset(p.name for p in SAMPLER_TABLE if GENERATION_SURFACES in p.surfaces)


def engine_kwargs(values: dict[str, Any], table: tuple[SamplerParam, ...]) -> dict[str, Any]:
    """Keyword arguments of `SamplingParams` from resolved values."""
    return {p.engine: p.engine_value(values[p.name]) for p in table if p.engine is not None}
