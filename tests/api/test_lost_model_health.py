"""A model whose backend lost its process (an RPC worker went away) on fake backends: the
manager unloads it with the reason, `/health` answers 200 "healthy" and names the worker that
is gone (the fault is a resolved issue), requests get a 503 saying why, and the next load
serves again and clears the note."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from kodkod.app import create_app
from kodkod.auth import KeyStore
from kodkod.core.types import ErrorEvent, GenerationRequest
from kodkod.models.manager import NoModelLoaded
from kodkod.models.params import LoadPlan, ModelLoadParams
from kodkod.models.registry import ModelEntry
from kodkod.settings import Settings
from tests.engine.test_lost_backend import REASON, LosingBackend

DEADLINE_S = 10.0


async def until(cond: Callable[[], object], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_a_lost_backend_unloads_its_model_and_health_names_the_gone_worker(tmp_path: Path) -> None:
    backends: list[LosingBackend] = []

    def loader(source: Any, make_config: Any, **_: Any) -> LosingBackend:
        backend = LosingBackend(delay_s=0.002)
        make_config(backend.info)
        backends.append(backend)
        return backend

    app = create_app(Settings(), keys=KeyStore(tmp_path / "keys.yml", disabled=True), backend_loader=loader)
    state = app.state.kodkod
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    plan = LoadPlan(ModelEntry("m", gguf, None), ModelLoadParams(max_seq_len=128, n_threads=1))

    async def health(client: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
        r = await client.get("/health")
        return r.status_code, r.json()

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            await state.models.load(plan)
            lease = await state.models.acquire(None, may_switch=False)
            backends[0].lose()  # the worker goes away; the next decode finds out
            _, final = await lease.model.engine.submit(GenerationRequest("r", [1], max_tokens=5)).collect()
            assert isinstance(final, ErrorEvent) and REASON in final.message
            lease.release()
            await until(lambda: backends[0].closed, "the manager to unload and free the lost model")
            assert state.models.current is None

            status, body = await health(client)
            assert status == 200 and body["status"] == "healthy", body
            assert body["unloaded"]["model"] == "m"
            assert body["unloaded"]["reason"] == REASON  # names the worker that is gone
            assert any(REASON in i["description"] for i in body["resolved_issues"]), body
            with pytest.raises(NoModelLoaded, match=re.escape("RPC worker 127.0.0.1:9 no longer accepts")):
                await state.models.acquire(None, may_switch=False)

            await state.models.load(plan)  # the worker is back: a load serves again
            status, body = await health(client)
            assert status == 200 and "unloaded" not in body and body["engine"]["model"] == "m", body
            await state.models.unload()

    asyncio.run(main())
