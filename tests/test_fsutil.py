"""Atomic writes and the private cache folder (kodkod.fsutil)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kodkod.auth import KeyStore
from kodkod.fsutil import CacheDirError, atomic_write, private_cache_dir


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_atomic_write_replaces_whole_file_with_mode_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "config.yml"
    target.write_text("old: 1\n")
    old_umask = os.umask(0o077)
    try:
        atomic_write(target, "new: 2\n", mode=0o644)
    finally:
        os.umask(old_umask)
    assert target.read_text() == "new: 2\n"
    assert _mode(target) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yml"]


def test_atomic_write_key_mode_from_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The temp file already has mode 0600 when the data is written (never world-readable)."""
    seen: list[int] = []
    real_write = os.write

    def spy(fd: int, data: bytes) -> int:
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    atomic_write(tmp_path / "api_tokens.yml", "api_key: x\n", mode=0o600)
    assert seen and all(m == 0o600 for m in seen)
    assert _mode(tmp_path / "api_tokens.yml") == 0o600


def test_atomic_write_exclusive_never_replaces(tmp_path: Path) -> None:
    target = tmp_path / "api_tokens.yml"
    target.write_text("keep\n")
    with pytest.raises(FileExistsError):
        atomic_write(target, "other\n", mode=0o600, exclusive=True)
    assert target.read_text() == "keep\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api_tokens.yml"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "config.yml"
    target.write_text("old\n")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write(target, "new\n")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yml"]


def test_key_file_created_0600_atomically(tmp_path: Path) -> None:
    path = tmp_path / "api_tokens.yml"
    store = KeyStore(path, disabled=False)
    assert store.load_or_create() is True
    assert _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api_tokens.yml"]
    # A second start reads it and never rewrites it.
    before = path.read_text()
    assert KeyStore(path, disabled=False).load_or_create() is False
    assert path.read_text() == before


def test_private_cache_dir_is_0700_under_xdg(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    folder = private_cache_dir(env, "lora")
    assert folder == tmp_path / "cache" / "kodkod" / "lora"
    assert _mode(folder) == 0o700 and _mode(folder.parent) == 0o700
    assert os.lstat(folder).st_uid == os.geteuid()


def test_private_cache_dir_tightens_our_loose_folder(tmp_path: Path) -> None:
    loose = tmp_path / "kodkod"
    loose.mkdir()
    os.chmod(loose, 0o777)
    folder = private_cache_dir({"XDG_CACHE_HOME": str(tmp_path)})
    assert folder == loose and _mode(folder) == 0o700


def test_private_cache_dir_refuses_a_symlink(tmp_path: Path) -> None:
    elsewhere = tmp_path / "planted"
    elsewhere.mkdir()
    (tmp_path / "kodkod").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(CacheDirError):
        private_cache_dir({"XDG_CACHE_HOME": str(tmp_path)})


def test_private_cache_dir_refuses_another_users_folder(tmp_path: Path) -> None:
    folder = tmp_path / "kodkod"
    folder.mkdir(mode=0o700)
    other_uid = os.geteuid() + 4242
    if os.geteuid() != 0:
        pytest.skip("changing a folder's owner needs root")
    os.chown(folder, other_uid, -1)
    with pytest.raises(CacheDirError, match="another user"):
        private_cache_dir({"XDG_CACHE_HOME": str(tmp_path)})


def test_private_cache_dir_rejects_path_parts(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        private_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}, "../x")


def test_plain_name_refuses_what_could_leave_the_folder_or_the_file_system(tmp_path: Path) -> None:
    from kodkod.fsutil import is_file, plain_name

    assert plain_name("chatml") and plain_name("x" * 200)
    for bad in ("", "a/b", "a\\b", "..x", "a\x00b", "x" * 201):
        assert not plain_name(bad)
    assert not is_file(tmp_path / ("x" * 300))  # ENAMETOOLONG: False, not an exception
    assert not is_file(tmp_path / "a\x00b")
