"""Counting failed HTTP requests by kind (`kodkod:request_errors_total{reason}`), pure ASGI.

One count per failed HTTP exchange, decided when it ends, first match wins:
1. `client_disconnect`: the client went away before the answer ended (the server read
   `http.disconnect` from it, or sending to it failed);
2. what the exchange's generations reported (an engine `ErrorEvent`, also one sent inside a
   200 event stream): `bad_request` for a refused request, `engine` for a failed one — the
   generation taps write it into the `RequestOutcome` this middleware puts in the scope;
3. the status: 429 `overload`, 5xx `engine`, any other 4xx but 401/403 `bad_request` (a wrong
   or missing key is not counted).
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kodkod.api.metrics.service import ErrorReason, RequestOutcome, ServerMetrics
from kodkod.engine.stream import RequestStream

SCOPE_KEY = "kodkod.outcome"


def outcome_of(request: Request) -> RequestOutcome | None:
    """The outcome record of this HTTP request (None when metrics are off)."""
    outcome = request.scope.get(SCOPE_KEY)
    return outcome if isinstance(outcome, RequestOutcome) else None


def reason_of_status(status: int) -> ErrorReason | None:
    if status == 429:
        return ErrorReason.OVERLOAD
    if status >= 500:
        return ErrorReason.ENGINE
    if 400 <= status < 500 and status not in (401, 403):
        return ErrorReason.BAD_REQUEST
    return None


class RequestErrorsMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        outcome = RequestOutcome()
        scope[SCOPE_KEY] = outcome
        status = 0
        ended = False  # the last body message was handed to the server
        disconnected = False

        async def watch_receive() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect" and not ended:
                disconnected = True
            return message

        async def watch_send(message: Message) -> None:
            nonlocal status, ended, disconnected
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True  # before sending: a disconnect read after this is the normal end
            try:
                await send(message)
            except OSError:
                disconnected = True
                raise

        try:
            await self.app(scope, watch_receive, watch_send)
        except Exception:
            if status == 0:
                status = 500  # unhandled: the outermost error middleware answers 500
            raise
        finally:
            reason = (
                ErrorReason.CLIENT_DISCONNECT if disconnected else outcome.error or reason_of_status(status)
            )
            if reason is not None:
                self._metrics.record_error(reason)


def track_streams(
    request: Request, model_name: str, streams: Iterable[RequestStream], *, choices_per_prompt: int = 1
) -> None:
    """Record these generations of `request` in the server's metrics (nothing when off); each
    prompt's first choice counts the prompt, as the answer's `usage` does."""
    metrics: ServerMetrics | None = request.app.state.kodkod.metrics
    if metrics is None:
        return
    outcome = outcome_of(request)
    for i, stream in enumerate(streams):
        metrics.track(stream, model_name, outcome, counts_prompt=i % choices_per_prompt == 0)
