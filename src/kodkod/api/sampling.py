"""The generation-parameter schema shared by the OpenAI and Kobold APIs.

Every field defaults to None, meaning "not sent": the value used is then the sampler override
preset's or the fallback in `FALLBACKS`. Aliases are accepted in one place here
(`validation_alias`). Range violations are 422s. Unknown fields are ignored, like TabbyAPI.
Every known field is honoured (stage order: `engine.sampling.stages`); combinations that
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

import json
from typing import Any

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kodkod.api.validation import REQUEST_CONFIG, Name

INT32_MAX = 2**31 - 1


def _alias(*names: str) -> Any:
    return Field(None, validation_alias=AliasChoices(*names))


class RequestLora(BaseModel):
    """One LoRA adapter a request runs with (kodkod extension; see engine/adapters.py)."""

    model_config = REQUEST_CONFIG
    name: Name = Field(min_length=1)
    scaling: float = Field(1.0, ge=0.0)


class SamplerRequest(BaseModel):
    """Generation fields common to /v1/completions, /v1/chat/completions and Kobold."""

    model_config = ConfigDict(**REQUEST_CONFIG, populate_by_name=True)

    max_tokens: int | None = Field(
        None, ge=0, validation_alias=AliasChoices("max_tokens", "max_length", "max_completion_tokens")
    )
    min_tokens: int | None = Field(None, ge=0, validation_alias=AliasChoices("min_tokens", "min_length"))
    stop: str | list[str | int] | None = _alias("stop", "stop_sequence")
    banned_strings: str | list[str] | None = None
    banned_tokens: list[int] | str | None = _alias("banned_tokens", "custom_token_bans")
    allowed_tokens: list[int] | str | None = _alias("allowed_tokens", "allowed_token_ids")
    token_healing: bool | None = None
    temperature: float | None = Field(None, ge=0.0, le=10.0)
    temperature_last: bool | None = None
    smoothing_factor: float | None = Field(None, ge=0.0)
    smoothing_curve: float | None = Field(None, gt=0.0)
    top_k: int | None = Field(None, ge=-1)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_a: float | None = Field(None, ge=0.0)
    top_n_sigma: float | None = Field(
        None, ge=0.0, validation_alias=AliasChoices("top_n_sigma", "nsigma")
    )
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    tfs: float | None = Field(None, ge=0.0, le=1.0)
    typical: float | None = Field(None, gt=0.0, le=1.0, validation_alias=AliasChoices("typical", "typical_p"))
    skew: float | None = None
    xtc_probability: float | None = Field(None, ge=0.0, le=1.0)
    xtc_threshold: float | None = Field(None, ge=0.0, le=1.0)
    # TabbyAPI rejects negative values; we accept OpenAI's -2 floor, no ceiling (docs/compatibility.md).
    frequency_penalty: float | None = Field(None, ge=-2.0)
    presence_penalty: float | None = Field(None, ge=-2.0)
    repetition_penalty: float | None = Field(
        None, gt=0.0, validation_alias=AliasChoices("repetition_penalty", "rep_pen")
    )
    penalty_range: int | None = Field(
        None,
        ge=-1,
        validation_alias=AliasChoices(
            "penalty_range", "repetition_range", "repetition_penalty_range", "rep_pen_range"
        ),
    )
    repetition_decay: int | None = Field(None, ge=0)
    dry_multiplier: float | None = Field(None, ge=0.0)
    dry_base: float | None = Field(None, ge=0.0)
    dry_allowed_length: int | None = Field(None, ge=0)
    dry_range: int | None = Field(None, ge=-1,
                                  validation_alias=AliasChoices("dry_range", "dry_penalty_last_n"))
    dry_sequence_breakers: list[str] | str | None = None
    mirostat_mode: int | None = Field(None, ge=0, le=2,
                                      validation_alias=AliasChoices("mirostat_mode", "mirostat"))
    mirostat_tau: float | None = Field(None, ge=0.0)
    mirostat_eta: float | None = Field(None, ge=0.0)
    max_temp: float | None = Field(None, ge=0.0, validation_alias=AliasChoices("max_temp", "dynatemp_high"))
    min_temp: float | None = Field(None, ge=0.0, validation_alias=AliasChoices("min_temp", "dynatemp_low"))
    temp_exponent: float | None = Field(
        None, ge=0.0, validation_alias=AliasChoices("temp_exponent", "dynatemp_exponent")
    )
    add_bos_token: bool | None = None
    ban_eos_token: bool | None = _alias("ban_eos_token", "ignore_eos")
    skip_special_tokens: bool | None = None
    logit_bias: dict[int, float] | None = None
    negative_prompt: str | None = None
    cfg_scale: float | None = Field(None, validation_alias=AliasChoices("cfg_scale", "guidance_scale"))
    json_schema: Any = None
    regex_pattern: str | None = None
    grammar_string: str | None = None
    speculative_ngram: bool | None = None
    logprobs: int | None = Field(None, ge=0)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    adaptive_target: float | None = Field(None, ge=0.0, le=1.0)
    adaptive_decay: float | None = Field(None, ge=0.0, le=1.0)
    loop_detect_window: int | None = Field(None, ge=0)
    seed: int | None = Field(None, validation_alias=AliasChoices("seed", "sampler_seed"))
    # kodkod extension: this request's LoRA adapters from lora_dir with their scaling, instead
    # of the active ones (/v1/lora/load); [] = the base model.
    loras: list[RequestLora] | None = None

    @field_validator("*")
    @classmethod
    def _int32(cls, v: Any, info: ValidationInfo) -> Any:
        """Integers reach llama.cpp as C ints: one that does not fit is a 422, not a crash."""
        if (isinstance(v, int) and not isinstance(v, bool) and info.field_name != "seed"
                and not -INT32_MAX <= v <= INT32_MAX):
            raise ValueError(f"must be between {-INT32_MAX} and {INT32_MAX}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        return 0 if v == -1 else v

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs(cls, v: Any) -> Any:
        if v is True:
            return 1
        if v is False:
            return 0
        return v

    @field_validator("dry_sequence_breakers", mode="before")
    @classmethod
    def _breakers(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            if not text:
                return []
            if not text.startswith("["):
                text = f"[{text}]"
            try:
                parsed = json.loads(text)
            except ValueError:
                return []
            return [str(x) for x in parsed] if isinstance(parsed, list) else []
        return v

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema(cls, v: Any) -> Any:
        if v == {} or v == "":
            return None  # SillyTavern sends {} for "no schema"
        if isinstance(v, str):
            try:
                return json.loads(v)
            except ValueError:
                raise ValueError("json_schema must be a JSON object") from None
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> SamplerRequest:
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


# Values used when neither the request nor the override preset sets a field.
FALLBACKS: dict[str, Any] = {
    "max_tokens": None,
    "min_tokens": 0,
    "stop": [],
    "banned_strings": [],
    "banned_tokens": [],
    "allowed_tokens": [],
    "token_healing": False,
    "temperature": 1.0,
    "temperature_last": False,
    "smoothing_factor": 0.0,
    "smoothing_curve": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "top_a": 0.0,
    "top_n_sigma": 0.0,
    "min_p": 0.0,
    "tfs": 1.0,
    "typical": 1.0,
    "skew": 0.0,
    "xtc_probability": 0.0,
    "xtc_threshold": 0.1,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "penalty_range": -1,
    "repetition_decay": 0,
    "dry_multiplier": 0.0,
    "dry_base": 1.75,
    "dry_allowed_length": 2,
    "dry_range": 0,
    "dry_sequence_breakers": ["\n", ":", '"', "*"],
    "mirostat_mode": 0,
    "mirostat_tau": 1.5,
    "mirostat_eta": 0.3,
    "max_temp": 1.0,
    "min_temp": 1.0,
    "temp_exponent": 1.0,
    "add_bos_token": None,
    "ban_eos_token": False,
    "skip_special_tokens": True,
    "logit_bias": None,
    "negative_prompt": None,
    "cfg_scale": 1.0,
    "json_schema": None,
    "regex_pattern": None,
    "grammar_string": None,
    "speculative_ngram": None,
    "logprobs": 0,
    "top_logprobs": 0,
    "adaptive_target": 1.0,
    "adaptive_decay": 0.9,
    "loop_detect_window": 800,
    "seed": None,
    "loras": None,
}

SAMPLER_FIELDS = frozenset(FALLBACKS)


def alias_map() -> dict[str, str]:
    """Every accepted JSON name of a sampler field (aliases included) → the field name."""
    names: dict[str, str] = {}
    for name, info in SamplerRequest.model_fields.items():
        if name not in SAMPLER_FIELDS:
            continue
        names[name] = name
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            for choice in alias.choices:
                if isinstance(choice, str):
                    names.setdefault(choice, name)
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
        return "dry_base", ("dry_base must be at least 1 when dry_multiplier > 0 "
                            "(DRY's penalty is multiplier·base^excess)")
    if adaptive and float(values["adaptive_decay"]) > 0.99:
        return "adaptive_decay", ("adaptive_decay must be at most 0.99 when adaptive-P is on "
                                  "(adaptive_target < 1)")
    if greedy:
        return None
    if mirostat and adaptive:
        return "adaptive_target", ("adaptive-P (adaptive_target < 1) and mirostat both choose "
                                   "the token: use one")
    if skew and mirostat:
        return "skew", "skew shapes the final random draw and cannot be combined with mirostat"
    if skew and adaptive:
        return "skew", ("skew shapes the final random draw and cannot be combined with "
                        "adaptive-P (adaptive_target < 1)")
    return None
