"""Repository downloads from a Hugging Face hub into `model_dir` / `lora_dir`.

`download_repo(job, cancel, progress, hub)` is the whole download behind `POST /v1/download`
and `kodkod models download`, with the same rules as TabbyAPI's:

1. The folder is `job.folder_name` or the last part of the repo id, a plain name directly
   inside the target directory (no separators, no "..", no NUL, not hidden); an existing one
   is refused.
2. The hub lists the repo's files at `job.revision` (default branch when None); a file is
   taken when it matches some `include` glob and no `exclude` glob (`fnmatchcase` on the repo
   path). Nothing selected is an error. Every selected path must stay inside the folder: a
   relative path of plain parts (no "..", ".", empty part, backslash, NUL, leading "/").
3. The folder's name is reserved at once (an empty folder: two downloads of one name cannot
   both succeed, and the model registry ignores a folder without a model file), the files are
   downloaded one after another into a hidden temporary folder beside it (same file system),
   all pinned to the commit the listing answered with, and the finished folder is renamed
   over the reserved one. Any failure or cancellation removes both.

The hub is reached through `huggingface_hub` (`hub.py`); its address is the standard
`HF_ENDPOINT` variable, read when a download starts. `Cancel` stops a download: it is checked
before every file and from the library's progress hook, which runs once per block the library
reads (it reads in blocks of several megabytes), so a download stops within one block after
the flag is set. A stalled connection is bounded by the library's own read timeout.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kodkod.fsutil import MAX_NAME_BYTES, plain_name

log = logging.getLogger(__name__)

TEMP_PREFIX = ".kodkod-download-"  # hidden: model and LoRA discovery skip dot-names
HUB_BOOKKEEPING = (".cache", "huggingface")  # what the library writes inside a local_dir
MAX_PATTERNS = 64


class DownloadError(Exception):
    """A download that cannot be done or failed; the message is user-facing (→ 400)."""


class DownloadCancelled(DownloadError):
    """The download was stopped (client gone, deadline passed, Ctrl-C)."""


@dataclass(frozen=True, slots=True)
class RemoteFile:
    path: str  # repo path, "/"-separated
    size: int | None


@dataclass(frozen=True, slots=True)
class RepoListing:
    commit: str | None  # the commit the listing describes (files are fetched at it)
    files: tuple[RemoteFile, ...]


@dataclass(frozen=True, slots=True)
class DownloadJob:
    repo_id: str
    target_dir: Path  # model_dir, or lora_dir for repo_type "lora"
    folder_name: str | None = None
    revision: str | None = None
    token: str | None = field(default=None, repr=False)  # never shown, never logged
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    timeout_s: float | None = None  # whole download, listing included

    @property
    def folder(self) -> str:
        return self.folder_name if self.folder_name else self.repo_id.rstrip("/").split("/")[-1]


class Hub(Protocol):
    """The two hub operations a download needs (`hub.HfHub` is the real one)."""

    def list_files(self, repo_id: str, revision: str | None, token: str | None) -> RepoListing: ...

    def fetch(
        self,
        repo_id: str,
        path: str,
        revision: str | None,
        token: str | None,
        into: Path,
        on_block: BlockHook,
    ) -> None:
        """Download `path` to `into/path`; call `on_block(n)` after each block of n bytes."""


class BlockHook(Protocol):
    def __call__(self, num_bytes: int) -> None: ...


class Progress(Protocol):
    """Where a download reports progress (the server's log, the command line's bar)."""

    def start(self, job: DownloadJob, files: Sequence[RemoteFile]) -> None: ...

    def file(self, index: int, remote: RemoteFile) -> None: ...

    def advance(self, num_bytes: int) -> None: ...

    def finish(self, path: Path) -> None: ...


class Cancel:
    """A stop flag with an optional deadline, shared between the caller and the worker."""

    def __init__(self, timeout_s: float | None = None) -> None:
        self._event = threading.Event()
        self._reason = ""
        self._timeout_s = timeout_s
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def set(self, reason: str) -> None:
        self._reason = reason
        self._event.set()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise DownloadCancelled(f"the download was cancelled: {self._reason}")
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise DownloadCancelled(
                f"the download did not finish within its timeout of {self._timeout_s:g} s"
            )

    def remaining_s(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())


# -- pure rules -------------------------------------------------------------------------------


def check_folder_name(name: str) -> None:
    if not plain_name(name) or name.startswith(".") or ":" in name:
        raise DownloadError(
            f"invalid folder name {name!r}: it must be a plain folder name inside the target directory"
        )


def safe_repo_path(path: str) -> bool:
    """Whether a repo file path stays inside the folder it is downloaded into."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        return False
    return all(
        part not in ("", ".", "..") and len(part.encode("utf-8", "replace")) <= MAX_NAME_BYTES
        for part in path.split("/")
    )


def select_files(
    files: Iterable[RemoteFile], include: Sequence[str], exclude: Sequence[str]
) -> list[RemoteFile]:
    """The files matching some include glob and no exclude glob, in listing order."""
    return [
        f
        for f in files
        if any(fnmatch.fnmatchcase(f.path, p) for p in include)
        and not any(fnmatch.fnmatchcase(f.path, p) for p in exclude)
    ]


def check_patterns(patterns: Sequence[str], what: str) -> None:
    if len(patterns) > MAX_PATTERNS:
        raise DownloadError(f"at most {MAX_PATTERNS} {what} patterns")
    for p in patterns:
        if not p or "\x00" in p or len(p) > 1000:
            raise DownloadError(f"invalid {what} pattern {p[:50]!r}")


