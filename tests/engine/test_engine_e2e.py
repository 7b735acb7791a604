"""The engine through a real server with the default model: concurrency, disconnects, unload
during streaming, stop strings across tokens, context limits, greedy batch invariance.

The servers here run with `model.batch_invariant: true` (each prompt prefilled alone, decode
rows never beside a prompt): what the concurrency test compares, a request's greedy text beside
others and alone, only holds then. The default (mixed steps) is tested in
`test_concurrent_burst_e2e.py`."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from tests.server import DEFAULT_MODEL, KodkodServer, engine_stats, wait_idle

pytestmark = pytest.mark.model

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
# raw prompts whose first tokens differ: no request can reuse another's prefix
OPENINGS = ["Seas", "Dragons", "Robots", "Lighthouses", "Winter", "Cities", "Cats", "Moonlight"]
INVARIANT = {"model": {"max_seq_len": 2048, "batch_invariant": True}}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path):
    s = KodkodServer.start(tmp_path_factory.mktemp("engine"), INVARIANT)
    yield s
    s.stop()


async def stream_text(client: httpx.AsyncClient, body: dict) -> tuple[str, dict | None, list[dict]]:
    """(text, finish chunk, raw events) of a streamed completion."""
    text, final, events = [], None, []
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            events.append(ev)
            if "error" in ev:
                final = ev
                continue
            for c in ev["choices"]:
                text.append(c["text"])
                if c.get("finish_reason"):
                    final = c
    return "".join(text), final, events


def greedy(prompt: str, n: int = 48) -> dict:
    return {"prompt": CHAT.format(prompt), "max_tokens": n, "temperature": 0}


def test_eight_concurrent_streams_finish_with_the_text_each_gets_alone(
    srv: KodkodServer, tmp_path: Path
) -> None:
    """Greedy output does not depend on batch neighbours. The references come from a second
    server with an empty cache, run one request at a time, so prompts are prefilled the same
    way in both (prefix reuse would change the last prompt token's batch shape)."""
    bodies = [
        {"prompt": f"{w} are the subject of this short essay. ", "max_tokens": 48, "temperature": 0}
        for w in OPENINGS
    ]
    ref_srv = KodkodServer.start(tmp_path / "ref", INVARIANT)
    try:
        with ref_srv.client() as c:
            refs = [c.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in bodies]
    finally:
        ref_srv.stop()

    async def run() -> list[tuple[str, dict | None, list[dict]]]:
        async with srv.async_client() as c:
            return await asyncio.gather(*(stream_text(c, b) for b in bodies))

    results = asyncio.run(run())
    for (text, final, _), ref in zip(results, refs, strict=True):
        assert final is not None and final["finish_reason"] in ("length", "stop")
        assert text == ref
    stats = wait_idle(srv)
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_disconnect_mid_stream_frees_the_slot(srv: KodkodServer) -> None:
    before = engine_stats(srv)["generated_tokens"]
    with srv.client() as c:
        body = {
            **greedy("Write a very long story about a dragon.", 1500),
            "stream": True,
            "ban_eos_token": True,
        }
        with c.stream("POST", "/v1/completions", json=body) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen >= 5:
                    break  # leaving the block closes the connection mid-stream
    stats = wait_idle(srv, timeout_s=30)
    assert stats["running"] == 0
    generated = stats["generated_tokens"] - before
    assert generated < 1500
    # Nothing of it is still running: the tokens of a later request are the only new ones.
    with srv.client() as c:
        usage = c.post("/v1/completions", json=greedy("Hello", 3)).json()["usage"]
    assert wait_idle(srv)["generated_tokens"] - before == generated + usage["completion_tokens"]


def test_stop_string_split_across_tokens_never_leaks(srv: KodkodServer) -> None:
    body = greedy("Write a short poem about the sea.", 40)
    with srv.client() as c:
        ref = c.post("/v1/completions", json={**body, "logprobs": 1}).json()["choices"][0]
    tokens = ref["logprobs"]["tokens"]
    # a stop string from the middle of one token to the middle of the next
    k = next(i for i in range(3, len(tokens) - 1) if len(tokens[i]) >= 2 and len(tokens[i + 1]) >= 2)
    stop = tokens[k][1:] + tokens[k + 1][:1]
    offset = sum(len(t) for t in tokens[:k]) + 1
    expected = ref["text"][: ref["text"].find(stop)]
    assert ref["text"].find(stop) <= offset

    async def run() -> tuple[str, dict | None, list[dict]]:
        async with srv.async_client() as c:
            return await stream_text(c, {**body, "stop": [stop]})

    text, final, _events = asyncio.run(run())
    assert text == expected
    assert stop not in text
    assert final is not None and final["finish_reason"] == "stop" and final["stop_str"] == stop
    with srv.client() as c:
        flat = c.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]
    assert flat["text"] == expected


def test_prompt_over_max_seq_len_is_a_400(srv: KodkodServer) -> None:
    prompt = "word " * 2100  # > 2048 tokens
    with srv.client() as c:
        for stream in (False, True):
            r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, "stream": stream})
            assert r.status_code == 400
            err = r.json()["error"]
            assert err["code"] == "context_length_exceeded"
            assert "2048" in err["message"]
        r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 5000})
        assert r.status_code == 400


def test_unload_during_streaming_ends_streams_with_an_error_then_reload_works(srv: KodkodServer) -> None:
    async def run() -> list[tuple[str, dict | None, list[dict]]]:
        async with srv.async_client() as c, srv.async_client(admin=True) as admin:
            body = {**greedy("Write a very long story.", 1500), "ban_eos_token": True}
            tasks = [asyncio.create_task(stream_text(c, body)) for _ in range(3)]
            deadline = time.monotonic() + 60
            while engine_stats(srv).get("running", 0) < 3:
                assert time.monotonic() < deadline, "the streams never started"
                await asyncio.sleep(0.05)
            r = await admin.post("/v1/model/unload")
            assert r.status_code == 200
            return await asyncio.gather(*tasks)

    for _, final, _ in asyncio.run(run()):
        assert final is not None and "error" in final
        assert "unloaded" in final["error"]["message"]
    with srv.client() as c:
        assert c.post("/v1/completions", json=greedy("hi", 4)).status_code == 503
    with srv.client(admin=True) as a:
        r = a.post("/v1/model/load", json={"model_name": DEFAULT_MODEL, "max_seq_len": 2048})
        assert r.status_code == 200 and '"finished"' in r.text
    with srv.client() as c:
        r = c.post("/v1/completions", json=greedy("Say hello.", 8))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0


def test_n_choices_share_the_prompt_prefill(srv: KodkodServer) -> None:
    before = engine_stats(srv)
    prompt = CHAT.format("List three colours. " * 20)
    with srv.client() as c:
        r = c.post(
            "/v1/completions", json={"prompt": prompt, "max_tokens": 4, "n": 3, "temperature": 1.0, "seed": 1}
        )
        assert r.status_code == 200
        body = r.json()
        n_prompt = body["usage"]["prompt_tokens"]
    after = engine_stats(srv)
    assert len(body["choices"]) == 3
    # the prompt was prefilled once, not three times
    assert after["prompt_tokens_computed"] - before["prompt_tokens_computed"] <= n_prompt
