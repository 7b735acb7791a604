"""Foundation, end to end on a real server with the default model: keys on every route, model
info, token round trips, error shapes."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from kodkod.api.deps import iter_route_permissions
from kodkod.app import create_app
from kodkod.auth import KeyStore, Permission
from kodkod.settings import Settings
from tests.server import DEFAULT_MODEL, KodkodServer

pytestmark = pytest.mark.model

WRONG = "not-a-key-0000000000000000000000"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path):
    s = KodkodServer.start(
        tmp_path_factory.mktemp("foundation"), {"network": {"api_servers": ["OAI", "Kobold"]}}
    )
    yield s
    s.stop()


def route_table() -> list[tuple[str, str, Permission]]:
    settings = Settings.model_validate({"network": {"api_servers": ["OAI", "Kobold"]}})
    app = create_app(settings, keys=KeyStore(Path("unused.yml"), disabled=True), backend_loader=None)  # type: ignore[arg-type]
    rows = []
    for path, methods, perm in iter_route_permissions(app.routes):
        for method in sorted(methods - {"HEAD"}):
            rows.append((path.replace("{model_id:path}", "x").replace("{model_id}", "x"), method, perm))
    return rows


def call(srv: KodkodServer, method: str, path: str, headers: dict[str, str]) -> int:
    kw = {"json": {}} if method in ("POST", "PUT") else {}
    r = httpx.request(method, srv.base_url + path, headers=headers, timeout=60, **kw)
    return r.status_code


def test_route_table_is_complete() -> None:
    rows = route_table()
    paths = {p for p, _, _ in rows}
    for expected in (
        "/health",
        "/v1/models",
        "/v1/model",
        "/v1/model/load",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/token/encode",
        "/v1/auth/permission",
        "/docs",
    ):
        assert expected in paths or expected == "/docs"
    assert len(rows) > 30


def test_auth_matrix_every_route(srv: KodkodServer) -> None:
    """Each route: no key, a wrong key, the api key and the admin key, against its permission."""
    rows = route_table()
    destructive = [r for r in rows if r[0] == "/v1/model/unload"]
    rows = [r for r in rows if r not in destructive] + destructive
    failures = []
    for path, method, perm in rows:
        none = call(srv, method, path, {})
        wrong = call(srv, method, path, {"Authorization": f"Bearer {WRONG}", "x-api-key": WRONG})
        api = call(srv, method, path, {"Authorization": f"Bearer {srv.api_key}"})
        if perm is Permission.ADMIN:
            expect = (none == 401, wrong == 401, api == 401)
        elif perm is Permission.API:
            expect = (none == 401, wrong == 401, api != 401)
        else:
            expect = (none != 401, wrong != 401, api != 401)
        admin = call(srv, method, path, {"Authorization": f"Bearer {srv.admin_key}"})
        if not all(expect) or admin == 401:
            failures.append((method, path, perm.value, none, wrong, api, admin))
    assert not failures, failures
    # and the server still works after the admin pass (unload came last): reload the model
    r = httpx.post(
        srv.base_url + "/v1/model/load",
        headers=srv.headers(admin=True),
        json={"model_name": DEFAULT_MODEL},
        timeout=120,
    )
    assert r.status_code == 200
    assert "finished" in r.text


def test_sillytavern_style_double_header_and_admin_headers(srv: KodkodServer) -> None:
    h = {"x-api-key": srv.api_key, "Authorization": f"Bearer {srv.api_key}"}
    assert httpx.get(srv.base_url + "/v1/auth/permission", headers=h).json() == {"permission": "api"}
    h = {"x-admin-key": srv.admin_key}
    assert httpx.get(srv.base_url + "/v1/auth/permission", headers=h).json() == {"permission": "admin"}
    # an admin key in x-api-key does not open admin routes (reference §2.3)
    r = httpx.post(srv.base_url + "/v1/template/unload", headers={"x-api-key": srv.admin_key})
    assert r.status_code == 401


def test_model_card_and_lists(srv: KodkodServer) -> None:
    with srv.client() as c:
        r = c.get("/v1/model")
        assert r.status_code == 200
        card = r.json()
        assert card["id"] == DEFAULT_MODEL and card["object"] == "model"
        assert card["parameters"]["max_seq_len"] == 8192
        assert card["parameters"]["prompt_template"]
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [DEFAULT_MODEL]
        assert c.get("/v1/models/nope").status_code == 404
    with srv.client(admin=True) as c:
        ids = [m["id"] for m in c.get("/v1/model/list").json()["data"]]
        assert DEFAULT_MODEL in ids


@pytest.mark.parametrize(
    "text",
    [
        "Hello 👋 wörld! 你好，世界 🧑‍🚀",  # noqa: RUF001 - a full-width comma on purpose
        "",
        "  leading spaces\n\ttabs",
        "<|im_start|>user\nhi<|im_end|>",
    ],
)
def test_token_round_trip(srv: KodkodServer, text: str) -> None:
    with srv.client() as c:
        enc = c.post("/v1/token/encode", json={"text": text})
        assert enc.status_code == 200
        body = enc.json()
        assert body["length"] == len(body["tokens"])
        dec = c.post("/v1/token/decode", json={"tokens": body["tokens"]})
        assert dec.status_code == 200
        assert dec.json()["text"] == text


def test_special_tokens_flags(srv: KodkodServer) -> None:
    with srv.client() as c:
        special = c.post("/v1/token/encode", json={"text": "<|im_end|>"}).json()["tokens"]
        assert special == [2]
        body = {"text": "<|im_end|>", "encode_special_tokens": False}
        plain = c.post("/v1/token/encode", json=body).json()["tokens"]
        assert plain != [2] and len(plain) > 1
        hidden_body = {"tokens": [2], "decode_special_tokens": False}
        hidden = c.post("/v1/token/decode", json=hidden_body).json()["text"]
        assert hidden == ""
        assert c.post("/v1/token/decode", json={"tokens": [10**9]}).status_code == 400


def test_encode_messages_with_template(srv: KodkodServer) -> None:
    with srv.client() as c:
        msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
        ids = c.post("/v1/token/encode", json={"text": msgs}).json()["tokens"]
        text = c.post("/v1/token/decode", json={"tokens": ids}).json()["text"]
        assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"


def test_error_shapes(srv: KodkodServer) -> None:
    r = httpx.get(srv.base_url + "/v1/model")
    assert r.status_code == 401
    assert r.json()["error"]["message"] and r.json()["detail"]
    with srv.client() as c:
        r = c.post("/v1/completions", json={"prompt": "x", "temperature": "hot"})
        assert r.status_code == 422 and isinstance(r.json()["detail"], list)
        assert "temperature" in r.json()["error"]["message"]


def test_health_and_docs_are_open(srv: KodkodServer) -> None:
    assert httpx.get(srv.base_url + "/health").json()["status"] == "healthy"
    assert httpx.get(srv.base_url + "/openapi.json").status_code == 200
    assert httpx.get(srv.base_url + "/docs").status_code == 200
