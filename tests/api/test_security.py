"""Security end to end: real server processes with the default model.

Server `locked` (keys on, OAI + Kobold, every logging key on): Host checks against DNS
rebinding, CORS and foreign origins, Kobold jobs scoped to the key that started them, prompts
and sampler settings in the log, keys never in the log. Server `open` (auth disabled, logging
keys off, `allowed_hosts` set): a proxy's Host name is accepted, foreign pages are still
refused, prompts stay out of the log.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_kobold import iter_events, long_body, settle
from tests.server import ADMIN_KEY, API_KEY, KodkodServer

pytestmark = pytest.mark.model

WRONG_KEY = "5eb63bbbe01eeed093cb22bb8f5acdc3"
PREFLIGHT = {
    "access-control-request-method": "POST",
    "access-control-request-headers": "authorization, content-type",
}


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    srv = KodkodServer.start(
        tmp_path_factory.mktemp("locked"),
        {
            "network": {"api_servers": ["OAI", "kobold"]},
            "model": {"max_seq_len": 2048},
            "logging": {"log_prompt": True, "log_generation_params": True, "log_requests": True},
        },
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def opened(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    srv = KodkodServer.start(
        tmp_path_factory.mktemp("open"),
        {
            "network": {"disable_auth": True, "allowed_hosts": ["proxy.example"]},
            "model": {"max_seq_len": 2048},
        },
    )
    yield srv
    srv.stop()


def wait_for_log(server: KodkodServer, text: str, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        log = server.log()
        if text in log or time.monotonic() > deadline:
            return log
        time.sleep(0.1)


def after_banner(log: str) -> str:
    """The log after the start-up banner (which shows the keys once, by design)."""
    return log.split("Admin key: ", 1)[1].split("\n", 1)[1]


# -- Host and Origin ---------------------------------------------------------------------------


def test_foreign_host_is_refused_on_a_loopback_server(locked: KodkodServer) -> None:
    with locked.client() as c:
        assert c.get("/v1/model").status_code == 200
        assert c.get("/v1/model", headers={"host": f"localhost:{locked.port}"}).status_code == 200
        r = c.get("/v1/model", headers={"host": f"evil.example:{locked.port}"})
        assert r.status_code == 400
        assert "allowed_hosts" in r.json()["error"]["message"]
        assert c.get("/health", headers={"host": "evil.example"}).status_code == 400


def test_allowed_hosts_admit_a_proxy_name(opened: KodkodServer) -> None:
    r = httpx.get(f"{opened.base_url}/health", headers={"host": "proxy.example"}, timeout=10)
    assert r.status_code == 200
    r = httpx.get(f"{opened.base_url}/v1/model", headers={"host": "proxy.example:443"}, timeout=10)
    assert r.status_code == 200 and r.json()["id"]
    r = httpx.get(f"{opened.base_url}/v1/model", headers={"host": "evil.example"}, timeout=10)
    assert r.status_code == 400


def test_foreign_preflight_gets_no_wildcard_credentials(locked: KodkodServer) -> None:
    """Keys on, no cors_origins: a page elsewhere (hosted KoboldAI Lite) may call with its
    user's key, but never with credentials; the key is still required."""
    r = httpx.options(
        f"{locked.base_url}/v1/chat/completions",
        timeout=10,
        headers={"origin": "https://lite.example", **PREFLIGHT},
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"  # no credentials, so * is safe
    assert r.headers.get("access-control-allow-credentials") is None
    r = httpx.get(f"{locked.base_url}/v1/model", timeout=10, headers={"origin": "https://lite.example"})
    assert r.status_code == 401
    r = httpx.get(
        f"{locked.base_url}/v1/model",
        timeout=10,
        headers={"origin": "https://lite.example", **locked.headers()},
    )
    assert r.status_code == 200


def test_a_page_from_elsewhere_is_refused_without_auth(opened: KodkodServer) -> None:
    r = httpx.options(
        f"{opened.base_url}/v1/chat/completions",
        timeout=10,
        headers={"origin": "https://evil.example", **PREFLIGHT},
    )
    assert r.status_code == 403
    assert r.headers.get("access-control-allow-origin") is None
    assert r.headers.get("access-control-allow-credentials") is None
    # A page served from this machine (another port) may call it, without credentials.
    r = httpx.options(
        f"{opened.base_url}/v1/chat/completions",
        timeout=10,
        headers={"origin": "http://localhost:8000", **PREFLIGHT},
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://localhost:8000"
    assert r.headers.get("access-control-allow-credentials") is None


def test_foreign_page_cannot_drive_a_server_without_auth(opened: KodkodServer) -> None:
    """A form-style POST (no preflight) from a foreign page is refused, keys or not."""
    r = httpx.post(
        f"{opened.base_url}/v1/completions",
        timeout=30,
        headers={"origin": "https://evil.example", "content-type": "text/plain"},
        content='{"prompt": "hi", "max_tokens": 1}',
    )
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = httpx.post(f"{opened.base_url}/v1/completions", timeout=60, json={"prompt": "hi", "max_tokens": 1})
    assert r.status_code == 200


# -- Kobold jobs belong to their key -----------------------------------------------------------


def test_kobold_job_is_invisible_and_unabortable_with_another_key(locked: KodkodServer) -> None:
    genkey = "KCPP-MINE"
    as_admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    events: list[dict[str, Any]] = []
    foreign: list[Any] = []
    own_check: dict[str, Any] = {}
    with (
        locked.client() as c,
        c.stream("POST", "/api/extra/generate/stream", json=long_body(genkey, 1024)) as r,
    ):
        for event in iter_events(r):
            events.append(event)
            if len(events) == 1:
                # The admin key is another caller: the job looks unknown to it.
                foreign.append(
                    c.post("/api/extra/generate/check", json={"genkey": genkey}, headers=as_admin).json()
                )
                foreign.append(c.post("/api/extra/abort", json={"genkey": genkey}, headers=as_admin).json())
                foreign.append(c.get(f"/api/extra/generate/check?genkey={genkey}", headers=as_admin).json())
            elif len(events) == 12:
                # Ten more tokens after the foreign abort: it did not stop the job.
                assert all(e["finish_reason"] is None for e in events)
                own_check = c.post("/api/extra/generate/check", json={"genkey": genkey}).json()
                assert c.post("/api/extra/abort", json={"genkey": genkey}).json() == {"success": True}
    assert foreign == [{"results": []}, {"success": True}, {"results": []}]
    assert own_check["results"] and own_check["results"][0]["text"]
    assert events[-1]["finish_reason"] == "stop" and len(events) < 1024
    settle(locked)


# -- logging ----------------------------------------------------------------------------------


def test_log_prompt_and_params_are_logged_and_keys_never(locked: KodkodServer) -> None:
    marker = "zebra marmalade 7741"
    with locked.client() as c:
        r = c.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": f"Say {marker}"}],
                "max_tokens": 4,
                "temperature": 0.5,
                "user": WRONG_KEY,
            },
        )
        assert r.status_code == 200
        reply = r.json()["choices"][0]["message"]["content"]
        assert c.get("/v1/model/list", headers={"x-admin-key": ADMIN_KEY}).status_code == 200
        assert c.get("/v1/model", headers={"x-api-key": API_KEY}).status_code == 200
        assert c.get("/v1/model", headers={"x-api-key": WRONG_KEY}).status_code == 401
        assert c.get("/v1/model", headers={"authorization": f"Bearer {WRONG_KEY}"}).status_code == 401
        assert c.get(f"/v1/model?api_key={API_KEY}").status_code == 200
    log = after_banner(wait_for_log(locked, "response "))
    assert marker in log  # the prompt (log_prompt)
    assert "temperature=0.5" in log and "max_tokens=4" in log  # log_generation_params
    assert "response " in log and repr(reply)[1:-1] in log  # the generated text (log_prompt)
    assert "GET '/v1/model/list'" in log  # log_requests
    assert "<redacted>" in log
    for secret in (API_KEY, ADMIN_KEY, WRONG_KEY):
        assert secret not in log


