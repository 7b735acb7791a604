"""Shared fixtures. The default model must be present (./test.sh fetches it first)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import DEFAULT_GGUF, KodkodServer


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
