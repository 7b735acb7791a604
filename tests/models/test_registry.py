"""Model discovery in model_dir and safe name → path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from kodkod.models.registry import ModelNameError, discover, resolve


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    (root / "folder-model").mkdir(parents=True)
    (root / "folder-model" / "weights.Q4.gguf").write_bytes(b"GGUF")
    (root / "folder-model" / "mmproj-f16.gguf").write_bytes(b"GGUF")  # a projector: ignored
    (root / "split").mkdir()
    for i in (1, 2):
        (root / "split" / f"big-0000{i}-of-00002.gguf").write_bytes(b"GGUF")
    (root / "bare.gguf").write_bytes(b"GGUF")
    (root / "two").mkdir()
    (root / "two" / "a.gguf").write_bytes(b"GGUF")
    (root / "two" / "b.gguf").write_bytes(b"GGUF")
    (root / "empty").mkdir()
    (root / "family" / "small").mkdir(parents=True)
    (root / "family" / "small" / "s.gguf").write_bytes(b"GGUF")
    (root / "notes.txt").write_text("hi")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "x.gguf").write_bytes(b"GGUF")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    return root


def test_discover(model_dir: Path) -> None:
    names = [e.name for e in discover(model_dir)]
    assert names == ["bare", "folder-model", "split"]  # not the link leading outside
    split = next(e for e in discover(model_dir) if e.name == "split")
    assert split.gguf.name == "big-00001-of-00002.gguf"


def test_resolve(model_dir: Path) -> None:
    assert resolve(model_dir, "folder-model").gguf.name == "weights.Q4.gguf"
    assert resolve(model_dir, "bare").folder is None
    assert resolve(model_dir, "bare.gguf").name == "bare.gguf"
    nested = resolve(model_dir, "family/small")
    assert nested.name == "family/small" and nested.gguf.name == "s.gguf"


@pytest.mark.parametrize(
    "name",
    ["../../etc", "..", "/etc/passwd", "~/models", "folder-model/../../x", "C:\\x", "escape", ""],
)
def test_resolve_refuses_paths_outside(model_dir: Path, name: str) -> None:
    with pytest.raises(ModelNameError):
        resolve(model_dir, name)


@pytest.mark.parametrize("name", ["missing", "two", "empty", "notes.txt"])
def test_resolve_refuses_non_models(model_dir: Path, name: str) -> None:
    with pytest.raises(ModelNameError):
        resolve(model_dir, name)