def _scrub(message: str, token: str | None) -> str:
    return message.replace(token, "***") if token else message


# -- the download -----------------------------------------------------------------------------


def download_repo(job: DownloadJob, cancel: Cancel, progress: Progress, hub: Hub) -> Path:
    """Download the selected files of `job.repo_id` into `job.target_dir/job.folder` (see the
    module doc); returns that folder. DownloadError (DownloadCancelled) on any failure, with
    nothing left behind."""
    folder = job.folder
    check_folder_name(folder)
    check_patterns(job.include, "include")
    check_patterns(job.exclude, "exclude")
    target = job.target_dir / folder
    if os.path.lexists(target):
        raise _exists(target)
    try:
        listing = hub.list_files(job.repo_id, job.revision, job.token)
    except DownloadError:
        raise
    except Exception as exc:
        raise DownloadError(_scrub(f"could not list {job.repo_id}: {exc}", job.token)) from None
    cancel.check()
    chosen = select_files(listing.files, job.include, job.exclude)
    if not chosen:
        raise DownloadError(
            f"no file of {job.repo_id} matches include {list(job.include)} and exclude {list(job.exclude)}"
        )
    unsafe = [f.path for f in chosen if not safe_repo_path(f.path) or _is_bookkeeping(f.path)]
    if unsafe:
        raise DownloadError(
            f"{job.repo_id} lists file paths that would leave the folder: {unsafe[:3]!r}; "
            "nothing was downloaded"
        )
    job.target_dir.mkdir(parents=True, exist_ok=True)
    try:
        target.mkdir()  # reserves the name
    except FileExistsError:
        raise _exists(target) from None
    temp = job.target_dir / f"{TEMP_PREFIX}{folder}.{os.urandom(4).hex()}"
    done = False
    try:
        temp.mkdir()
        progress.start(job, chosen)
        revision = listing.commit or job.revision
        for index, remote in enumerate(chosen):
            cancel.check()
            progress.file(index, remote)
            _fetch_one(hub, job, remote, revision, temp, cancel, progress)
        cancel.check()
        shutil.rmtree(temp.joinpath(*HUB_BOOKKEEPING), ignore_errors=True)
        _remove_if_empty(temp / HUB_BOOKKEEPING[0])
        os.rename(temp, target)  # replaces the empty reserved folder in one step
        done = True
    finally:
        if not done:
            shutil.rmtree(temp, ignore_errors=True)
            _remove_if_empty(target)
    progress.finish(target)
    return target


def _fetch_one(
    hub: Hub,
    job: DownloadJob,
    remote: RemoteFile,
    revision: str | None,
    temp: Path,
    cancel: Cancel,
    progress: Progress,
) -> None:
    def on_block(num_bytes: int) -> None:
        progress.advance(num_bytes)
        cancel.check()  # raising here ends the library's transfer and removes its partial file

    try:
        hub.fetch(job.repo_id, remote.path, revision, job.token, temp, on_block)
    except DownloadError:
        raise
    except Exception as exc:
        raise DownloadError(_scrub(f"downloading {remote.path} failed: {exc}", job.token)) from None
    written = (temp / remote.path).resolve()
    if temp.resolve() not in written.parents or not written.is_file():
        raise DownloadError(f"downloading {remote.path} did not produce a file inside the folder")


def _exists(target: Path) -> DownloadError:
    hint = ""
    with contextlib.suppress(OSError):
        if target.is_dir() and not any(target.iterdir()):
            hint = " (empty: a download of it is running, or one was interrupted; remove it to retry)"
    return DownloadError(f"the folder {target.name!r} already exists in {target.parent}{hint}")


def _is_bookkeeping(path: str) -> bool:
    return path.split("/")[:2] == list(HUB_BOOKKEEPING)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


# -- progress reporters -----------------------------------------------------------------------


@dataclass(slots=True)
class LogProgress:
    """Progress in the log: each file as it starts, then a line at least every `every_s`."""

    every_s: float = 5.0
    _repo: str = ""
    _total_bytes: int = 0
    _done_bytes: int = 0
    _count: int = 0
    _last_log: float = 0.0

    def start(self, job: DownloadJob, files: Sequence[RemoteFile]) -> None:
        self._repo = job.repo_id
        self._count = len(files)
        self._total_bytes = sum(f.size or 0 for f in files)
        self._last_log = time.monotonic()
        log.info(
            "downloading %d file(s) of %s (%s) into %s",
            self._count,
            job.repo_id,
            _mib(self._total_bytes),
            job.target_dir / job.folder,
        )

    def file(self, index: int, remote: RemoteFile) -> None:
        n = f"{index + 1}/{self._count}"
        log.info("download %s: file %s %s (%s)", self._repo, n, remote.path, _mib(remote.size))

    def advance(self, num_bytes: int) -> None:
        self._done_bytes += num_bytes
        now = time.monotonic()
        if now - self._last_log >= self.every_s:
            self._last_log = now
            share = f" ({100 * self._done_bytes / self._total_bytes:.0f}%)" if self._total_bytes else ""
            done, total = _mib(self._done_bytes), _mib(self._total_bytes)
            log.info("download %s: %s of %s%s", self._repo, done, total, share)

    def finish(self, path: Path) -> None:
        log.info("download %s: done, %s in %s", self._repo, _mib(self._done_bytes), path)


def _mib(num_bytes: int | None) -> str:
    return "size unknown" if num_bytes is None else f"{num_bytes / (1 << 20):.1f} MiB"
