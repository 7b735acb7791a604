"""Host / Origin checks and the CORS policy (kodkod.api.guard), the request log's redaction,
and Kobold jobs scoped to their key — in process, no model."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from kodkod.api.guard import HostOriginGuard, HostPolicy, PolicyCORSMiddleware, host_name
from kodkod.api.kobold.jobs import JobTable, KoboldJob
from kodkod.api.request_log import REDACTED, redact_headers, redact_query
from kodkod.auth import KeyStore
from kodkod.settings.sections import NetworkSettings


def policy(host: str = "127.0.0.1", **network: object) -> HostPolicy:
    return HostPolicy.from_settings(NetworkSettings.model_validate({"host": host, **network}))


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:5000", "localhost"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]:5000", "::1"),
        ("Example.COM.", "example.com"),
        ("a:b", None),
        ("[::1", None),
        ("::1", None),
        (":80", None),
    ],
)
def test_host_name(header: str, name: str | None) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:5000", "127.0.0.1:5000", "127.9.8.7", "[::1]:80", None]
)
def test_loopback_bind_accepts_loopback_hosts(host: str | None) -> None:
    assert policy().host_allowed(host)


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:5000", "localhost.evil.example", "10.0.0.1:5000", "[::2]", "bad header:x"],
)
def test_loopback_bind_refuses_other_hosts(host: str) -> None:
    assert not policy().host_allowed(host)
    assert not policy("localhost").host_allowed(host)


def test_allowed_hosts_extend_the_list() -> None:
    p = policy(allowed_hosts=["api.example.com", "*.lan", "[fd00::1]"])
    assert p.host_allowed("API.example.com:443") and p.host_allowed("box.lan")
    assert p.host_allowed("[fd00::1]:5000") and p.host_allowed("localhost:1")
    assert not p.host_allowed("example.com") and not p.host_allowed("evil.example")
    assert policy(allowed_hosts=["*"]).host_allowed("anything.example")


def test_non_loopback_bind_accepts_any_host_unless_restricted() -> None:
    assert policy("0.0.0.0").host_allowed("evil.example:5000")
    restricted = policy("0.0.0.0", allowed_hosts=["server.lan"])
    assert restricted.host_allowed("server.lan:5000") and restricted.host_allowed("127.0.0.1")
    assert not restricted.host_allowed("evil.example")


def test_settings_reject_malformed_entries() -> None:
    with pytest.raises(ValueError):
        NetworkSettings.model_validate({"allowed_hosts": ["http://x.example"]})
    with pytest.raises(ValueError):
        NetworkSettings.model_validate({"cors_origins": ["x.example"]})
    ok = NetworkSettings.model_validate({"cors_origins": ["HTTPS://Lite.Example/", "null"]})
    assert ok.cors_origins == ["https://lite.example", "null"]


def test_origins_default_to_any_page_only_when_keys_are_required() -> None:
    assert policy().origin_allowed("https://lite.example")
    opened = policy(disable_auth=True)
    assert opened.origin_allowed("http://localhost:8080")
    assert not opened.origin_allowed("https://lite.example")


def test_origins() -> None:
    p = policy(cors_origins=["https://lite.example"])
    assert p.origin_allowed("http://localhost:8080") and p.origin_allowed("http://127.0.0.1")
    assert p.origin_allowed("http://[::1]:3000") and p.origin_allowed("https://lite.example")
    assert not p.origin_allowed("https://evil.example") and not p.origin_allowed("null")
    assert not p.origin_allowed("file://localhost") and not p.origin_allowed("garbage")
    # The server's own pages (e.g. /docs on a LAN name) are same-origin.
    assert policy("0.0.0.0").request_allowed("http://box.lan:5000", "box.lan:5000")
    assert not policy("0.0.0.0", disable_auth=True).request_allowed("http://evil.example", "box.lan:5000")
    assert policy(cors_origins=["*"]).origin_allowed("https://anything.example")


def _app(p: HostPolicy) -> TestClient:
    app = FastAPI()

    @app.post("/v1/thing")
    async def thing() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(PolicyCORSMiddleware, policy=p)
    app.add_middleware(HostOriginGuard, policy=p)
    return TestClient(app, base_url="http://127.0.0.1:5000")


def test_guard_refuses_foreign_host_and_origin_with_openai_errors() -> None:
    client = _app(policy(disable_auth=True))
    assert client.post("/v1/thing").json() == {"ok": True}
    r = client.post("/v1/thing", headers={"host": "evil.example:5000"})
    assert r.status_code == 400 and "allowed_hosts" in r.json()["error"]["message"]
    # A "simple" cross-site POST (no preflight) is refused, not just left without CORS headers.
    r = client.post("/v1/thing", headers={"origin": "https://evil.example", "content-type": "text/plain"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert "access-control-allow-origin" not in r.headers


def test_cors_reflects_allowed_origins_without_credentials() -> None:
    client = _app(policy(cors_origins=["https://lite.example"]))
    pre = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    r = client.options("/v1/thing", headers={"origin": "https://lite.example", **pre})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://lite.example"
    assert "access-control-allow-credentials" not in r.headers
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = client.post("/v1/thing", headers={"origin": "http://localhost:8080"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://localhost:8080"
    r = client.options("/v1/thing", headers={"origin": "https://evil.example", **pre})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers


def test_cors_star_never_with_credentials() -> None:
    client = _app(policy(cors_origins=["*"]))
    r = client.options(
        "/v1/thing", headers={"origin": "https://any.example", "access-control-request-method": "POST"}
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers


def test_request_log_redaction() -> None:
    headers = redact_headers(
        [
            (b"Authorization", b"Bearer sekrit"),
            (b"x-api-key", b"sekrit"),
            (b"X-Admin-Key", b"sekrit"),
            (b"cookie", b"a=sekrit"),
            (b"user-agent", b"curl"),
        ]
    )
    assert "sekrit" not in repr(headers) and ("user-agent", "curl") in headers
    assert redact_query("n=1&genkey=KCPP1&api_key=sekrit&token=x") == (
        f"n=1&genkey={REDACTED}&api_key={REDACTED}&token={REDACTED}"
    )


class _Engine:
    def __init__(self) -> None:
        self.aborted: list[str] = []

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def test_kobold_jobs_belong_to_their_key(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "api_tokens.yml", disabled=False)
    keys.load_or_create()
    a = keys.caller_id({"authorization": "Bearer key-a"})
    b = keys.caller_id({"x-api-key": "key-b"})
    assert a != b and a == keys.caller_id({"x-api-key": "key-a"})
    assert "key-a" not in (a or "")
    engine = _Engine()
    table = JobTable()
    job = KoboldJob("KCPP1", "r1", "127.0.0.1", False, engine, owner=a)  # type: ignore[arg-type]
    table.add(job)
    assert table.latest("KCPP1", "127.0.0.1", b) is None
    assert table.abort("KCPP1", "127.0.0.1", b) == 0 and engine.aborted == []
    assert table.latest("KCPP1", "127.0.0.1", a) is job
    assert table.abort("KCPP1", "127.0.0.1", a) == 1 and engine.aborted == ["r1"]
    # Auth disabled: no owner, everyone sees everything (today's behaviour).
    open_keys = KeyStore(tmp_path / "none.yml", disabled=True)
    assert open_keys.caller_id({"x-api-key": "whatever"}) is None
