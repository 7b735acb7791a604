"""Files kodkod writes for the user: atomic writes and the private per-user cache directory.

`atomic_write(path, data, mode=…)` writes a temporary file in the same folder, created with the
final mode from the start (so a key file is never readable by others, not even for a moment),
fsyncs it and renames it over `path` (`exclusive=True`: hard-links it into place instead, so an
existing file is never replaced). A reader sees the old file or the whole new one, never a part.

`private_cache_dir(env)` is `$XDG_CACHE_HOME/kodkod` (else `~/.cache/kodkod`), created with mode
0700. A folder there that is a symlink or owned by another user is refused (`CacheDirError`);
one of ours that group or others may write is tightened to 0700. Never a predictable /tmp path:
another local user could create it first and plant files we would then load.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Mapping
from pathlib import Path

CACHE_DIR_NAME = "kodkod"


class CacheDirError(OSError):
    """The cache folder cannot be trusted (symlink, another owner, not a folder)."""


MAX_NAME_BYTES = 200  # below every file system's name limit, with room for a suffix


def plain_name(name: str) -> bool:
    """Whether a client-given name can name a file directly inside a folder: not empty, no path
    separator, no "..", no NUL, short enough for the file system."""
    return (
        bool(name)
        and not any(bad in name for bad in ("/", "\\", "..", "\x00"))
        and len(name.encode("utf-8", "replace")) <= MAX_NAME_BYTES
    )


def is_file(path: Path) -> bool:
    """Path.is_file() that answers False instead of raising for names the OS refuses."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def fsync_file(path: Path) -> None:
    """Flush a file that someone else wrote (a converter, llama.cpp) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # some file systems cannot open folders; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: str | bytes, *, mode: int = 0o644, exclusive: bool = False) -> None:
    """Write `data` to `path` atomically with permission bits `mode` (see the module doc).

    `exclusive=True` raises FileExistsError when `path` already exists (and leaves it as is).
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    folder = path.parent
    tmp = folder / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have cleared bits the caller asked for
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            _link_no_clobber(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(folder)


def _link_no_clobber(tmp: Path, path: Path) -> None:
    """Put `tmp` in place as `path` unless `path` exists (FileExistsError then)."""
    try:
        os.link(tmp, path)  # atomic, and fails instead of replacing
    except FileExistsError:
        raise
    except OSError as exc:  # a file system without hard links: check, then rename
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
        os.replace(tmp, path)


def _secure_dir(folder: Path) -> Path:
    """Create `folder` (0700) if missing; refuse one we do not own; tighten a loose one."""
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise CacheDirError(f"{folder} is not a plain folder; refusing to use it as a cache")
    if st.st_uid != os.geteuid():
        raise CacheDirError(
            f"{folder} belongs to another user (uid {st.st_uid}); refusing to use it as a cache"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(folder, 0o700)
    return folder


def private_cache_dir(env: Mapping[str, str] | None = None, *parts: str) -> Path:
    """The user's private kodkod cache folder (or a sub-folder `parts` of it), checked."""
    env = os.environ if env is None else env
    xdg = env.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder = _secure_dir(base / CACHE_DIR_NAME)
    for part in parts:
        if not part or part != Path(part).name or part in (".", ".."):
            raise ValueError(f"invalid cache sub-folder name {part!r}")
        folder = _secure_dir(folder / part)
    return folder
