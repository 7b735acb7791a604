"""Shared fixtures and the speed tiers. The default model must be present (./test.sh fetches it).

Tests mirror the package they test (tests/engine for kodkod.engine, tests/api for kodkod.api, …);
the speed tier is a marker: `model` (set per module: a real model in process or a real server)
or `unit` (everything else, set here). `./test.sh -m unit` runs the fast tier alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import DEFAULT_GGUF, KodkodServer


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "default_gguf" in getattr(item, "fixturenames", ()) and item.get_closest_marker("model") is None:
            item.add_marker(pytest.mark.model)
        if item.get_closest_marker("model") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    if not DEFAULT_GGUF.is_file():
        pytest.fail(f"{DEFAULT_GGUF} is missing: run `kodkod models fetch` (./test.sh does)")
    return DEFAULT_GGUF


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    """A real kodkod process serving the default model with known keys (one per module)."""
    srv = KodkodServer.start(tmp_path_factory.mktemp("kodkod"))
    yield srv
    srv.stop()
