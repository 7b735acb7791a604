"""Repository downloads (models/download.py, models/hub.py): the rules, and huggingface_hub
against a local fake hub. The end-to-end endpoint is tested in tests/api/test_download.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kodkod.models.download import (
    TEMP_PREFIX,
    Cancel,
    DownloadCancelled,
    DownloadError,
    DownloadJob,
    LogProgress,
    RemoteFile,
    RepoListing,
    check_folder_name,
    download_repo,
    safe_repo_path,
    select_files,
)
from kodkod.models.hub import HfHub
from kodkod.models.registry import discover
from tests.fake_hub import FakeFile, FakeHub, FakeRepo

# -- rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["a.gguf", "sub/dir/a.gguf", ".gitattributes", "a..b.txt"])
def test_safe_repo_paths(path: str) -> None:
    assert safe_repo_path(path)


@pytest.mark.parametrize(
    "path", ["", "../a", "a/../../b", "/etc/passwd", "a//b", "./a", "a\\b", "a\x00b", "a/", "x" * 300]
)
def test_unsafe_repo_paths(path: str) -> None:
    assert not safe_repo_path(path)


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "a\\b", "", ".hidden", "a\x00", "c:x", "x" * 300])
def test_bad_folder_names(name: str) -> None:
    with pytest.raises(DownloadError, match="invalid folder name"):
        check_folder_name(name)


def test_folder_defaults_to_repo_name() -> None:
    assert DownloadJob("owner/My-Model", Path("/m")).folder == "My-Model"
    assert DownloadJob("owner/My-Model", Path("/m"), folder_name="x").folder == "x"


def test_token_not_in_repr() -> None:
    assert "hf_secret" not in repr(DownloadJob("o/r", Path("/m"), token="hf_secret"))


def test_select_files_include_and_exclude() -> None:
    files = [RemoteFile(p, 1) for p in ("a.gguf", "b.gguf", "README.md", "sub/c.gguf", "x.safetensors")]
    chosen = select_files(files, ["*.gguf", "*.md"], ["b*"])
    assert [f.path for f in chosen] == ["a.gguf", "README.md", "sub/c.gguf"]  # "*" crosses "/"
    assert select_files(files, ["*"], ["*"]) == []


def test_cancel_deadline() -> None:
    cancel = Cancel(timeout_s=0.0)
    with pytest.raises(DownloadCancelled, match="timeout"):
        cancel.check()
    other = Cancel()
    other.check()
    other.set("stop")
    with pytest.raises(DownloadCancelled, match="stop"):
        other.check()


# -- the download flow against an in-memory hub -----------------------------------------------


class MemHub:
    def __init__(self, files: dict[str, bytes], commit: str = "c0ffee") -> None:
        self.files = files
        self.commit = commit
        self.fetched: list[tuple[str, str | None]] = []
        self.block_bytes = 4

    def list_files(self, repo_id: str, revision: str | None, token: str | None) -> RepoListing:
        return RepoListing(self.commit, tuple(RemoteFile(p, len(d)) for p, d in self.files.items()))

    def fetch(self, repo_id, path, revision, token, into, on_block) -> None:  # type: ignore[no-untyped-def]
        self.fetched.append((path, revision))
        dest = into / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        (into / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)  # like the library
        data = self.files[path]
        with dest.open("wb") as out:
            for i in range(0, len(data), self.block_bytes):
                out.write(data[i : i + self.block_bytes])
                on_block(len(data[i : i + self.block_bytes]))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_lands_complete_and_pinned(tmp_path: Path) -> None:
    hub = MemHub({"m.gguf": b"GGUF" + b"x" * 40, "docs/readme.md": b"hi", "skip.bin": b"no"})
    job = DownloadJob("o/model", tmp_path, include=("*.gguf", "docs/*"))
    path = download_repo(job, Cancel(), LogProgress(), hub)
    assert path == tmp_path / "model"
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) == [
        "docs/readme.md",
        "m.gguf",
    ]
    assert not (path / ".cache").exists()  # the library's bookkeeping is not part of the model
    assert _leftovers(tmp_path) == ["model"]
    assert {rev for _, rev in hub.fetched} == {"c0ffee"}  # every file at the listed commit


def test_existing_folder_is_refused_untouched(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.txt").write_text("keep")
    with pytest.raises(DownloadError, match="already exists"):
        download_repo(DownloadJob("o/model", tmp_path), Cancel(), LogProgress(), MemHub({"a": b"1"}))
    assert (tmp_path / "model" / "mine.txt").read_text() == "keep"


def test_reserved_name_blocks_a_second_download(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()  # what a running (or interrupted) download holds
    with pytest.raises(DownloadError, match="empty: a download of it is running"):
        download_repo(DownloadJob("o/model", tmp_path), Cancel(), LogProgress(), MemHub({"a": b"1"}))


def test_nothing_selected(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="no file"):
        job = DownloadJob("o/model", tmp_path, include=("*.gguf",))
        download_repo(job, Cancel(), LogProgress(), MemHub({"a": b"1"}))
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("bad", ["../evil.gguf", "/abs.gguf", "a\\b.gguf", ".cache/huggingface/x.gguf"])
def test_unsafe_listing_downloads_nothing(tmp_path: Path, bad: str) -> None:
    hub = MemHub({"ok.gguf": b"1", bad: b"2"})
    with pytest.raises(DownloadError, match="would leave the folder"):
        download_repo(DownloadJob("o/model", tmp_path / "models"), Cancel(), LogProgress(), hub)
    assert hub.fetched == []
    assert _leftovers(tmp_path) == []
    assert _leftovers(tmp_path / "models") == []


def test_cancel_mid_file_leaves_nothing(tmp_path: Path) -> None:
    cancel = Cancel()
    hub = MemHub({"a.gguf": b"a" * 100, "b.gguf": b"b" * 100})
    seen: list[int] = []

    class Stopper(LogProgress):
        def advance(self, num_bytes: int) -> None:
            seen.append(num_bytes)
            if len(seen) == 3:  # in the middle of the first file
                cancel.set("the test stopped it")

    with pytest.raises(DownloadCancelled, match="the test stopped it"):
        download_repo(DownloadJob("o/model", tmp_path), cancel, Stopper(), hub)
    assert [p for p, _ in hub.fetched] == ["a.gguf"]
    assert _leftovers(tmp_path) == []


def test_hidden_download_folder_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / f"{TEMP_PREFIX}x.1234").mkdir()
    (tmp_path / f"{TEMP_PREFIX}x.1234" / "x.gguf").write_bytes(b"GGUF")
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "real.gguf").write_bytes(b"GGUF")
    assert [e.name for e in discover(tmp_path)] == ["real"]


# -- huggingface_hub against the local fake hub ---------------------------------------------


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    files = {
        "w.gguf": FakeFile(b"GGUF-main"),
        "README.md": FakeFile(b"# readme"),
        "sub/t.json": FakeFile(b"{}"),
    }
    v2 = {"w.gguf": FakeFile(b"GGUF-v2")}
    slow = {"huge.bin": FakeFile(slow_size=1 << 30)}
    srv = FakeHub.start(
        {
            "t/repo": FakeRepo({"main": ("a" * 40, files), "v2": ("b" * 40, v2)}),
            "t/slow": FakeRepo({"main": ("c" * 40, slow)}),
        }
    )
    yield srv
    srv.stop()


def test_hf_listing_and_revision(hub: FakeHub) -> None:
    real = HfHub(hub.url)
    main = real.list_files("t/repo", None, None)
    assert main.commit == "a" * 40
    assert {(f.path, f.size) for f in main.files} == {("w.gguf", 9), ("README.md", 8), ("sub/t.json", 2)}
    v2 = real.list_files("t/repo", "v2", None)
    assert v2.commit == "b" * 40 and [f.path for f in v2.files] == ["w.gguf"]
    with pytest.raises(DownloadError, match="was not found"):
        real.list_files("t/missing", None, None)
    with pytest.raises(DownloadError, match="no revision 'nope'"):
        real.list_files("t/repo", "nope", None)


def test_hf_download_through_library(hub: FakeHub, tmp_path: Path) -> None:
    job = DownloadJob("t/repo", tmp_path, folder_name="r2", revision="v2", token="hf_unit_secret")
    path = download_repo(job, Cancel(), LogProgress(), HfHub(hub.url))
    assert (path / "w.gguf").read_bytes() == b"GGUF-v2"
    assert _leftovers(path) == ["w.gguf"]
    assert "Bearer hf_unit_secret" in hub.log.auth_headers


def test_hf_env_endpoint() -> None:
    assert HfHub.from_env({"HF_ENDPOINT": "http://127.0.0.1:9/"}).endpoint == "http://127.0.0.1:9"
    assert HfHub.from_env({}).endpoint is None


def test_hf_cancel_mid_transfer(hub: FakeHub, tmp_path: Path) -> None:
    cancel = Cancel()

    class CancelOnFirstBlock(LogProgress):
        def advance(self, num_bytes: int) -> None:
            cancel.set("unit test")

    with pytest.raises(DownloadCancelled):
        download_repo(DownloadJob("t/slow", tmp_path), cancel, CancelOnFirstBlock(), HfHub(hub.url))
    assert hub.log.aborted.wait(30), "the transfer was not dropped"
    assert _leftovers(tmp_path) == []
    assert not any(name.startswith(TEMP_PREFIX) for name in os.listdir(tmp_path))


def test_cli_download(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from kodkod.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    args = ["models", "download", "t/repo", "--include", "*.gguf", "*.md", "--exclude", "README*"]
    assert main([*args, "--model-dir", str(tmp_path / "m")]) == 0
    out = capsys.readouterr()
    assert out.out.strip().endswith(str(tmp_path / "m" / "repo"))
    assert "1/1 w.gguf" in out.err  # the progress bar
    assert _leftovers(tmp_path / "m" / "repo") == ["w.gguf"]
    assert main([*args, "--model-dir", str(tmp_path / "m")]) == 1  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["models", "download", "t/repo", "--folder-name", "../x", "--model-dir", "m"]) == 1
    assert "invalid folder name" in capsys.readouterr().err


@pytest.mark.parametrize("repo_id", ["../../etc/x", "a/b/c", "owner/na me", "owner/x\x00"])
def test_bad_repo_ids_are_refused_before_any_request(hub: FakeHub, tmp_path: Path, repo_id: str) -> None:
    before = len(hub.log.auth_headers)
    with pytest.raises(DownloadError):
        job = DownloadJob(repo_id, tmp_path, folder_name="f")
        download_repo(job, Cancel(), LogProgress(), HfHub(hub.url))
    assert len(hub.log.auth_headers) == before  # the library's own id check refused it
    assert _leftovers(tmp_path) == []
