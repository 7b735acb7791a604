"""The web page's files (index.html, its scripts and style sheet), shipped as package data.

`asset(name)` returns one of them by its fixed name, read with importlib.resources so an
installed package serves the same files as a source checkout. Only the names in `ASSETS` exist:
a request can never name another file (no paths, no `..`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True, slots=True)
class Asset:
    """One file of the page: its bytes and the Content-Type to serve them with."""

    body: bytes
    media_type: str


ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "live.js": "text/javascript; charset=utf-8",
    "admin.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def asset(name: str) -> Asset | None:
    """The named file of the page, or None when `name` is not one of `ASSETS`."""
    media_type = ASSETS.get(name)
    if media_type is None:
        return None
    body = resources.files(__name__).joinpath(name).read_bytes()
    return Asset(body, media_type)
