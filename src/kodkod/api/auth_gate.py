"""Keys checked before a request body is read (pure ASGI).

FastAPI reads and parses a request's body before it runs the route's auth dependency, so
without this gate anyone could make the server read and parse a large JSON body. The gate looks
the request's path up among the app's routes that need a key and checks that an API or admin key
is present and valid before the body is read; a failure is the same 401 (OpenAI's shape plus
FastAPI's `detail`) the route would give. The route's own dependency still decides API versus
admin level. Open routes (`/health`, the
Kobold probes...) and unknown paths pass through untouched.
"""

from __future__ import annotations

import json
import re

from starlette.datastructures import Headers
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from kodkod.api.deps import iter_route_permissions
from kodkod.api.errors import error_body
from kodkod.auth import AuthError, KeyStore, Permission


class AuthGate:
    def __init__(self, app: ASGIApp, keys: KeyStore, routes_app: object) -> None:
        self.app = app
        self._keys = keys
        self._routes_app = routes_app  # the FastAPI app whose routes say who needs a key
        self._guarded: tuple[set[tuple[str, str]], list[tuple[re.Pattern[str], str]]] | None = None

    def _table(self) -> tuple[set[tuple[str, str]], list[tuple[re.Pattern[str], str]]]:
        if self._guarded is None:
            exact: set[tuple[str, str]] = set()
            patterns: list[tuple[re.Pattern[str], str]] = []
            for path, methods, perm in iter_route_permissions(self._routes_app.routes):  # type: ignore[attr-defined]
                if perm is Permission.NONE:
                    continue
                for method in methods:
                    if "{" in path:
                        patterns.append((compile_path(path)[0], method))
                    else:
                        exact.add((path, method))
            self._guarded = (exact, patterns)
        return self._guarded

    def _needs_key(self, method: str, path: str) -> bool:
        exact, patterns = self._table()
        if (path, method) in exact:
            return True
        return any(m == method and rx.match(path) for rx, m in patterns)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._needs_key(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        try:
            self._keys.check_api(Headers(scope=scope))
        except AuthError as exc:
            body = json.dumps(error_body(401, exc.message)).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
