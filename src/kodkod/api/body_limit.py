"""Request body size limit: a pure ASGI middleware, outermost, so it runs before authentication.

A request whose `Content-Length` exceeds `limits.max_request_body_bytes` is answered 413 (OpenAI
error shape) without reading a byte of its body. A body without a length (chunked) is counted
as it streams in: once it passes the limit, reading stops and the request is answered 413 (if
the app reads the body through FastAPI, the 413 surfaces as an HTTPException; if the response
has not started when the exception reaches this middleware, the middleware answers itself).
"""

from __future__ import annotations

import json

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kodkod.api.errors import error_body


class BodyTooLarge(HTTPException):
    """The request body passed the configured limit while it was being read."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(413, too_large_message(limit_bytes))


def too_large_message(limit_bytes: int) -> str:
    return f"the request body is larger than the server's limit of {limit_bytes} bytes"


class BodySizeLimitMiddleware:
    """Refuse request bodies larger than `max_bytes` with 413, before anything reads them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _send_413(send, self.max_bytes)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await _send_413(send, self.max_bytes)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(send: Send, limit_bytes: int) -> None:
    body = json.dumps(error_body(413, too_large_message(limit_bytes), code="request_too_large")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
