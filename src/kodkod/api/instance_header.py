"""`X-Kodkod-Instance` on every HTTP response: which server process answered (pure ASGI).

Behind a load balancer (scripts/cluster.sh puts HAProxy in front of several replicas) a client
sees which replica served each request. The name is `network.instance_name`, or, when that is
empty, `<this machine's host name>:<the port the request came in on>`. The middleware is the
outermost one, so refusals by the other middlewares (400 for a foreign Host, 413, 401) carry the
header too, as do error responses and streams (the header goes out with the response start).
"""

from __future__ import annotations

import socket

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-kodkod-instance"


def default_instance_name(host_name: str, scope: Scope) -> str:
    """`host_name:port`, the port being the one the server accepted the request on."""
    server = scope.get("server")
    if server and len(server) > 1 and server[1] is not None:
        return f"{host_name}:{server[1]}"
    return host_name


class InstanceHeaderMiddleware:
    """Add `X-Kodkod-Instance: <name>` to every HTTP response start."""

    def __init__(self, app: ASGIApp, name: str = "") -> None:
        self.app = app
        self.name = name.strip()
        self.host_name = socket.gethostname()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        value = (self.name or default_instance_name(self.host_name, scope)).encode("latin-1", "replace")

        async def send_with_name(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != HEADER]
                headers.append((HEADER, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_name)
