"""`kodkod models fetch`: every bundled file is pinned by sha256, and a fetched copy that
matches is left alone (no download)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kodkod.models.fetch import GEMMA3, MINILM, SMOLLM2, fetch_spec, sha256_of
from tests.server import MODELS


def test_every_bundled_file_is_pinned() -> None:
    for spec in (SMOLLM2, GEMMA3, MINILM):
        for f in spec.files:
            assert len(f.sha256) == 64, f.dest


class Said:
    """A FetchReporter that keeps what it was told."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.files: list[str] = []

    def say(self, text: str) -> None:
        self.lines.append(text)

    def downloading(self, package: str) -> None:
        self.files.append(package)

    def file_started(self, name: str, total_bytes: int) -> None:
        self.files.append(name)

    def file_advanced(self, num_bytes: int) -> None:
        pass

    def file_done(self, name: str) -> None:
        pass


def test_a_verified_copy_is_not_fetched_again(tmp_path: Path) -> None:
    source = MODELS / "all-MiniLM-L6-v2"
    if not (source / "model.safetensors").is_file():
        pytest.skip("all-MiniLM-L6-v2 is not fetched (./test.sh fetches it)")
    shutil.copytree(source, tmp_path / "all-MiniLM-L6-v2")
    said = Said()
    paths = fetch_spec(MINILM, tmp_path, report=said)
    assert said.lines == [f"{MINILM.description}: already present"]
    assert said.files == []  # nothing downloaded
    assert all(sha256_of(p) == f.sha256 for p, f in zip(paths, MINILM.files, strict=True))
