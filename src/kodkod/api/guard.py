"""Host and Origin checks, and the CORS policy (pure ASGI, outermost in the app).

DNS rebinding: a web page on evil.example can make its own name resolve to 127.0.0.1 and then
call a server on this machine "same-origin", with `Host: evil.example:5000`. So a server bound to
a loopback address (127.0.0.0/8, ::1, localhost) accepts only Host headers naming loopback
(`localhost`, `127.x.x.x`, `[::1]`, any port) plus `network.allowed_hosts` (what a proxy in
front of it uses; `*.example.com` matches subdomains, `*` anything). A server bound to another
address accepts any Host unless `allowed_hosts` is set, then loopback names and those. A
request without a Host header (HTTP/1.0; browsers always send one) passes. Refused: 400.

Cross-site requests: a browser sends `Origin` with every cross-origin request and with
same-origin POSTs. Which origins may call:
- `network.cors_origins` set: only those ('null' for pages opened from a file, '*' for any),
  pages on loopback origins and the server's own pages (Origin's host:port equals the Host
  header: /docs).
- not set, keys required (the default): any page. A page can only use the server with a key its
  user typed into it (KoboldAI Lite, a hosted chat UI), exactly like a script; the key travels
  in a header, never in a cookie, so a foreign page gains nothing a script would not have.
- not set, `disable_auth: true`: pages on loopback origins and the server's own pages only, since
  nothing else would stop a page the user merely visits from using the server.
A request whose Origin is not allowed is refused with 403 — also "simple" requests (a form POST
needs no preflight, so CORS headers alone would not stop it). Requests without Origin (curl,
SDKs, server-side front ends such as SillyTavern or OpenWebUI's backend) are not affected. CORS
answers reflect the allowed origin and never allow credentials (kodkod uses no cookies; keys
travel in headers, which CORS permits without credentials), and answer Chrome's private-network
preflight for allowed origins only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from kodkod.api.errors import error_body
from kodkod.auth import is_loopback_host
from kodkod.settings.sections import NetworkSettings


def host_name(value: str) -> str | None:
    """The host part of a Host header (`name[:port]`, `[v6][:port]`), lower case; None if
    malformed."""
    text = value.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        name, rest = text[1:end], text[end + 1 :]
        if rest and not (rest[0] == ":" and rest[1:].isdigit()):
            return None
        return name
    if text.count(":") > 1:
        return None
    name, sep, port = text.partition(":")
    if not name or (sep and not port.isdigit()):
        return None
    return name.rstrip(".")


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """Which Host headers and browser Origins the server accepts (see the module doc)."""

    any_host: bool
    hosts: frozenset[str]  # normalised names; "*.x" entries match subdomains of x
    any_origin: bool
    origins: frozenset[str]  # "scheme://host[:port]" or "null"

    @classmethod
    def from_settings(cls, network: NetworkSettings) -> HostPolicy:
        hosts = frozenset(h.strip("[]") for h in network.allowed_hosts)
        any_host = "*" in hosts or (not hosts and not is_loopback_host(network.host))
        keys_guard_pages = not network.cors_origins and not network.disable_auth
        return cls(
            any_host=any_host,
            hosts=hosts,
            any_origin="*" in network.cors_origins or keys_guard_pages,
            origins=frozenset(network.cors_origins),
        )

    def host_allowed(self, header: str | None) -> bool:
        if header is None or self.any_host:
            return True
        name = host_name(header)
        if name is None:
            return False
        if is_loopback_host(name) or name in self.hosts:
            return True
        return any(h.startswith("*.") and name.endswith(h[1:]) for h in self.hosts)

    def origin_allowed(self, origin: str) -> bool:
        """May a page of this (other) origin call the server? (The CORS decision.)"""
        text = origin.strip().lower().rstrip("/")
        if self.any_origin or text in self.origins:
            return True
        try:
            parts = urlsplit(text)
            hostname = parts.hostname
        except ValueError:
            return False
        return parts.scheme in ("http", "https") and hostname is not None and is_loopback_host(hostname)

    def request_allowed(self, origin: str, host: str | None) -> bool:
        """Same-origin (Origin names the Host the request went to) or an allowed origin."""
        if host is not None:
            try:
                netloc = urlsplit(origin.strip().lower()).netloc
            except ValueError:
                netloc = ""
            if netloc and netloc == host.strip().lower():
                return True
        return self.origin_allowed(origin)


class PolicyCORSMiddleware(CORSMiddleware):
    """Starlette's CORS with the origin decision taken by a `HostPolicy`, no credentials."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        super().__init__(
            app,
            allow_origins=("*",) if policy.any_origin else (),
            allow_methods=("*",),
            allow_headers=("*",),
            allow_credentials=False,
            allow_private_network=True,
        )
        self.policy = policy

    def is_allowed_origin(self, origin: str) -> bool:
        return self.policy.origin_allowed(origin)


class HostOriginGuard:
    """Refuse requests to an unexpected Host (400) or from a foreign browser Origin (403)."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host: str | None = None
        origin: str | None = None
        for name, value in scope.get("headers", ()):
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
        if not self.policy.host_allowed(host):
            shown = (host or "")[:100]
            await _refuse(
                scope,
                send,
                400,
                f"Host {shown!r} is not allowed on this server (list it in network.allowed_hosts)",
            )
            return
        if origin is not None and not self.policy.request_allowed(origin, host):
            shown = origin[:100]
            await _refuse(
                scope,
                send,
                403,
                f"Origin {shown!r} may not use this server (list it in network.cors_origins)",
            )
            return
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, send: Send, status: int, message: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps(error_body(status, message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
