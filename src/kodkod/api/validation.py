"""Edge validation shared by every request schema: finite numbers, safe names, request limits.

- `REQUEST_CONFIG`: the pydantic config of request bodies. `allow_inf_nan=False` turns a JSON
  `NaN` / `Infinity` (Python's json accepts them) in any float field into a 422 that names the
  field, instead of a crash deep in the sampler.
- `Name`: a string field that names a file-backed thing (model, template, preset, LoRA). A NUL
  byte in it is a 422 (the OS refuses such paths with a ValueError, which would be a 500).
- `check_generation_limits`: the `limits` section applied to resolved sampler values
  (logprobs, stop strings, banned strings, DRY sequence breakers): a 400 naming the field.
- `check_choices`: prompts × n of one request against `limits.max_choices_per_request` (400).
- `check_queue`: 429 with Retry-After when the engine's waiting requests would pass
  `limits.max_waiting_requests`. Callers check and submit without awaiting in between, so
  the count cannot change under them (the event loop runs one handler at a time).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict

from kodkod.api.errors import ApiError
from kodkod.engine.client import EngineClient
from kodkod.settings import LimitsSettings

REQUEST_CONFIG = ConfigDict(extra="ignore", allow_inf_nan=False)


def no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


Name = Annotated[str, AfterValidator(no_nul)]


def _strings(value: Any) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)]


def _check_strings(field: str, value: Any, max_count: int, max_chars: int) -> None:
    strings = _strings(value)
    if len(strings) > max_count:
        raise ApiError(
            400, f"{field}: at most {max_count} strings are allowed, got {len(strings)}", param=field
        )
    for s in strings:
        if len(s) > max_chars:
            raise ApiError(
                400,
                f"{field}: each string may have at most {max_chars} characters, got one with {len(s)}",
                param=field,
            )


def check_generation_limits(values: dict[str, Any], limits: LimitsSettings) -> None:
    """400 if the resolved sampler values ask for more than `limits` allows."""
    for field in ("logprobs", "top_logprobs"):
        n = values.get(field)
        if isinstance(n, int) and not isinstance(n, bool) and n > limits.max_logprobs:
            raise ApiError(400, f"{field} must be at most {limits.max_logprobs}, got {n}", param=field)
    _check_strings("stop", values.get("stop"), limits.max_stop_strings, limits.max_stop_string_chars)
    _check_strings(
        "banned_strings",
        values.get("banned_strings"),
        limits.max_banned_strings,
        limits.max_banned_string_chars,
    )
    _check_strings(
        "dry_sequence_breakers",
        values.get("dry_sequence_breakers"),
        limits.max_stop_strings,
        limits.max_stop_string_chars,
    )


def check_choices(count: int, limits: LimitsSettings) -> None:
    """400 if one request asks for more choices (prompts × n) than the limit."""
    if count > limits.max_choices_per_request:
        raise ApiError(
            400,
            f"this request asks for {count} choices (prompts × n); at most "
            f"{limits.max_choices_per_request} are allowed",
            param="n",
        )


def check_queue(engine: EngineClient, count: int, limits: LimitsSettings) -> None:
    """429 if submitting `count` more requests would leave more than the limit waiting."""
    in_flight = engine.in_flight + count
    waiting = max(0, in_flight - engine.config.max_batch_size)
    if count and waiting > limits.max_waiting_requests:
        raise ApiError(
            429,
            "the server has too many requests waiting for the model; retry later",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(limits.queue_full_retry_after_s)},
        )
