"""Unit tests for kodkod.auth (key file, header checks, hot reload) and kodkod.api.deps."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute

from kodkod.api.deps import (
    ADMIN,
    API,
    current_permission,
    iter_route_permissions,
    route_permission,
)
from kodkod.auth import (
    AuthConfigError,
    AuthError,
    KeyStore,
    Permission,
    disable_auth_warning,
    is_loopback_host,
)

API_KEY = "a" * 32
API_KEY_2 = "b" * 32
ADMIN_KEY = "c" * 32


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def write_keys(path: Path, api: str | list[str], admin: str) -> None:
    """Write a key file and force its mtime forward so a reload always sees a change."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(yaml.safe_dump({"api_key": api, "admin_key": admin}))
    bumped = max(path.stat().st_mtime_ns, before + 1_000_000_000)
    os.utime(path, ns=(bumped, bumped))


def make_store(
    tmp_path: Path, api: str | list[str] = API_KEY, admin: str = ADMIN_KEY, clock: FakeClock | None = None
) -> KeyStore:
    path = tmp_path / "api_tokens.yml"
    write_keys(path, api, admin)
    store = KeyStore(path, disabled=False, clock=clock or FakeClock())
    assert store.load_or_create() is False
    return store


# -- key file -------------------------------------------------------------------------------


def test_creates_file_with_0600_and_hex_keys(tmp_path: Path) -> None:
    path = tmp_path / "api_tokens.yml"
    store = KeyStore(path, disabled=False)
    assert store.load_or_create() is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = yaml.safe_load(path.read_text())
    assert set(data) == {"api_key", "admin_key"}
    for key in (data["api_key"], data["admin_key"]):
        assert re.fullmatch(r"[0-9a-f]{32}", key)
    assert data["api_key"] != data["admin_key"]
    assert store.check_api({"x-api-key": data["api_key"]}) is Permission.API
    assert store.check_admin({"x-admin-key": data["admin_key"]}) is Permission.ADMIN


def test_existing_file_is_reused(tmp_path: Path) -> None:
    path = tmp_path / "api_tokens.yml"
    assert KeyStore(path, disabled=False).load_or_create() is True
    first = path.read_text()
    second_store = KeyStore(path, disabled=False)
    assert second_store.load_or_create() is False
    assert path.read_text() == first
    api_key = yaml.safe_load(first)["api_key"]
    assert second_store.check_api({"x-api-key": api_key}) is Permission.API


