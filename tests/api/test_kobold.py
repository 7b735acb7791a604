"""The KoboldAI API end to end: a real server (OAI + Kobold) with the default model.

Request bodies are KoboldAI Lite's default body (every field it sends, including the ones we
ignore), with only prompt / length / key changed per test; streams are parsed as strictly as
Lite parses them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import DEFAULT_MODEL, KodkodServer, engine_stats, wait_idle

pytestmark = pytest.mark.model

MAX_SEQ_LEN = 2048

# KoboldAI Lite's default body (client-shapes.md), remote server, instruct mode.
LITE_BODY: dict[str, Any] = {
    "n": 1,
    "max_context_length": 6144,
    "max_length": 768,
    "rep_pen": 1.05,
    "temperature": 0.75,
    "top_p": 0.92,
    "top_k": 100,
    "top_a": 0,
    "typical": 1,
    "tfs": 1,
    "rep_pen_range": 360,
    "rep_pen_slope": 0.7,
    "sampler_order": [6, 0, 1, 3, 4, 2, 5],
    "memory": "",
    "trim_stop": True,
    "genkey": "KCPP4821",
    "min_p": 0,
    "dynatemp_range": 0,
    "dynatemp_exponent": 1,
    "smoothing_factor": 0,
    "smoothing_curve": 1,
    "nsigma": 0,
    "banned_tokens": [],
    "render_special": False,
    "logprobs": False,
    "presence_penalty": 0,
    "logit_bias": {},
    "stop_sequence": ["### Instruction:", "### Response:"],
    "use_default_badwordsids": False,
    "bypass_eos": False,
    "prompt": "\n### Instruction:\nWrite a story about a cat.\n### Response:\n",
}

# Lite's stream parser: exactly this, LF only.
LITE_EVENT = re.compile(r"^event: (.*)\ndata: (.*)(\r?\n){2}", re.M)


def lite(**changes: Any) -> dict[str, Any]:
    return {**LITE_BODY, **changes}


def long_body(genkey: str, max_length: int) -> dict[str, Any]:
    """A Lite body that cannot end before max_length: EOS banned, no stop sequences."""
    return lite(genkey=genkey, max_length=max_length, bypass_eos=True, stop_sequence=[])


def start_server(tmp_path_factory: pytest.TempPathFactory) -> KodkodServer:
    """A server with both APIs and a known max_seq_len (also used by test_kobold_fields).

    One llama.cpp thread: the test machine is small and shared, and spinning threads that
    wait for a core slow everyone down."""
    model = {"max_seq_len": MAX_SEQ_LEN, "n_threads": 1}
    return KodkodServer.start(
        tmp_path_factory.mktemp("kobold"),
        {"network": {"api_servers": ["OAI", "Kobold"]}, "model": model},
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    srv = start_server(tmp_path_factory)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: KodkodServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def take_events(buf: str) -> tuple[list[dict[str, Any]], str]:
    """Complete events at the start of `buf` (and the rest), checking each block is exactly
    `event: message\\ndata: <one-line json>` (or a keep-alive comment), LF only."""
    assert "\r" not in buf, "Kobold streams must use bare LF"
    events = []
    while "\n\n" in buf:
        block, buf = buf.split("\n\n", 1)
        if block.startswith(":"):
            continue  # keep-alive comment
        m = LITE_EVENT.match(block + "\n\n")
        assert m is not None and m.group(0) == block + "\n\n", f"bad event block: {block!r}"
        assert m.group(1) == "message"
        events.append(json.loads(m.group(2)))
    return events, buf


def iter_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    buf = ""
    for chunk in response.iter_text():
        events, buf = take_events(buf + chunk)
        yield from events
    assert buf == "", f"trailing bytes: {buf!r}"


def stream_text(events: list[dict[str, Any]]) -> str:
    return "".join(e["token"] for e in events)


def generated_tokens(server: KodkodServer) -> int:
    return int(engine_stats(server)["generated_tokens"])


def settle(server: KodkodServer) -> None:
    """Wait until the engine is idle after an abort.

    The engine publishes its stats at the end of a step, and an abort of the last running
    request is handled between steps, so /health can keep showing it as running. One 1-token
    request makes the engine step and publish; if the aborted request were still running it
    would still be counted afterwards, so `wait_idle` keeps its meaning.
    """
    with server.client() as c:
        c.post("/api/v1/generate", json=lite(max_length=1, genkey="KCPP-NUDGE"))
    wait_idle(server)


# -- model information -------------------------------------------------------------------------


def test_model_name_and_context_lengths(client: httpx.Client) -> None:
    assert client.get("/api/v1/model").json() == {"result": f"tabbyAPI/{DEFAULT_MODEL}"}
    loaded = client.get("/v1/model").json()["parameters"]["max_seq_len"]
    assert loaded == MAX_SEQ_LEN
    for path in (
        "/api/v1/config/max_context_length",
        "/api/latest/config/max_context_length",
        "/api/v1/config/max_length",
        "/api/extra/true_max_context_length",
    ):
        assert client.get(path).json() == {"value": loaded}, path


@pytest.mark.parametrize("text", ["Hello, world!", "  two  spaces\nand a newline", "<|im_start|>user"])
def test_tokencount_agrees_with_token_encode(client: httpx.Client, text: str) -> None:
    encoded = client.post("/v1/token/encode", json={"text": text}).json()
    counted = client.post("/api/extra/tokencount", json={"prompt": text}).json()
    assert counted == {"value": encoded["length"], "ids": encoded["tokens"]}
    # Lite's logit-bias lookup sends special: false → no BOS (there is none to drop here if the
    # model adds none, so the ids are a suffix of the full list either way)
    bare = client.post("/api/extra/tokencount", json={"prompt": text, "special": False}).json()
    assert encoded["tokens"][-bare["value"] :] == bare["ids"]


# -- generation --------------------------------------------------------------------------------


def test_generate_with_lite_default_body(client: httpx.Client) -> None:
    r = client.post("/api/v1/generate", json=lite(max_length=12))
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert isinstance(result["text"], str) and result["text"]
    assert result["finish_reason"] in ("stop", "length")
    assert 0 < result["completion_tokens"] <= 12
    assert client.post("/api/latest/generate", json=lite(max_length=4)).status_code == 200


def test_stream_of_64_tokens_arrives_as_many_lite_events(server: KodkodServer, client: httpx.Client) -> None:
    with client.stream("POST", "/api/extra/generate/stream", json=long_body("KSTREAM", 64)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(iter_events(r))
    assert len(events) >= 10
    assert all(e["finish_reason"] is None for e in events[:-1])
    assert events[-1] == {"token": "", "finish_reason": "length"}
    assert stream_text(events)
    wait_idle(server)


def test_stream_and_generate_agree_when_greedy(client: httpx.Client) -> None:
    body = lite(max_length=24, temperature=0, stop_sequence=[])
    with client.stream("POST", "/api/extra/generate/stream", json=body) as r:
        streamed = stream_text(list(iter_events(r)))
    assert streamed == client.post("/api/v1/generate", json=body).json()["results"][0]["text"]


def test_check_returns_a_growing_prefix_of_the_stream(server: KodkodServer, client: httpx.Client) -> None:
    genkey = "KCPP-CHECK"
    received = ""
    seen: list[str] = []
    with client.stream("POST", "/api/extra/generate/stream", json=long_body(genkey, 64)) as r:
        for i, event in enumerate(iter_events(r)):
            received += event["token"]
            if i % 4 == 1 and event["finish_reason"] is None:
                method = "GET" if len(seen) % 2 else "POST"
                check = client.request(method, "/api/extra/generate/check", json={"genkey": genkey})
                (res,) = check.json()["results"]
                # the job's text is at least what we have already been sent
                assert res["text"].startswith(received)
                seen.append(res["text"])
    assert len(seen) >= 3 and seen[-1]
    for earlier, later in itertools.pairwise(seen):
        assert later.startswith(earlier)
    assert all(received.startswith(s) for s in seen)
    # the job is gone once its stream has ended
    assert client.post("/api/extra/generate/check", json={"genkey": genkey}).json() == {"results": []}
    wait_idle(server)


def test_abort_by_genkey_ends_the_stream_early(server: KodkodServer, client: httpx.Client) -> None:
    before = generated_tokens(server)
    genkey = "KCPP-ABORT"
    events: list[dict[str, Any]] = []
    with client.stream("POST", "/api/extra/generate/stream", json=long_body(genkey, 1024)) as r:
        for event in iter_events(r):
            events.append(event)
            if len(events) == 3:
                r_abort = client.post("/api/extra/abort", json={"genkey": genkey})
                assert r_abort.json() == {"success": True}
    assert events[-1]["finish_reason"] == "stop"
    settle(server)
    assert generated_tokens(server) - before < 1024
    assert client.post("/api/extra/generate/check", json={"genkey": genkey}).json() == {"results": []}


def test_abort_of_a_non_streamed_generate_returns_the_text_so_far(
    server: KodkodServer, client: httpx.Client
) -> None:
    async def run() -> tuple[dict[str, Any], str]:
        genkey = {"genkey": "KCPP-SYNC"}
        async with server.async_client() as ac:
            task = asyncio.create_task(ac.post("/api/v1/generate", json=long_body("KCPP-SYNC", 1024)))
            partial = ""
            while not partial and not task.done():  # poll mode, as Lite uses without SSE
                await asyncio.sleep(0.05)
                results = (await ac.post("/api/extra/generate/check", json=genkey)).json()["results"]
                partial = results[0]["text"] if results else ""
            await ac.post("/api/extra/abort", json=genkey)
            return (await task).json()["results"][0], partial

    result, partial = asyncio.run(run())
    assert result["text"].startswith(partial)
    assert result["completion_tokens"] < 1024
    settle(server)


def test_abort_without_body_stops_this_clients_anonymous_jobs(
    server: KodkodServer, client: httpx.Client
) -> None:
    before = generated_tokens(server)
    body = long_body("unused", 1024)
    del body["genkey"]  # SillyTavern Classic sends none
    count = 0
    with client.stream("POST", "/api/extra/generate/stream", json=body) as r:
        for _event in iter_events(r):
            count += 1
            if count == 3:
                # SillyTavern's Stop: POST /api/extra/abort with no body at all
                assert client.post("/api/extra/abort").json() == {"success": True}
    settle(server)
    assert generated_tokens(server) - before < 1024


def test_client_disconnect_aborts_the_job(server: KodkodServer) -> None:
    before = generated_tokens(server)
    with (
        server.client() as c,
        c.stream("POST", "/api/extra/generate/stream", json=long_body("KCPP-GONE", 1024)) as r,
    ):
        for i, _ in enumerate(iter_events(r)):
            if i == 2:
                break  # closing the response drops the connection
    settle(server)
    assert generated_tokens(server) - before < 1024
    with server.client() as c:
        check = c.post("/api/extra/generate/check", json={"genkey": "KCPP-GONE"})
        assert check.json() == {"results": []}


def test_kobold_jobs_run_together_and_abort_separately(server: KodkodServer) -> None:
    """Two Lite streams with their own genkeys share the batch; aborting one leaves the other."""

    async def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
        both_started = asyncio.Event()
        started: set[str] = set()
        async with server.async_client() as ac:

            async def stream(genkey: str, max_length: int) -> list[dict[str, Any]]:
                out: list[dict[str, Any]] = []
                body = long_body(genkey, max_length)
                async with ac.stream("POST", "/api/extra/generate/stream", json=body) as r:
                    buf = ""
                    async for chunk in r.aiter_text():
                        events, buf = take_events(buf + chunk)
                        out += events
                        if out:
                            started.add(genkey)
                            if len(started) == 2:
                                both_started.set()
                return out

            tasks = [
                asyncio.create_task(stream("KCPP-A", 1024)),
                asyncio.create_task(stream("KCPP-B", 48)),
            ]
            await both_started.wait()
            check = (await ac.post("/api/extra/generate/check", json={"genkey": "KCPP-B"})).json()
            await ac.post("/api/extra/abort", json={"genkey": "KCPP-A"})
            a, b = await asyncio.gather(*tasks)
        return a, b, check["results"][0]["text"]

    a, b, b_partial = asyncio.run(run())
    assert a[-1]["finish_reason"] == "stop"  # aborted
    assert b[-1]["finish_reason"] == "length"  # ran its full 48 tokens
    assert b_partial and stream_text(b).startswith(b_partial)  # check found B's own text
    settle(server)


def test_disconnect_during_a_non_streamed_generate_aborts_it(server: KodkodServer) -> None:
    before = generated_tokens(server)

    async def run() -> None:
        async with server.async_client() as ac:
            task = asyncio.create_task(ac.post("/api/v1/generate", json=long_body("KCPP-LEFT", 1024)))
            text = ""
            while not text and not task.done():
                await asyncio.sleep(0.05)
                check = await ac.post("/api/extra/generate/check", json={"genkey": "KCPP-LEFT"})
                results = check.json()["results"]
                text = results[0]["text"] if results else ""
            assert not task.done()
            task.cancel()  # the client gives up: httpx drops the connection

    asyncio.run(run())
    settle(server)
    assert generated_tokens(server) - before < 1024


def test_openai_and_kobold_streams_run_together(server: KodkodServer) -> None:
    n_tokens = 48
    order: list[str] = []  # which stream each event came from, in arrival order

    async def run() -> tuple[list[dict[str, Any]], list[str]]:
        async with server.async_client() as ac:

            async def kobold() -> list[dict[str, Any]]:
                out = []
                body = long_body("KCPP-PAIR", n_tokens)
                async with ac.stream("POST", "/api/extra/generate/stream", json=body) as r:
                    assert r.status_code == 200
                    buf = ""
                    async for chunk in r.aiter_text():
                        events, buf = take_events(buf + chunk)
                        out += events
                        order.extend(["kobold"] * len(events))
                return out

            async def openai() -> list[str]:
                lines = []
                body = {
                    "prompt": "Once upon a time",
                    "max_tokens": n_tokens,
                    "stream": True,
                    "ignore_eos": True,
                    "stream_options": {"include_usage": True},
                }
                async with ac.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            lines.append(line[6:])
                            order.append("oai")
                return lines

            kobold_events, oai_lines = await asyncio.gather(kobold(), openai())
            return kobold_events, oai_lines

    kobold_events, oai_lines = asyncio.run(run())
    # both were in flight at once: each produced output before the other had finished
    assert order.index("kobold") < len(order) - 1 - order[::-1].index("oai")
    assert order.index("oai") < len(order) - 1 - order[::-1].index("kobold")
    assert oai_lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in oai_lines[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == n_tokens
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert kobold_events[-1] == {"token": "", "finish_reason": "length"}
    assert stream_text(kobold_events)
    wait_idle(server)