def test_prompts_stay_out_of_the_log_when_log_prompt_is_off(opened: KodkodServer) -> None:
    marker = "quokka lantern 9182"
    r = httpx.post(
        f"{opened.base_url}/v1/completions", timeout=60, json={"prompt": f"Say {marker}", "max_tokens": 4}
    )
    assert r.status_code == 200
    assert marker not in opened.log()
    assert "prompt " not in opened.log() and "generation params" not in opened.log()


# -- key revocation (last: it removes the key file for a moment) -------------------------------


def _wait_status(client: httpx.Client, path: str, status: int, timeout_s: float = 20.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        got = client.get(path).status_code
        if got == status or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_deleting_the_key_file_revokes_every_key_until_it_is_back(locked: KodkodServer) -> None:
    tokens = locked.workdir / "api_tokens.yml"
    saved = tokens.read_bytes()
    try:
        with locked.client() as c, locked.client(admin=True) as admin:
            assert c.get("/v1/model").status_code == 200
            tokens.unlink()
            assert _wait_status(c, "/v1/model", 401) == 401
            assert admin.get("/v1/model/list").status_code == 401
            assert c.get("/health").status_code == 200  # open routes stay open
    finally:
        tmp = tokens.with_suffix(".new")
        tmp.write_bytes(saved)
        os.chmod(tmp, 0o600)
        os.replace(tmp, tokens)
    with locked.client() as c:
        assert _wait_status(c, "/v1/model", 200) == 200
    log = after_banner(locked.log())
    assert log.count("every key is refused") == 1
    assert API_KEY not in log and ADMIN_KEY not in log


# -- keys before bodies ------------------------------------------------------------------------


def _raw_post_head(port: int, path: str, headers: dict[str, str], length: int) -> str:
    """Send only the head of a POST (and 10 body bytes) announcing `length` bytes; return what
    the server answers before the rest of the body would arrive."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {length}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + b'{"prompt":')
        return s.recv(4096).decode("latin-1")


def test_keys_are_checked_before_the_body_is_read(locked: KodkodServer) -> None:
    """A request without a valid key is refused with 401 before its body arrives (the server
    does not wait for, read or parse it); with a key the server waits for the body."""
    head = _raw_post_head(locked.port, "/v1/completions", {"Authorization": f"Bearer {WRONG_KEY}"}, 1_000_000)
    assert head.startswith("HTTP/1.1 401"), head
    head = _raw_post_head(locked.port, "/v1/completions", {}, 1_000_000)
    assert head.startswith("HTTP/1.1 401"), head
    # a valid key: the server waits for the rest of the body
    with pytest.raises(TimeoutError), socket.create_connection(("127.0.0.1", locked.port), timeout=2) as s:
        s.sendall(
            (
                f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {API_KEY}\r\nContent-Length: 1000000\r\n\r\n"
            ).encode()
        )
        s.recv(4096)
    with locked.client() as c:  # and the server is fine
        assert c.get("/v1/model").status_code == 200
