"""A small local Hugging Face hub for download tests (the routes `huggingface_hub` calls).

`FakeHub.start()` serves, on a free loopback port:
* `GET /api/models/{owner}/{name}` and `/api/models/{owner}/{name}/revision/{rev}`: the model
  info with the file listing (`siblings` with sizes) and the commit `sha`;
* `HEAD` / `GET /{owner}/{name}/resolve/{rev}/{path}`: one file, with the headers the library
  checks (`X-Repo-Commit`, `ETag`, `Content-Length`).
Unknown repos, revisions and files answer 404 with the hub's `X-Error-Code`. A `FakeFile` is
either bytes, a file on disk, or `slow_size` bytes of zeros sent in small pieces with a pause
between them, so that a test can act while the transfer is still running. The hub records the
`Authorization` headers it saw, each GET it served, and sets `aborted` when a client dropped a
transfer before its end.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

SLOW_PIECE_BYTES = 256 * 1024
SLOW_PAUSE_S = 0.02  # between pieces of a slow file: a transfer of many seconds, never stalled


@dataclass(frozen=True, slots=True)
class FakeFile:
    data: bytes = b""
    source: Path | None = None  # served from disk (a real GGUF)
    slow_size: int = 0  # zeros, trickled

    @property
    def size(self) -> int:
        if self.source is not None:
            return self.source.stat().st_size
        return self.slow_size or len(self.data)

    @property
    def etag(self) -> str:
        key = f"{self.source}:{self.size}" if self.source is not None else self.data or str(self.slow_size)
        return hashlib.sha1(key.encode() if isinstance(key, str) else key).hexdigest()


@dataclass(slots=True)
class FakeRepo:
    # revision name → (commit sha, files by repo path); "main" is the default branch
    revisions: dict[str, tuple[str, dict[str, FakeFile]]]

    def at(self, revision: str) -> tuple[str, dict[str, FakeFile]] | None:
        if revision in self.revisions:
            return self.revisions[revision]
        return next((r for r in self.revisions.values() if r[0] == revision), None)


@dataclass(slots=True)
class HubLog:
    auth_headers: list[str] = field(default_factory=list)
    gets: list[str] = field(default_factory=list)  # repo paths whose content was requested
    slow_started: threading.Event = field(default_factory=threading.Event)
    aborted: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakeHub:
    def __init__(self, repos: dict[str, FakeRepo]) -> None:
        self.repos = repos
        self.log = HubLog()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @classmethod
    def start(cls, repos: dict[str, FakeRepo]) -> FakeHub:
        hub = cls(repos)
        hub._thread.start()
        return hub

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            self._route(send_body=True)

        def do_HEAD(self) -> None:
            self._route(send_body=False)

        def _route(self, send_body: bool) -> None:
            with hub.log.lock:
                hub.log.auth_headers.append(self.headers.get("Authorization", ""))
            parts = [unquote(p) for p in urlsplit(self.path).path.split("/")[1:]]
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                revision = parts[5] if len(parts) >= 6 and parts[4] == "revision" else "main"
                self._info(f"{parts[2]}/{parts[3]}", revision)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._file(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), send_body)
            else:
                self._error(404, "EntryNotFound")

        def _error(self, status: int, code: str) -> None:
            body = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _resolve(self, repo_id: str, revision: str) -> tuple[str, dict[str, FakeFile]] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound")
                return None
            found = repo.at(revision)
            if found is None:
                self._error(404, "RevisionNotFound")
            return found

        def _info(self, repo_id: str, revision: str) -> None:
            found = self._resolve(repo_id, revision)
            if found is None:
                return
            sha, files = found
            siblings = [{"rfilename": p, "size": f.size, "blobId": f.etag} for p, f in files.items()]
            body = json.dumps({"id": repo_id, "sha": sha, "siblings": siblings}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _file(self, repo_id: str, revision: str, path: str, send_body: bool) -> None:
            found = self._resolve(repo_id, revision)
            if found is None:
                return
            sha, files = found
            f = files.get(path)
            if f is None:
                self._error(404, "EntryNotFound")
                return
            self.send_response(200)
            self.send_header("X-Repo-Commit", sha)
            self.send_header("ETag", f'"{f.etag}"')
            self.send_header("Content-Length", str(f.size))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if not send_body:
                return
            with hub.log.lock:
                hub.log.gets.append(path)
            try:
                self._body(f)
            except (BrokenPipeError, ConnectionResetError):
                hub.log.aborted.set()
                self.close_connection = True

        def _body(self, f: FakeFile) -> None:
            if f.source is not None:
                with f.source.open("rb") as src:
                    while block := src.read(1 << 20):
                        self.wfile.write(block)
                return
            if not f.slow_size:
                self.wfile.write(f.data)
                return
            piece = b"\0" * SLOW_PIECE_BYTES
            left = f.slow_size
            while left > 0:
                self.wfile.write(piece[: min(left, len(piece))])
                self.wfile.flush()
                left -= len(piece)
                hub.log.slow_started.set()
                time.sleep(SLOW_PAUSE_S)

    return Handler
