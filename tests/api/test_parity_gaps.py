"""Small TabbyAPI parity gaps, end to end with the default model: the model card's
`max_batch_size` is the engine's real limit, an unload takes the template the model was loaded
with (the global sampler preset stays, as upstream), and `image_url` parts of chat messages are
dropped as TabbyAPI does without vision — with a warning in the log."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import DEFAULT_MODEL, KodkodServer, engine_stats

pytestmark = pytest.mark.model

IMAGE_URL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    s = KodkodServer.start(tmp_path_factory.mktemp("parity-gaps"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def admin(server: KodkodServer) -> Iterator[httpx.Client]:
    with server.client(admin=True) as c:
        yield c


def load(admin: httpx.Client, body: dict[str, Any]) -> None:
    with admin.stream("POST", "/v1/model/load", json=body) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert events and events[-1].get("status") == "finished", events[-1:]


def parameters(admin: httpx.Client) -> dict[str, Any]:
    return dict(admin.get("/v1/model").json()["parameters"])


async def _hold_streams(server: KodkodServer, count: int, running: int) -> dict[str, Any]:
    """Open `count` long streams and wait until the engine runs `running` of them (identical
    prompts first wait for the one that prefills their shared prefix); return its stats with
    the most it was seen running."""
    body = {"prompt": "Count to a thousand:", "max_tokens": 400, "ignore_eos": True, "stream": True}
    async with server.async_client() as client:

        async def one() -> None:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for _ in r.aiter_lines():
                    pass

        tasks = [asyncio.create_task(one()) for _ in range(count)]
        try:
            deadline = time.monotonic() + 60
            stats: dict[str, Any] = {}
            most = 0
            while time.monotonic() < deadline:
                stats = await asyncio.to_thread(engine_stats, server)
                most = max(most, stats.get("running", 0))
                if (
                    stats.get("running", 0) >= running
                    and stats.get("running", 0) + stats.get("waiting", 0) >= count
                ):
                    return {**stats, "most_running": most}
                await asyncio.sleep(0.05)
            raise AssertionError(f"the engine never ran {running} of {count} requests: {stats}")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def test_card_max_batch_size_is_the_engine_limit(server: KodkodServer, admin: httpx.Client) -> None:
    load(admin, {"model_name": DEFAULT_MODEL, "max_batch_size": 3})
    try:
        assert parameters(admin)["max_batch_size"] == 3
        assert admin.get("/props").json()["total_slots"] == 3
        stats = asyncio.run(_hold_streams(server, 4, running=3))
        assert (stats["running"], stats["waiting"]) == (3, 1)  # what the card said
        assert stats["most_running"] == 3  # never more
    finally:
        load(admin, {"model_name": DEFAULT_MODEL})


def test_unload_takes_the_template_the_model_set(server: KodkodServer, admin: httpx.Client) -> None:
    load(admin, {"model_name": DEFAULT_MODEL, "prompt_template": "alpaca"})
    assert parameters(admin)["prompt_template"] == "alpaca"
    assert admin.post("/v1/sampling/override/switch", json={"preset": "safe_defaults"}).status_code == 200
    assert admin.post("/v1/model/unload").status_code == 200
    with server.client() as api:
        assert api.get("/v1/templates").json()["data"] == []  # the template went with the model
    # the sampler preset is global in TabbyAPI, not the model's: it stays
    assert admin.get("/v1/sampling/override/list").json()["selected_preset"] == "safe_defaults"
    load(admin, {"model_name": DEFAULT_MODEL})
    assert parameters(admin)["prompt_template"] != "alpaca"  # the model's own template again
    assert admin.post("/v1/sampling/override/unload").status_code == 200


def test_image_parts_are_dropped_with_a_warning(server: KodkodServer, admin: httpx.Client) -> None:
    def chat(content: Any) -> str:
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0}
        r = admin.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["message"]["content"])

    text_only = chat("Say hello to Ada.")
    assert "dropped content parts" not in server.log()
    with_image = chat(
        [
            {"type": "text", "text": "Say hello "},
            {"type": "image_url", "image_url": {"url": IMAGE_URL}},
            {"type": "text", "text": "to Ada."},
        ]
    )
    assert with_image == text_only  # the model saw exactly the text
    log = server.log()
    assert "dropped content parts the model cannot read (1 image_url)" in log
    assert IMAGE_URL[:30] not in log  # the image itself is never logged
