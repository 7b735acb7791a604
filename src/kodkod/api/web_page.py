"""The web page at `/` and its files under `/web/` (no key: the page holds no secrets).

Every answer carries a strict Content-Security-Policy: scripts, styles and connections only from
this server, no inline script or style, no frames, no plugins. The page keeps the keys the user
types in sessionStorage and sends them in headers to the same API every client uses, so the
routes it calls need a key exactly as they do for any other client.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from kodkod.api.errors import ApiError
from kodkod.web import asset

router = APIRouter()

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


def _serve(name: str) -> Response:
    found = asset(name)
    if found is None:
        raise ApiError(404, "no such file", code="not_found")
    return Response(found.body, media_type=found.media_type, headers=HEADERS)


@router.get("/", include_in_schema=False)
async def page() -> Response:
    return _serve("index.html")


@router.get("/web/{name}", include_in_schema=False)
async def page_file(name: str) -> Response:
    return _serve(name)
