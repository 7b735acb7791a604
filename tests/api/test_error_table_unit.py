"""The rows of TabbyAPI's error table that a real model cannot be made to hit on demand: a
generation that fails (non-streaming: 503), a client that goes away during a non-streamed
request (422, "cancelled"), and anything unhandled (500, never a traceback). The other rows
are tested end to end in tests/api/test_error_table.py."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from kodkod.api.errors import ApiError, install_error_handlers
from kodkod.api.generation import error_for
from kodkod.api.streaming import until_done
from kodkod.core.types import ErrorEvent, ErrorKind


def app_with(route: Any) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.post("/x")(route)
    return app


async def call(app: FastAPI) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post("/x", json={})


def both_shapes(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status
    body = dict(r.json())
    assert body["detail"] == body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body


def test_row_generation_failure_503() -> None:
    async def route() -> None:
        raise error_for(ErrorEvent("llama_decode failed for this sequence", ErrorKind.INTERNAL))

    body = both_shapes(asyncio.run(call(app_with(route))), 503)
    assert "llama_decode failed" in body["detail"]


def test_row_context_overflow_event_400() -> None:
    async def route() -> None:
        raise error_for(ErrorEvent("too long", ErrorKind.CONTEXT_LENGTH))

    body = both_shapes(asyncio.run(call(app_with(route))), 400)
    assert body["error"]["code"] == "context_length_exceeded"


class VanishedClient:
    async def is_disconnected(self) -> bool:
        return True


def test_row_client_gone_during_non_streamed_request_422() -> None:
    cancelled = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.Event().wait()  # never ends on its own
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def run() -> ApiError:
        with pytest.raises(ApiError) as info:
            await until_done(VanishedClient(), work(), poll_s=0.01)  # type: ignore[arg-type]
        await asyncio.wait_for(cancelled.wait(), 5)  # the work was stopped, not left running
        return info.value

    err = asyncio.run(run())
    assert err.status == 422 and "cancelled" in err.message

    async def route(request: Request) -> None:
        raise err

    both_shapes(asyncio.run(call(app_with(route))), 422)


def test_row_unhandled_500_without_traceback() -> None:
    async def route() -> None:
        raise RuntimeError("secret internals /home/x/file.py line 3")

    body = both_shapes(asyncio.run(call(app_with(route))), 500)
    assert body["detail"] == "internal server error: RuntimeError"