def test_list_of_api_keys(tmp_path: Path) -> None:
    store = make_store(tmp_path, api=[API_KEY, API_KEY_2])
    assert store.check_api({"x-api-key": API_KEY}) is Permission.API
    assert store.check_api({"authorization": f"Bearer {API_KEY_2}"}) is Permission.API
    with pytest.raises(AuthError):
        store.check_api({"x-api-key": "d" * 32})


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("api_key: [unclosed\nadmin_key: x\n", "invalid YAML"),
        (f"api_key: {API_KEY}\n", "admin_key"),
        (f"admin_key: {ADMIN_KEY}\n", "api_key"),
        (f"api_key: 5\nadmin_key: {ADMIN_KEY}\n", "api_key"),
        (f"api_key: []\nadmin_key: {ADMIN_KEY}\n", "api_key"),
        (f"api_key: ['{API_KEY}', '']\nadmin_key: {ADMIN_KEY}\n", "api_key"),
        (f"api_key: {API_KEY}\nadmin_key: [x]\n", "admin_key"),
        (f"api_key: {API_KEY}\nadmin_key: ''\n", "admin_key"),
        ("- just\n- a list\n", "mapping"),
        ("", "mapping"),
    ],
)
def test_bad_key_file_is_one_line_config_error(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "api_tokens.yml"
    path.write_text(text)
    with pytest.raises(AuthConfigError) as info:
        KeyStore(path, disabled=False).load_or_create()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert fragment in message
    assert API_KEY not in message and ADMIN_KEY not in message


def test_yaml_error_does_not_quote_the_file(tmp_path: Path) -> None:
    path = tmp_path / "api_tokens.yml"
    path.write_text(f"api_key: {API_KEY}\nadmin_key: {ADMIN_KEY}\n  bad: : [\n")
    with pytest.raises(AuthConfigError) as info:
        KeyStore(path, disabled=False).load_or_create()
    assert ADMIN_KEY not in str(info.value) and "\n" not in str(info.value)


def test_disabled_reads_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "api_tokens.yml"
    store = KeyStore(path, disabled=True)
    assert store.load_or_create() is False
    assert not path.exists()
    assert store.check_api({}) is Permission.ADMIN
    assert store.check_admin({}) is Permission.ADMIN
    assert store.permission_of({}) is Permission.ADMIN


# -- header checks --------------------------------------------------------------------------


def test_x_api_key_alone_decides(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    headers = {"x-api-key": "wrong", "authorization": f"Bearer {API_KEY}"}
    with pytest.raises(AuthError, match="Invalid API key"):
        store.check_api(headers)


def test_sillytavern_sends_both_headers(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    headers = {"x-api-key": API_KEY, "authorization": f"Bearer {API_KEY}"}
    assert store.check_api(headers) is Permission.API


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_case_insensitive(tmp_path: Path, scheme: str) -> None:
    store = make_store(tmp_path)
    assert store.check_api({"authorization": f"{scheme} {API_KEY}"}) is Permission.API
    assert store.check_admin({"authorization": f"{scheme} {ADMIN_KEY}"}) is Permission.ADMIN


@pytest.mark.parametrize("value", [API_KEY, f"Basic {API_KEY}", "Bearer", "Bearer wrong"])
def test_malformed_or_wrong_authorization(tmp_path: Path, value: str) -> None:
    store = make_store(tmp_path)
    with pytest.raises(AuthError, match="Invalid API key"):
        store.check_api({"authorization": value})


def test_missing_key_messages(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with pytest.raises(AuthError, match="Please provide an API key"):
        store.check_api({})
    with pytest.raises(AuthError, match="Please provide an admin key"):
        store.check_admin({})
    with pytest.raises(AuthError):
        store.permission_of({})


def test_admin_key_accepted_for_api(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    assert store.check_api({"x-api-key": ADMIN_KEY}) is Permission.ADMIN
    assert store.check_api({"authorization": f"Bearer {ADMIN_KEY}"}) is Permission.ADMIN


def test_api_key_refused_by_admin_check(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    for headers in ({"x-admin-key": API_KEY}, {"authorization": f"Bearer {API_KEY}"}):
        with pytest.raises(AuthError, match="Invalid admin key"):
            store.check_admin(headers)


def test_admin_key_in_x_api_key_refused_by_admin_check(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with pytest.raises(AuthError, match="Please provide an admin key"):
        store.check_admin({"x-api-key": ADMIN_KEY})


def test_x_admin_key_decides_admin_check(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with pytest.raises(AuthError, match="Invalid admin key"):
        store.check_admin({"x-admin-key": "wrong", "authorization": f"Bearer {ADMIN_KEY}"})


def test_permission_of_precedence(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    assert store.permission_of({"x-admin-key": ADMIN_KEY, "x-api-key": API_KEY}) is Permission.ADMIN
    assert (
        store.permission_of({"x-api-key": API_KEY, "authorization": f"Bearer {ADMIN_KEY}"}) is Permission.API
    )
    assert store.permission_of({"authorization": f"bearer {ADMIN_KEY}"}) is Permission.ADMIN
    assert store.permission_of({"authorization": API_KEY}) is Permission.API
    with pytest.raises(AuthError, match="Invalid"):
        store.permission_of({"x-admin-key": "wrong", "x-api-key": API_KEY})


# -- hot reload -----------------------------------------------------------------------------


def test_hot_reload_after_interval(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, clock=clock)
    write_keys(store.path, API_KEY_2, ADMIN_KEY)
    # Within the interval the file is not even stat-ed: the old key still works.
    clock.advance(1.0)
    assert store.check_api({"x-api-key": API_KEY}) is Permission.API
    clock.advance(1.5)
    assert store.check_api({"x-api-key": API_KEY_2}) is Permission.API
    with pytest.raises(AuthError):
        store.check_api({"x-api-key": API_KEY})


def test_reload_if_changed(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    assert store.reload_if_changed() is False
    write_keys(store.path, [API_KEY, API_KEY_2], "e" * 32)
    assert store.reload_if_changed() is True
    assert store.check_admin({"x-admin-key": "e" * 32}) is Permission.ADMIN
    with pytest.raises(AuthError):
        store.check_admin({"x-admin-key": ADMIN_KEY})


def test_broken_edit_revokes_every_key_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, clock=clock)
    store.path.write_text("api_key: [broken\n")
    os.utime(store.path, ns=(10**18, 10**18))
    with caplog.at_level(logging.WARNING, logger="kodkod.auth"):
        for _ in range(3):
            clock.advance(5.0)
            with pytest.raises(AuthError):
                store.check_api({"x-api-key": API_KEY})
            with pytest.raises(AuthError):
                store.check_admin({"x-admin-key": ADMIN_KEY})
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    # Fixing the file makes the new keys take effect.
    write_keys(store.path, API_KEY_2, ADMIN_KEY)
    clock.advance(5.0)
    assert store.check_api({"x-api-key": API_KEY_2}) is Permission.API


def test_keys_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "api_tokens.yml"
    clock = FakeClock()
    with caplog.at_level(logging.DEBUG):
        store = KeyStore(path, disabled=False, clock=clock)
        store.load_or_create()
        created = yaml.safe_load(path.read_text())
        secrets_seen = [created["api_key"], created["admin_key"], API_KEY_2, "e" * 32]
        failing = [
            (store.check_api, {"x-api-key": created["api_key"][::-1]}),
            (store.check_api, {"authorization": f"Basic {created['api_key']}"}),
            (store.check_admin, {"x-admin-key": created["api_key"]}),
            (store.check_admin, {"x-api-key": created["admin_key"]}),
            (store.permission_of, {"x-admin-key": "nope"}),
        ]
        for check, headers in failing:
            with pytest.raises(AuthError) as info:
                check(headers)
            assert all(key not in info.value.message for key in created.values())
        write_keys(path, API_KEY_2, "e" * 32)
        clock.advance(5.0)
        store.check_api({"x-api-key": API_KEY_2})
        path.write_text(f"api_key: {API_KEY_2}\nadmin_key: {'e' * 32}\n  x: : [\n")
        os.utime(path, ns=(10**18, 10**18))
        assert store.reload_if_changed() is False
        path.unlink()
        assert store.reload_if_changed() is False
    assert caplog.records, "expected reload messages to be logged"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for key in secrets_seen:
        assert key not in logged
    banner = store.banner()
    assert created["admin_key"] not in banner  # banner reflects the current (reloaded) keys
    assert API_KEY_2 in banner and "e" * 32 in banner and str(path) in banner


def test_banner_shows_keys_and_path(tmp_path: Path) -> None:
    store = make_store(tmp_path, api=[API_KEY, API_KEY_2])
    banner = store.banner()
    for text in (API_KEY, API_KEY_2, ADMIN_KEY, str(store.path)):
        assert text in banner
    assert ADMIN_KEY not in KeyStore(store.path, disabled=True).banner()


def test_loopback_and_disable_warning() -> None:
    for host in ("127.0.0.1", "127.8.9.10", "localhost", "::1", "[::1]", "::ffff:127.0.0.1"):
        assert is_loopback_host(host), host
        assert disable_auth_warning(host) is None
    for host in ("0.0.0.0", "::", "192.168.1.2", "example.com", ""):
        assert not is_loopback_host(host), host
        warning = disable_auth_warning(host)
        assert warning is not None and "disabled" in warning


# -- FastAPI dependencies -------------------------------------------------------------------


def make_app(store: KeyStore) -> FastAPI:
    app = FastAPI()
    app.state.keys = store

    @app.get("/open")
    async def open_route() -> dict[str, str]:
        return {"ok": "open"}

    @app.get("/api", dependencies=[API])
    async def api_route() -> dict[str, str]:
        return {"ok": "api"}

    @app.get("/admin", dependencies=[ADMIN])
    async def admin_route() -> dict[str, str]:
        return {"ok": "admin"}

    @app.get("/perm")
    async def perm_route(perm: Permission = Depends(current_permission)) -> dict[str, str]:
        return {"permission": perm.value}

    return app


class Client:
    """A tiny sync wrapper over httpx's ASGI transport (no server, no event-loop plugin)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def get(self, url: str, headers: dict[str, str] | None = None) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.get(url, headers=headers)

        return asyncio.run(go())


def test_fastapi_401_vs_200(tmp_path: Path) -> None:
    client = Client(make_app(make_store(tmp_path)))
    assert client.get("/open").status_code == 200
    missing = client.get("/api")
    assert missing.status_code == 401
    assert missing.json() == {"detail": "Please provide an API key"}
    assert client.get("/api", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/api", headers={"X-API-Key": API_KEY}).status_code == 200
    assert client.get("/api", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
    assert client.get("/admin", headers={"X-API-Key": ADMIN_KEY}).status_code == 401
    assert client.get("/admin", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 401
    assert client.get("/admin", headers={"X-Admin-Key": ADMIN_KEY}).status_code == 200
    assert client.get("/perm").status_code == 401
    assert client.get("/perm", headers={"X-API-Key": API_KEY}).json() == {"permission": "api"}
    assert client.get("/perm", headers={"X-API-Key": ADMIN_KEY}).json() == {"permission": "admin"}


def test_fastapi_disabled_auth(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "api_tokens.yml", disabled=True)
    store.load_or_create()
    client = Client(make_app(store))
    assert client.get("/admin").status_code == 200
    assert client.get("/perm").json() == {"permission": "admin"}


def test_route_permission(tmp_path: Path) -> None:
    app = make_app(make_store(tmp_path))
    levels = {r.path: route_permission(r) for r in app.routes if isinstance(r, APIRoute)}
    assert levels == {
        "/open": Permission.NONE,
        "/api": Permission.API,
        "/admin": Permission.ADMIN,
        "/perm": Permission.API,
    }


def test_route_permission_nested_and_included_routers() -> None:
    from fastapi import APIRouter

    async def needs_admin(_: Permission = ADMIN) -> None:
        return None

    router = APIRouter(dependencies=[API])

    @router.get("/nested", dependencies=[Depends(needs_admin)])
    async def nested() -> None:
        return None

    @router.get("/plain")
    async def plain() -> None:
        return None

    open_router = APIRouter()

    @open_router.post("/x")
    async def x() -> None:
        return None

    app = FastAPI()
    app.include_router(router, prefix="/v1")
    app.include_router(open_router, prefix="/open")
    app.include_router(open_router, prefix="/guarded", dependencies=[ADMIN])
    levels = {path: perm for path, _, perm in iter_route_permissions(app.routes)}
    assert levels == {
        "/v1/nested": Permission.ADMIN,
        "/v1/plain": Permission.API,
        "/open/x": Permission.NONE,
        "/guarded/x": Permission.ADMIN,
    }
    # The router's own routes carry their router-level dependencies too.
    direct = {r.path: route_permission(r) for r in router.routes if isinstance(r, APIRoute)}
    assert direct == {"/nested": Permission.ADMIN, "/plain": Permission.API}


def test_deleted_key_file_revokes_every_key_until_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, clock=clock)
    assert store.check_api({"x-api-key": API_KEY}) is Permission.API
    store.path.unlink()
    with caplog.at_level(logging.WARNING, logger="kodkod.auth"):
        for _ in range(3):
            clock.advance(5.0)
            for check, headers in (
                (store.check_api, {"x-api-key": API_KEY}),
                (store.check_api, {"authorization": f"Bearer {ADMIN_KEY}"}),
                (store.check_admin, {"x-admin-key": ADMIN_KEY}),
                (store.permission_of, {"x-api-key": API_KEY}),
            ):
                with pytest.raises(AuthError):
                    check(headers)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert API_KEY not in warnings[0] and ADMIN_KEY not in warnings[0]
    assert store.revoked
    # The file is back (with other keys): those work, the deleted ones stay revoked.
    write_keys(store.path, API_KEY_2, ADMIN_KEY)
    clock.advance(5.0)
    assert store.check_api({"x-api-key": API_KEY_2}) is Permission.API
    assert store.check_admin({"x-admin-key": ADMIN_KEY}) is Permission.ADMIN
    with pytest.raises(AuthError):
        store.check_api({"x-api-key": API_KEY})
    assert not store.revoked


def test_changed_key_file_revokes_the_old_keys(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, clock=clock)
    write_keys(store.path, [API_KEY_2], "e" * 32)
    os.utime(store.path, ns=(10**18, 10**18))
    clock.advance(5.0)
    with pytest.raises(AuthError):
        store.check_api({"x-api-key": API_KEY})
    with pytest.raises(AuthError):
        store.check_admin({"x-admin-key": ADMIN_KEY})
    assert store.check_api({"x-api-key": API_KEY_2}) is Permission.API


def test_revoked_store_gives_401_over_http(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, clock=clock)
    app = FastAPI()
    app.state.keys = store

    @app.get("/secret", dependencies=[API])
    async def secret() -> dict[str, bool]:
        return {"ok": True}

    async def go() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            codes = [(await client.get("/secret", headers={"x-api-key": API_KEY})).status_code]
            store.path.unlink()
            clock.advance(5.0)
            codes.append((await client.get("/secret", headers={"x-api-key": API_KEY})).status_code)
            write_keys(store.path, API_KEY, ADMIN_KEY)
            clock.advance(5.0)
            codes.append((await client.get("/secret", headers={"x-api-key": API_KEY})).status_code)
            return codes

    assert asyncio.run(go()) == [200, 401, 200]
