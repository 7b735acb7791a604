"""End to end: oversized and malformed requests get a clear 4xx and hurt nobody else.

One server (OpenAI and Kobold APIs, small body limit and stall timeout) for the bad-input tests:
a greedy stream is started, every bad request is sent after its first chunk, and the stream must
still finish with the text it has when it runs alone. A second server (one batch place, one
waiting place) shows the 429 for a full queue. The stalled-reader test opens a stream on a raw
socket that never reads and waits for the engine to free the sequence.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import KodkodServer, engine_stats, wait_idle

pytestmark = pytest.mark.model

BODY_LIMIT = 4 * 1024 * 1024
STALL_S = 2.0
HEADER_TIMEOUT_S = 2.0
PROMPT = "The history of the lighthouse begins"
STREAM_BODY = {"prompt": PROMPT, "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    srv = KodkodServer.start(
        tmp_path_factory.mktemp("limits"),
        {
            "network": {"api_servers": ["OAI", "Kobold"]},
            "limits": {
                "max_request_body_bytes": BODY_LIMIT,
                "stalled_stream_timeout_s": STALL_S,
                "header_timeout_s": HEADER_TIMEOUT_S,
            },
        },
    )
    yield srv
    srv.stop()


def assert_error(r: httpx.Response, status: int | tuple[int, ...], needle: str = "", name: str = "") -> None:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (name, r.status_code, r.text[:500])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"], name
    assert "type" in err and "code" in err, name
    assert needle.lower() in err["message"].lower(), (name, err["message"])


async def stream_text(client: httpx.AsyncClient, first_chunk: asyncio.Event | None = None) -> str:
    parts: list[str] = []
    async with client.stream("POST", "/v1/completions", json=STREAM_BODY) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            parts.extend(c["text"] for c in chunk["choices"])
            if first_chunk is not None and parts:
                first_chunk.set()
    return "".join(parts)


def raw(body: str) -> dict[str, Any]:
    """httpx arguments for a body with JSON's non-standard NaN / Infinity literals."""
    return {"content": body.encode(), "headers": {"Content-Type": "application/json"}}


BAD_REQUESTS: list[tuple[str, str, dict[str, Any], int | tuple[int, ...], str]] = [
    # (id, path, httpx kwargs, status, text in the message)
    (
        "nan_temperature",
        "/v1/completions",
        raw('{"prompt": "hi", "max_tokens": 4, "temperature": NaN}'),
        422,
        "temperature",
    ),
    (
        "inf_top_p",
        "/v1/completions",
        raw('{"prompt": "hi", "max_tokens": 4, "top_p": Infinity}'),
        422,
        "top_p",
    ),
    (
        "nan_logit_bias",
        "/v1/completions",
        raw('{"prompt": "hi", "max_tokens": 4, "logit_bias": {"5": -Infinity}}'),
        422,
        "logit_bias",
    ),
    (
        "nan_chat_penalty",
        "/v1/chat/completions",
        raw('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "frequency_penalty": NaN}'),
        422,
        "frequency_penalty",
    ),
    (
        "nan_kobold",
        "/api/v1/generate",
        raw('{"prompt": "hi", "max_length": 4, "rep_pen": NaN}'),
        422,
        "rep_pen",
    ),
    (
        "huge_logprobs",
        "/v1/completions",
        {"json": {"prompt": "hi", "max_tokens": 4, "logprobs": 100000}},
        400,
        "logprobs",
    ),
    (
        "huge_top_logprobs",
        "/v1/chat/completions",
        {
            "json": {
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
                "logprobs": True,
                "top_logprobs": 500,
            }
        },
        422,
        "top_logprobs",
    ),
    (
        "many_stops",
        "/v1/completions",
        {"json": {"prompt": "hi", "max_tokens": 4, "stop": [f"s{i}" for i in range(10_000)]}},
        400,
        "stop",
    ),
    (
        "megabyte_stop",
        "/v1/completions",
        {"json": {"prompt": "hi", "max_tokens": 4, "stop": "x" * 1_000_000}},
        400,
        "stop",
    ),
    (
        "many_banned",
        "/v1/completions",
        {"json": {"prompt": "hi", "max_tokens": 4, "banned_strings": ["b"] * 5_000}},
        400,
        "banned_strings",
    ),
    (
        "kobold_many_stops",
        "/api/v1/generate",
        {"json": {"prompt": "hi", "max_length": 4, "stop_sequence": ["q"] * 500}},
        400,
        "stop",
    ),
    (
        "prompts_times_n",
        "/v1/completions",
        {"json": {"prompt": ["hello"] * 5_000, "n": 50, "max_tokens": 4}},
        400,
        "choices",
    ),
    (
        "huge_penalty_int",
        "/v1/completions",
        {"json": {"prompt": "hi", "max_tokens": 4, "penalty_range": 10**12}},
        422,
        "penalty_range",
    ),
    (
        "nul_model_field",
        "/v1/chat/completions",
        {"json": {"model": "a\u0000b", "messages": [{"role": "user", "content": "hi"}]}},
        422,
        "NUL",
    ),
    (
        "nul_prompt_template",
        "/v1/chat/completions",
        {"json": {"prompt_template": "x\u0000", "messages": [{"role": "user", "content": "hi"}]}},
        422,
        "NUL",
    ),
    (
        "nul_request_lora",
        "/v1/completions",
        {"json": {"prompt": "hi", "max_tokens": 4, "loras": [{"name": "l\u0000"}]}},
        422,
        "NUL",
    ),
]

