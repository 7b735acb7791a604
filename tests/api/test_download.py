"""`POST /v1/download` end to end: a real kodkod process downloads from a local fake Hugging
Face hub (tests/fake_hub.py) named by `HF_ENDPOINT`, through huggingface_hub, then loads the
downloaded GGUF and generates with it."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kodkod.models.download import TEMP_PREFIX
from tests.fake_hub import FakeFile, FakeHub, FakeRepo
from tests.server import ADMIN_KEY, DEFAULT_GGUF, KodkodServer

pytestmark = pytest.mark.model

MAIN_SHA = "1" * 40
V2_SHA = "2" * 40
TOKEN = "hf_test_token_that_must_never_be_logged"


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    main = {
        "smol.Q4_1.gguf": FakeFile(source=DEFAULT_GGUF),
        "README.md": FakeFile(b"# a fake repo\n"),
        "config.json": FakeFile(b"{}"),
        "extra/notes.txt": FakeFile(b"notes"),
    }
    v2 = {"smol.Q4_1.gguf": FakeFile(source=DEFAULT_GGUF), "V2-ONLY.txt": FakeFile(b"from v2")}
    srv = FakeHub.start(
        {
            "kodkod-test/smol": FakeRepo({"main": (MAIN_SHA, main), "v2": (V2_SHA, v2)}),
            "kodkod-test/adapter": FakeRepo({"main": ("3" * 40, {"adapter.gguf": FakeFile(b"GGUF-lora")})}),
            "kodkod-test/slow": FakeRepo({"main": ("4" * 40, {"huge.bin": FakeFile(slow_size=4 << 30)})}),
            "kodkod-test/evil": FakeRepo(
                {"main": ("5" * 40, {"ok.txt": FakeFile(b"ok"), "../escape.txt": FakeFile(b"x")})}
            ),
        }
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, hub: FakeHub, default_gguf: Path
) -> Iterator[KodkodServer]:
    """No startup model; model_dir and lora_dir are private folders (never the shared models/)."""
    work = tmp_path_factory.mktemp("kodkod-download")
    (work / "dl-models").mkdir()  # lora_dir is left to the first LoRA download to create
    with pytest.MonkeyPatch.context() as mp:  # the child process inherits these
        mp.setenv("HF_ENDPOINT", hub.url)
        mp.setenv("HF_HOME", str(work / "hf-home"))  # no stored token, no shared cache
        mp.delenv("HF_TOKEN", raising=False)
        srv = KodkodServer.start(
            work,
            {"model": {"model_dir": "dl-models"}, "lora": {"lora_dir": "dl-loras"}},
            model=None,
        )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def admin(server: KodkodServer) -> Iterator[httpx.Client]:
    with server.client(admin=True, timeout=300.0) as c:
        yield c


def model_dir(server: KodkodServer) -> Path:
    return server.workdir / "dl-models"


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def temp_folders(server: KodkodServer) -> list[str]:
    names: list[str] = []
    for d in (server.workdir / "dl-models", server.workdir / "dl-loras"):
        if d.is_dir():
            names += [p.name for p in d.iterdir() if p.name.startswith(TEMP_PREFIX)]
    return names


def assert_error(r: httpx.Response, status: int, needle: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert needle in body["detail"], body
    assert body["error"]["message"] == body["detail"]


def test_include_exclude(admin: httpx.Client, server: KodkodServer) -> None:
    body = {
        "repo_id": "kodkod-test/smol",
        "folder_name": "smol-docs",
        "include": ["*.md", "*.txt", "*.json"],
        "exclude": ["config*"],
    }
    r = admin.post("/v1/download", json=body)
    assert r.status_code == 200, r.text
    path = Path(r.json()["download_path"])
    assert path == model_dir(server) / "smol-docs"
    assert files_in(path) == ["README.md", "extra/notes.txt"]  # `*` crosses folders, as upstream
    assert (path / "extra" / "notes.txt").read_bytes() == b"notes"
    assert temp_folders(server) == []


def test_revision(admin: httpx.Client, server: KodkodServer) -> None:
    body = {"repo_id": "kodkod-test/smol", "revision": "v2", "folder_name": "smol-v2", "include": ["*.txt"]}
    r = admin.post("/v1/download", json=body)
    assert r.status_code == 200, r.text
    assert files_in(Path(r.json()["download_path"])) == ["V2-ONLY.txt"]
    r = admin.post("/v1/download", json={**body, "revision": "no-such-branch", "folder_name": "smol-x"})
    assert_error(r, 400, "has no revision 'no-such-branch'")
    assert not (model_dir(server) / "smol-x").exists()


def test_lora_goes_to_lora_dir(admin: httpx.Client, server: KodkodServer) -> None:
    r = admin.post("/v1/download", json={"repo_id": "kodkod-test/adapter", "repo_type": "lora"})
    assert r.status_code == 200, r.text
    path = Path(r.json()["download_path"])
    assert path == server.workdir / "dl-loras" / "adapter"  # folder defaults to the repo's name
    assert (path / "adapter.gguf").read_bytes() == b"GGUF-lora"
    assert not (model_dir(server) / "adapter").exists()


def test_existing_folder_is_400(admin: httpx.Client, server: KodkodServer) -> None:
    body = {"repo_id": "kodkod-test/smol", "folder_name": "smol-twice", "include": ["README.md"]}
    assert admin.post("/v1/download", json=body).status_code == 200
    before = (model_dir(server) / "smol-twice" / "README.md").stat().st_mtime_ns
    assert_error(admin.post("/v1/download", json=body), 400, "already exists")
    assert (model_dir(server) / "smol-twice" / "README.md").stat().st_mtime_ns == before


def test_nothing_matches_is_400(admin: httpx.Client, server: KodkodServer) -> None:
    body = {"repo_id": "kodkod-test/smol", "folder_name": "none", "include": ["*.safetensors"]}
    assert_error(admin.post("/v1/download", json=body), 400, "no file")
    assert not (model_dir(server) / "none").exists()


@pytest.mark.parametrize("folder", ["..", "../escaped", "a/b", "a\\b", "/tmp/abs", ".hidden"])
def test_unsafe_folder_name_is_refused(admin: httpx.Client, server: KodkodServer, folder: str) -> None:
    r = admin.post("/v1/download", json={"repo_id": "kodkod-test/smol", "folder_name": folder})
    assert_error(r, 400, "invalid folder name")
    assert not (server.workdir / "escaped").exists()
    assert temp_folders(server) == []


def test_nul_and_wrong_types_are_422(admin: httpx.Client) -> None:
    assert admin.post("/v1/download", json={"repo_id": "a/b", "folder_name": "x\x00"}).status_code == 422
    assert admin.post("/v1/download", json={"repo_id": "a/b", "include": "*"}).status_code == 422
    assert admin.post("/v1/download", json={"repo_id": "a/b", "timeout": -1}).status_code == 422
    assert admin.post("/v1/download", content=b'{"repo_id": "a/b", "chunk_limit": NaN}').status_code == 422
    assert admin.post("/v1/download", json={"repo_id": "a/b", "include": ["*"] * 5000}).status_code == 422
    assert admin.post("/v1/download", json={"repo_id": "x" * 5000}).status_code == 422


def test_repo_path_leaving_the_folder_is_refused(
    admin: httpx.Client, server: KodkodServer, hub: FakeHub
) -> None:
    r = admin.post("/v1/download", json={"repo_id": "kodkod-test/evil", "folder_name": "evil"})
    assert_error(r, 400, "would leave the folder")
    assert not (model_dir(server) / "evil").exists()
    assert not (server.workdir / "escape.txt").exists()
    assert "../escape.txt" not in hub.log.gets and "ok.txt" not in hub.log.gets


def test_unknown_repo_is_400(admin: httpx.Client) -> None:
    assert_error(admin.post("/v1/download", json={"repo_id": "kodkod-test/nope"}), 400, "not found")


def test_needs_admin(server: KodkodServer) -> None:
    with server.client() as api:
        assert api.post("/v1/download", json={"repo_id": "kodkod-test/smol"}).status_code == 401


def test_token_reaches_the_hub_and_never_the_log(
    admin: httpx.Client, server: KodkodServer, hub: FakeHub
) -> None:
    body = {
        "repo_id": "kodkod-test/smol",
        "folder_name": "smol-token",
        "include": ["README.md"],
        "token": TOKEN,
    }
    assert admin.post("/v1/download", json=body).status_code == 200
    assert f"Bearer {TOKEN}" in hub.log.auth_headers
    # the folder exists now: 400, and the error path logs too
    assert admin.post("/v1/download", json=body).status_code == 400
    assert "downloading 1 file(s) of kodkod-test/smol" in server.log()  # progress is logged
    assert TOKEN not in server.log()


def _start_and_vanish(server: KodkodServer, body: dict[str, Any], hub: FakeHub) -> None:
    """Send the request on a raw socket and close it once the slow file is being transferred."""
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/download HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Authorization: Bearer {ADMIN_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head + payload)
        assert hub.log.slow_started.wait(60), "the slow transfer never started"
    # the socket is closed here, mid-file


def test_disconnect_mid_download_leaves_no_folder(server: KodkodServer, hub: FakeHub) -> None:
    _start_and_vanish(server, {"repo_id": "kodkod-test/slow", "folder_name": "slow"}, hub)
    assert hub.log.aborted.wait(60), "the server kept downloading after its client left"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (temp_folders(server) or (model_dir(server) / "slow").exists()):
        time.sleep(0.1)
    assert not (model_dir(server) / "slow").exists()
    assert temp_folders(server) == []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "download of kodkod-test/slow stopped" not in server.log():
        time.sleep(0.1)
    assert "download of kodkod-test/slow stopped; nothing of it is kept" in server.log()
    assert "never retrieved" not in server.log() and "Traceback" not in server.log()


def test_downloaded_gguf_loads_and_generates(admin: httpx.Client, server: KodkodServer) -> None:
    r = admin.post("/v1/download", json={"repo_id": "kodkod-test/smol", "include": ["*.gguf"]})
    assert r.status_code == 200, r.text
    path = Path(r.json()["download_path"])
    assert path.name == "smol"
    assert (path / "smol.Q4_1.gguf").stat().st_size == DEFAULT_GGUF.stat().st_size
    assert "smol" in [m["id"] for m in admin.get("/v1/models").json()["data"]]
    with admin.stream("POST", "/v1/model/load", json={"model_name": "smol"}) as load:
        assert load.status_code == 200
        events = [json.loads(line[5:]) for line in load.iter_lines() if line.startswith("data:")]
    assert events and events[-1].get("status") == "finished", events[-1:]
    body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    r = admin.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"].strip() and r.json()["usage"]["completion_tokens"] > 0
    assert admin.get("/v1/model").json()["id"] == "smol"
