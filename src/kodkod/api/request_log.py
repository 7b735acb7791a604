"""What the `logging` config section logs: requests, prompts and responses, sampler settings.

- `log_requests`: one line per HTTP request (method, path and query, client address, headers)
  from `RequestLogMiddleware`, next to uvicorn's access line (status; `RedactAccessLog`
  redacts its query string). Bodies are not logged
  here: the part of a body worth reading is the prompt, which `log_prompt` logs as the model
  sees it.
- `log_prompt`: each generation's prompt as the model receives it (chat template applied,
  special tokens shown) when it is submitted, and its generated text when it finishes.
- `log_generation_params`: each generation's sampler settings and limits when it is submitted.

Key material is never logged: the `authorization`, `x-api-key`, `x-admin-key`, cookie and
proxy headers are shown as `<redacted>`, and so is any query parameter whose name mentions a
key, token, secret or password. Texts are logged with `repr()`, so a prompt cannot forge log
lines.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from kodkod.core.types import (
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationRequest,
    TokenEvent,
)
from kodkod.engine.backend import Tokenizer
from kodkod.engine.stream import RequestStream
from kodkod.settings.sections import LoggingSettings

log = logging.getLogger("kodkod.requests")

REDACTED = "<redacted>"
SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "x-admin-key",
        "cookie",
        "set-cookie",
    }
)
_SECRET_WORDS = ("key", "token", "secret", "password", "auth")


def _secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def redact_query(query: str) -> str:
    """The query string with the values of secret-looking parameters replaced."""
    if not query:
        return ""
    parts = []
    for item in query.split("&"):
        name, sep, _ = item.partition("=")
        parts.append(f"{name}={REDACTED}" if sep and _secret_name(name) else item)
    return "&".join(parts)


def redact_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    out = []
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        value = REDACTED if name in SECRET_HEADERS else raw_value.decode("latin-1")
        out.append((name, value))
    return out


class RedactAccessLog(logging.Filter):
    """On uvicorn's access logger: secret-looking query parameters are redacted there too."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            path, sep, query = args[2].partition("?")
            if sep:
                record.args = (*args[:2], f"{path}?{redact_query(query)}", *args[3:])
        return True


def install_access_log_redaction() -> None:
    """Redact uvicorn's access lines (call after uvicorn configured its loggers)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactAccessLog) for f in access.filters):
        access.addFilter(RedactAccessLog())


class RequestLogMiddleware:
    """`log_requests`: log each HTTP request line and its headers (keys redacted)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query = redact_query(scope.get("query_string", b"").decode("latin-1"))
            client = scope.get("client")
            log.info(
                "%s %r from %s headers=%r",
                scope.get("method", "?"),
                scope.get("path", "") + (f"?{query}" if query else ""),
                f"{client[0]}:{client[1]}" if client else "?",
                redact_headers(scope.get("headers", ())),
            )
        await self.app(scope, receive, send)


def _params_text(gen: GenerationRequest) -> str:
    sampling = {f.name: getattr(gen.sampling, f.name) for f in dataclasses.fields(gen.sampling)}
    limits = {
        "max_tokens": gen.max_tokens,
        "min_tokens": gen.min_tokens,
        "stop": gen.stop_strings,
        "stop_token_ids": gen.stop_token_ids,
        "ban_eos_token": gen.ban_eos_token,
        "banned_strings": gen.banned_strings,
        "logprobs": gen.logprobs,
        "cfg_scale": gen.cfg_scale,
        "adapters": gen.adapters,
        "constrained": gen.constraint is not None,
    }
    return ", ".join(f"{k}={v!r}" for k, v in {**sampling, **limits}.items())


@dataclasses.dataclass(slots=True)
class _ResponseLog:
    """Collects one generation's text and logs it when the generation ends."""

    request_id: str
    pieces: list[str] = dataclasses.field(default_factory=list)

    def __call__(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, TokenEvent):
                self.pieces.append(ev.text)
            elif isinstance(ev, FinishEvent):
                log.info("response %s (%s): %r", self.request_id, ev.reason.value, "".join(self.pieces))
            elif isinstance(ev, ErrorEvent):
                log.info("response %s (error): %r", self.request_id, "".join(self.pieces))


def log_generation(
    settings: LoggingSettings, gen: GenerationRequest, stream: RequestStream, tokenizer: Tokenizer
) -> None:
    """Log a submitted generation as `settings` asks (prompt now, response when it ends)."""
    if settings.log_prompt:
        prompt = tokenizer.detokenize(gen.prompt_ids, special=True)
        log.info("prompt %s: %r", gen.request_id, prompt)
        stream.add_tap(_ResponseLog(gen.request_id))
    if settings.log_generation_params:
        log.info("generation params %s: %s", gen.request_id, _params_text(gen))
