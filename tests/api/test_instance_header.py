"""`X-Kodkod-Instance` (kodkod.api.instance_header): every response of the app names the server
that gave it — successes, 401s, refusals by the Host guard, 413s, 404s and streams — in process,
no model."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from kodkod.api.instance_header import InstanceHeaderMiddleware
from kodkod.app import create_app
from kodkod.auth import KeyStore
from kodkod.settings import Settings
from kodkod.settings.sections import NetworkSettings


def client(tmp_path: Path, **network: object) -> TestClient:
    settings = Settings.model_validate(
        {"network": network, "limits": {"max_request_body_bytes": 1024}, "model": {"model_name": None}}
    )
    keys = KeyStore(tmp_path / "api_tokens.yml", disabled=False)
    keys.load_or_create()
    app = create_app(settings, keys=keys, backend_loader=None, base_dir=tmp_path)  # type: ignore[arg-type]
    return TestClient(app, base_url="http://localhost:5001")


def test_every_kind_of_answer_names_the_configured_instance(tmp_path: Path) -> None:
    c = client(tmp_path, instance_name="replica-a")
    answers = [
        c.get("/health"),  # 200
        c.get("/v1/models"),  # 401: no key
        c.get("/health", headers={"Host": "evil.example"}),  # 400 from the Host guard
        c.post("/v1/completions", content=b"x" * 4000),  # 413 before auth
        c.get("/no/such/route"),  # 404
    ]
    assert [r.status_code for r in answers] == [200, 401, 400, 413, 404]
    for r in answers:
        assert r.headers.get_list("x-kodkod-instance") == ["replica-a"]


def test_the_default_name_is_host_name_and_port(tmp_path: Path) -> None:
    r = client(tmp_path).get("/health")
    assert r.headers["x-kodkod-instance"] == f"{socket.gethostname()}:5001"


def test_streams_carry_the_header_and_an_app_header_of_that_name_is_replaced() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"data: {i}\n\n".encode()

    async def stream(_: Request) -> StreamingResponse:
        return StreamingResponse(
            chunks(), media_type="text/event-stream", headers={"X-Kodkod-Instance": "spoofed"}
        )

    app = InstanceHeaderMiddleware(Starlette(routes=[Route("/s", stream)]), name="r2")
    with TestClient(app).stream("GET", "/s") as r:
        assert r.headers.get_list("x-kodkod-instance") == ["r2"]
        assert "".join(r.iter_text()) == "data: 0\n\ndata: 1\n\ndata: 2\n\n"


@pytest.mark.parametrize("bad", ["a\nb", "tab\there", "caf\u00e9", "nul\x00"])
def test_instance_name_must_be_header_safe(bad: str) -> None:
    with pytest.raises(ValidationError, match="instance_name"):
        NetworkSettings.model_validate({"instance_name": bad})


def test_instance_name_is_trimmed() -> None:
    assert NetworkSettings.model_validate({"instance_name": "  r1  "}).instance_name == "r1"