ADMIN_BAD_REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("nul_model_load", "/v1/model/load", {"model_name": "../x\u0000y"}),
    (
        "nul_draft_load",
        "/v1/model/load",
        {"model_name": "SmolLM2-135M-Instruct", "draft_model": {"draft_model_name": "d\u0000"}},
    ),
    ("nul_template_switch", "/v1/template/switch", {"prompt_template_name": "t\u0000"}),
    ("nul_preset_switch", "/v1/sampling/override/switch", {"preset": "p\u0000"}),
    ("nul_lora_load", "/v1/lora/load", {"loras": [{"name": "n\u0000", "scaling": 1.0}]}),
    ("nan_lora_scaling", "/v1/lora/load", {"loras": [{"name": "n", "scaling": float("nan")}]}),
    ("nan_rope_alpha", "/v1/model/load", {"model_name": "SmolLM2-135M-Instruct", "rope_alpha": "nan"}),
]


def test_bad_requests_get_a_4xx_while_a_running_stream_is_unharmed(server: KodkodServer) -> None:
    async def main() -> None:
        async with server.async_client() as api, server.async_client(admin=True) as admin:
            alone = await stream_text(api)
            first = asyncio.Event()
            running = asyncio.create_task(stream_text(api, first))
            await asyncio.wait_for(first.wait(), 60)
            for name, path, kwargs, status, needle in BAD_REQUESTS:
                r = await api.post(path, **kwargs)
                assert_error(r, status, needle, name)
            for name, path, body in ADMIN_BAD_REQUESTS:
                r = await admin.post(
                    path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
                )
                assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
                assert r.json()["error"]["message"], name
            assert await asyncio.wait_for(running, 120) == alone
            health = await api.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "healthy"

    asyncio.run(main())


def test_huge_penalty_and_dry_windows_are_clamped_and_work(server: KodkodServer) -> None:
    with server.client() as api:
        for extra in (
            {"repetition_penalty": 1.2, "penalty_range": 2**31 - 1},
            {"dry_multiplier": 0.8, "dry_range": 2**31 - 1},
        ):
            r = api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, **extra})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] > 0


def http_exchange(port: int, head: bytes, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """Send raw bytes, read the whole answer (the server closes); (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    header, _, payload = data.partition(b"\r\n\r\n")
    status = int(header.split(b" ", 2)[1])
    return status, json.loads(payload)


def test_oversized_body_is_refused_before_authentication(server: KodkodServer) -> None:
    # no API key, a declared body of 100 MiB of which nothing is sent: 413, not 401, not a hang
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 104857600\r\n\r\n"
    )
    status, body = http_exchange(server.port, head)
    assert status == 413
    assert body["error"]["code"] == "request_too_large" and str(BODY_LIMIT) in body["error"]["message"]


def test_oversized_chunked_body_is_cut_off_at_the_limit(server: KodkodServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 65536 + 2):
            yield b"a" * 65536
        yield b'"}'

    with server.client() as api:
        r = api.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(r, 413, "limit")
    with server.client() as api:
        assert api.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_a_client_that_never_finishes_its_headers_is_disconnected(server: KodkodServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # and nothing more
        assert s.recv(65536) == b""  # the server closed it (recv times out otherwise)
    with server.client() as api:  # a prompt client on a new connection is served
        assert api.get("/health").status_code == 200


def test_oversized_headers_get_431(server: KodkodServer) -> None:
    head = (
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(100))
        + b"\r\n"
    )
    status, body = http_exchange(server.port, head)
    assert status == 431 and body["error"]["code"] == "headers_too_large"
    with server.client() as api:  # ordinary headers are fine
        assert api.get("/health", headers={"X-Pad": "p" * 4000}).status_code == 200


def test_a_stalled_stream_reader_loses_its_sequences(server: KodkodServer) -> None:
    n, max_tokens = 12, 500
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "n": n,
            "logprobs": True,
            "top_logprobs": 20,  # big chunks: the socket buffers fill sooner
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {server.api_key}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    wait_idle(server)
    before = engine_stats(server)["generated_tokens"]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, never read
    try:
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(head + body)
        deadline = time.monotonic() + 60
        while engine_stats(server)["running"] == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
        deadline = time.monotonic() + 240
        while (stats := engine_stats(server))["running"] != 0:
            assert time.monotonic() < deadline, f"the stalled request kept running: {stats}"
            time.sleep(0.2)
        # freed because nobody read it, long before it could have generated everything
        assert stats["generated_tokens"] - before < n * max_tokens
        assert "output unread" in server.log()
    finally:
        sock.close()
    with server.client() as api:
        assert api.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


# -- the waiting queue -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_queue(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    srv = KodkodServer.start(
        tmp_path_factory.mktemp("queue"),
        {
            "network": {"api_servers": ["OAI", "Kobold"]},
            "model": {"max_batch_size": 1},
            "limits": {"max_waiting_requests": 1, "queue_full_retry_after_s": 3},
        },
    )
    yield srv
    srv.stop()


def test_a_full_waiting_queue_answers_429_with_retry_after(tiny_queue: KodkodServer) -> None:
    long_body = {"prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True, "stream": True}

    async def main() -> None:
        async with (
            tiny_queue.async_client() as api,
            api.stream("POST", "/v1/completions", json=long_body) as running,
            api.stream("POST", "/v1/completions", json=long_body) as waiting,
        ):
            assert running.status_code == waiting.status_code == 200
            deadline = time.monotonic() + 60
            while not (
                engine_stats(tiny_queue).get("running") == 1 and engine_stats(tiny_queue).get("waiting") == 1
            ):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            for path, body in (
                ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
                ("/api/v1/generate", {"prompt": "hi", "max_length": 2}),
            ):
                r = await api.post(path, json=body)
                assert_error(r, 429, "retry", path)
                assert r.headers["Retry-After"] == "3"
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
        wait_idle(tiny_queue, 60)
        async with tiny_queue.async_client() as api:
            r = await api.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200

    asyncio.run(main())
