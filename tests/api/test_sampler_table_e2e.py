"""End to end: the sampler table's bounds hold on every surface of a real server.

For each bounded row of `api.sampler_table.SAMPLER_TABLE` and each surface that lists it,
a value at the bound generates (200) and a value just outside is refused before any
generation: 422 on /v1/completions and /api/v1/generate, 400 naming the key on
/v1/sampling/override/switch. Aliases are checked the same way for the request surfaces.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kodkod.api.sampler_table import SAMPLER_TABLE, SamplerParam, Surface
from tests.api.test_sampler_table import BOUNDED, bound_cases, example
from tests.server import KodkodServer

pytestmark = pytest.mark.model

PROMPT = "Once upon a time,"
ENDPOINT = {Surface.OPENAI: "/v1/completions", Surface.KOBOLD: "/api/v1/generate"}
# Surface-specific names of the output limit (a row named here keeps its own value).
LIMIT = {Surface.OPENAI: "max_tokens", Surface.KOBOLD: "max_length"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    srv = KodkodServer.start(
        tmp_path_factory.mktemp("sampler_table"),
        {"network": {"api_servers": ["OAI", "Kobold"]}, "model": {"max_seq_len": 512}},
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(server: KodkodServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def admin(server: KodkodServer) -> Iterator[httpx.Client]:
    with server.client(admin=True) as c:
        yield c


def post(api: httpx.Client, surface: Surface, row: SamplerParam, name: str, value: Any) -> httpx.Response:
    body: dict[str, Any] = {"prompt": PROMPT}
    if row.name != "max_tokens":  # min_tokens must not exceed it
        small = row.name == "min_tokens" and isinstance(value, int) and 1 <= value <= 64
        body[LIMIT[surface]] = value if small else 1
    body[name] = value
    return api.post(ENDPOINT[surface], json=body)


def generates(value: Any, row: SamplerParam) -> bool:
    """max_tokens 0 means "until the context is full": valid, but not worth generating here."""
    return not (row.name == "max_tokens" and value == 0)


REQUEST_CASES = [(r, s) for r in BOUNDED for s in (Surface.OPENAI, Surface.KOBOLD) if s in r.surfaces]


@pytest.mark.parametrize(
    ("row", "surface"), REQUEST_CASES, ids=[f"{r.name}-{s.name}" for r, s in REQUEST_CASES]
)
def test_request_bounds_are_the_tables(api: httpx.Client, row: SamplerParam, surface: Surface) -> None:
    ok, bad = bound_cases(row)
    for value in ok:
        if generates(value, row):
            r = post(api, surface, row, row.name, value)
            assert r.status_code == 200, (row.name, value, r.text)
    for value in bad:
        r = post(api, surface, row, row.name, value)
        assert r.status_code == 422, (row.name, value, r.text)


ALIASES = [
    (r, s, a)
    for r in SAMPLER_TABLE
    for s in (Surface.OPENAI, Surface.KOBOLD)
    if s in r.surfaces and r.annotation in (int, float)
    for a in r.aliases
]


@pytest.mark.parametrize(("row", "surface", "alias"), ALIASES, ids=[f"{a}-{s.name}" for _, s, a in ALIASES])
def test_numeric_aliases_are_accepted_and_bounded(
    api: httpx.Client, row: SamplerParam, surface: Surface, alias: str
) -> None:
    value = example(row)
    if generates(value, row):
        r = post(api, surface, row, alias, value)
        assert r.status_code == 200, (alias, value, r.text)
    for bad in bound_cases(row)[1]:
        assert post(api, surface, row, alias, bad).status_code == 422, (alias, bad)


PRESET_ROWS = [r for r in BOUNDED if Surface.PRESET in r.surfaces]


@pytest.mark.parametrize("row", PRESET_ROWS, ids=[r.name for r in PRESET_ROWS])
def test_preset_bounds_are_the_tables(admin: httpx.Client, row: SamplerParam) -> None:
    ok, bad = bound_cases(row)
    try:
        for value in ok:
            r = admin.post(
                "/v1/sampling/override/switch", json={"overrides": {row.name: {"override": value}}}
            )
            assert r.status_code == 200, (row.name, value, r.text)
        for value in bad:
            r = admin.post(
                "/v1/sampling/override/switch", json={"overrides": {row.name: {"override": value}}}
            )
            assert r.status_code == 400, (row.name, value, r.text)
            assert row.name in r.json()["detail"]
    finally:
        assert admin.post("/v1/sampling/override/unload").status_code == 200
