"""uvicorn's httptools protocol plus the two limits uvicorn lacks for a request's head.

uvicorn times out idle keep-alive connections only after a response, and with httptools it
has no bound on header size. `bounded_http_protocol(...)` returns a subclass of its
`HttpToolsProtocol` (the class `uvicorn.Config(http=...)` accepts) that

- closes a connection whose request line and headers are not complete `header_timeout_s`
  after the connection opened or the request began (a slow client cannot hold connections by
  trickling headers), and
- answers 431 and closes when a request's head passes `max_header_bytes` (checked on the
  parsed head when it completes, and on the bytes received while it is still incomplete).

It relies on uvicorn's protocol callbacks (`connection_made`, `data_received`,
`on_message_begin`, `on_headers_complete`, `on_body`, `on_message_complete`,
`connection_lost`); the uvicorn version is pinned in pyproject.toml.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kodkod.api.errors import error_body


def bounded_http_protocol(header_timeout_s: float, max_header_bytes: int) -> type[HttpToolsProtocol]:
    """An HttpToolsProtocol subclass enforcing the two limits above."""

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_timer: asyncio.TimerHandle | None = None
            self._in_head = True  # reading a request line and headers
            self._head_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._in_head and self._head_bytes > max_header_bytes:
                self._refuse_head()  # a head still incomplete after that many bytes

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._head_timer is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            self._in_head = False
            self._head_bytes = 0
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > max_header_bytes:  # a head that arrived whole
                self._refuse_head()
                return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self.transport.is_closing():  # not after a refused head
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self.transport.is_closing():  # a refused head: no request cycle to complete
                return
            super().on_message_complete()
            self._in_head = True  # whatever comes next is the head of the next request

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._in_head and not self.transport.is_closing():
                self.logger.info(
                    "closing a connection that sent no complete request head within %s s", header_timeout_s
                )
                self.transport.close()

        def _refuse_head(self) -> None:
            self._disarm()
            if self.transport.is_closing():
                return
            message = f"the request line and headers are larger than {max_header_bytes} bytes"
            body = json.dumps(error_body(431, message, code="headers_too_large")).encode()
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                b"content-type: application/json\r\nconnection: close\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            self.transport.close()

    return BoundedHttpToolsProtocol
