"""TabbyAPI's error table (status and body of every error path), one test per row, end to end.

Every error body carries both shapes (`{"detail": …}` and OpenAI's `{"error": {message, type,
param, code}}`); validation errors keep FastAPI's 422 detail list. The rows that cannot be
reached over HTTP with the real model (a generation failure, a client that vanished, an
unhandled exception) are tested with the fake backend in tests/api/test_error_table_unit.py.
Rows where kodkod answers differently on purpose say why.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import DEFAULT_MODEL, GEMMA_MODEL, KodkodServer

pytestmark = pytest.mark.model

WRONG_KEY = "not-a-key-0000000000000000000000"
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    s = KodkodServer.start(
        tmp_path_factory.mktemp("error-table"),
        {
            "network": {"api_servers": ["OAI", "Kobold"]},
            "model": {"inline_model_loading": True},
            "lora": {"lora_dir": "no-such-lora-dir"},
        },
    )
    (s.workdir / "templates" / "broken.jinja").write_text("{{ raise_exception('broken on purpose') }}")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def admin(server: KodkodServer) -> Iterator[httpx.Client]:
    with server.client(admin=True) as c:
        yield c


@pytest.fixture(scope="module")
def api(server: KodkodServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def reload_default(admin: httpx.Client) -> None:
    admin.post("/v1/model/unload")
    with admin.stream("POST", "/v1/model/load", json={"model_name": DEFAULT_MODEL}) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert events and events[-1].get("status") == "finished", events[-1:]


def check(r: httpx.Response, status: int, needle: str = "") -> dict[str, Any]:
    """Status, both body shapes, and the message."""
    assert r.status_code == status, (r.status_code, r.text)
    body = dict(r.json())
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"] and body["detail"]
    if status != 422:
        assert body["detail"] == err["message"]
    assert needle.lower() in err["message"].lower(), err["message"]
    return body


def test_row_validation_422(api: httpx.Client) -> None:
    body = check(api.post("/v1/completions", json={"prompt": "x", "temperature": "hot"}), 422, "temperature")
    assert isinstance(body["detail"], list) and body["detail"][0]["loc"][-1] == "temperature"
    assert {"type", "loc", "msg", "input"} <= set(body["detail"][0])
    body = check(api.post("/v1/completions", json={"max_tokens": 4}), 422)  # missing required field
    assert body["detail"][0]["type"] == "missing"


@pytest.mark.parametrize("headers", [{}, {"Authorization": f"Bearer {WRONG_KEY}"}, {"x-api-key": WRONG_KEY}])
def test_row_missing_or_invalid_key_401(server: KodkodServer, headers: dict[str, str]) -> None:
    check(httpx.post(server.base_url + "/v1/completions", json={"prompt": "x"}, headers=headers), 401)


def test_row_admin_route_with_api_key_401(api: httpx.Client) -> None:
    check(api.post("/v1/model/unload"), 401)


def test_row_no_model_loaded_503(admin: httpx.Client, api: httpx.Client) -> None:
    assert admin.post("/v1/model/unload").status_code == 200
    try:
        for method, path, body in [
            ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}),
            ("POST", "/v1/chat/completions", CHAT),
            ("POST", "/v1/token/encode", {"text": "x"}),
            ("GET", "/v1/model", None),
            ("POST", "/api/v1/generate", {"prompt": "x"}),
        ]:
            r = api.request(method, path, json=body)
            assert check(r, 503, "no model")["error"]["code"] == "model_not_loaded", path
        check(admin.post("/v1/model/unload"), 503, "no model")
    finally:
        reload_default(admin)


def test_row_embeddings_without_embedding_model(api: httpx.Client, admin: httpx.Client) -> None:
    # TabbyAPI (newest era): 503 while no embedding model is loaded, 400 for a failed embedding load
    body = check(api.post("/v1/embeddings", json={"input": "x"}), 503, "embedding")
    assert body["error"]["code"] == "model_not_loaded"
    check(admin.post("/v1/model/embedding/load", json={"embedding_model_name": "x"}), 400, "x")


def test_row_chat_without_template_422(admin: httpx.Client, api: httpx.Client) -> None:
    assert admin.post("/v1/template/unload").status_code == 200
    try:
        check(api.post("/v1/chat/completions", json=CHAT), 422, "template")
    finally:
        reload_default(admin)


def test_row_template_render_error_400(admin: httpx.Client, api: httpx.Client) -> None:
    assert admin.post("/v1/template/switch", json={"prompt_template_name": "broken"}).status_code == 200
    try:
        body = check(api.post("/v1/chat/completions", json=CHAT), 400, "broken on purpose")
        assert body["detail"].startswith("TemplateError:")
    finally:
        reload_default(admin)


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/v1/model/load", {"model_name": ""}, "required"),
        ("/v1/model/load", {"model_name": "no-such-model"}, "not found"),
        ("/v1/model/load", {"model_name": "../../etc"}, "invalid model name"),
        ("/v1/sampling/override/switch", {"preset": "no-such-preset"}, "no-such-preset"),
        ("/v1/sampling/override/switch", {}, ""),
        ("/v1/lora/load", {"loras": []}, ""),
        ("/v1/lora/load", {"loras": [{"name": "x"}]}, "lora"),
    ],
    ids=["empty-name", "missing-model", "outside", "unknown-preset", "no-preset", "no-loras", "no-lora-dir"],
)
def test_row_load_or_switch_400(admin: httpx.Client, path: str, body: dict[str, Any], needle: str) -> None:
    check(admin.post(path, json=body), 400, needle)


def test_row_unknown_template_switch_400(admin: httpx.Client) -> None:
    # upstream: a plain-text 500 (an uncaught loader error); the table says a clean server
    # answers 400
    check(admin.post("/v1/template/switch", json={"prompt_template_name": "no-such-template"}), 400)


@pytest.mark.parametrize(
    "fields",
    [{"min_tokens": 10, "max_tokens": 5}, {"min_temp": 1.5, "max_temp": 0.5}],
    ids=["min_tokens", "min_temp"],
)
def test_row_cross_field_422(api: httpx.Client, fields: dict[str, Any]) -> None:
    # upstream: a 500 without a body (the check raises outside pydantic); clean server: 422
    check(api.post("/v1/completions", json={"prompt": "x", **fields}), 422, next(iter(fields)))


def test_row_token_encode_422(admin: httpx.Client, api: httpx.Client) -> None:
    check(api.post("/v1/token/encode", json={"text": 5}), 422)
    assert admin.post("/v1/template/unload").status_code == 200
    try:
        r = api.post("/v1/token/encode", json={"text": [{"role": "user", "content": "x"}]})
        check(r, 422, "template")
    finally:
        reload_default(admin)


def test_row_inline_switch_with_api_key_401(api: httpx.Client) -> None:
    check(api.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "model": GEMMA_MODEL}), 401)


def test_row_context_overflow_400(api: httpx.Client) -> None:
    prompt = "word " * 9000  # more than the default model's 8192-token context
    for stream in (False, True):
        r = api.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "stream": stream})
        body = check(r, 400)
        assert body["error"]["code"] == "context_length_exceeded"
        assert body["error"]["type"] == "invalid_request_error"


def test_row_download_failure_400(admin: httpx.Client) -> None:
    check(admin.post("/v1/download", json={"repo_id": "a/b", "folder_name": ".."}), 400, "folder name")
