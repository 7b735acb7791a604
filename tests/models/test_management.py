"""Model management end to end (reference §11): load, progress, unload, precedence, inline switching.

One real server for the module, with SmolLM2 (llama) and Gemma 3 270M (second architecture) in
a private model_dir: real folders holding links to the repo's GGUF files, plus `smol-tabby`, a
SmolLM2 folder with its own tabby_config.yml. Config: inline loading on, and use_as_default for
max_seq_len / cache_mode / chunk_size, so API loads are small unless a request says otherwise.
Every assertion is about behaviour (events, parameters, which model answered), never timing.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import DEFAULT_GGUF, DEFAULT_MODEL, GEMMA_MODEL, MODELS, KodkodServer

pytestmark = pytest.mark.model

GEMMA_GGUF = MODELS / GEMMA_MODEL / "gemma-3-270m-q4_k_m.gguf"
TABBY = "smol-tabby"
TABBY_CONFIG = """\
model:
  cache_mode: Q4
  chunk_size: 256
draft_model:
  draft_model_name: SmolLM2-135M-Instruct
"""
PROMPT = "日本語のテキスト"  # 15 SmolLM2 tokens, 4 Gemma tokens (BOS included)


def _folder(root: Path, name: str, gguf: Path) -> None:
    (root / name).mkdir(parents=True)
    (root / name / gguf.name).symlink_to(gguf)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    if not GEMMA_GGUF.is_file():
        pytest.fail(f"{GEMMA_GGUF} is missing: run `kodkod models fetch --gemma` (./test.sh does)")
    tmp = tmp_path_factory.mktemp("models")
    root = tmp / "models"
    _folder(root, DEFAULT_MODEL, DEFAULT_GGUF)
    _folder(root, GEMMA_MODEL, GEMMA_GGUF)
    _folder(root, TABBY, DEFAULT_GGUF)
    (root / TABBY / "tabby_config.yml").write_text(TABBY_CONFIG, encoding="utf-8")
    srv = KodkodServer.start(
        tmp,
        {
            "model": {
                "inline_model_loading": True,
                "use_as_default": ["max_seq_len", "cache_mode", "chunk_size"],
                "max_seq_len": 2048,
                "cache_mode": "Q8",
                "chunk_size": 512,
                "n_threads": 1,  # llama.cpp's spinning thread barrier crawls on a busy shared machine
            }
        },
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def admin(server: KodkodServer) -> Iterator[httpx.Client]:
    with server.client(admin=True) as c:
        yield c


def events_of(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]


def load(admin: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    with admin.stream("POST", "/v1/model/load", json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = events_of(r)
    assert events and "error" not in events[-1], events[-1]
    return events


def params(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/v1/model")
    assert r.status_code == 200, r.text
    return dict(r.json()["parameters"])


def complete(client: httpx.Client, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/completions", json={"max_tokens": 4, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return dict(r.json())


def vmrss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# -- loading ---------------------------------------------------------------------------------


def test_startup_load_uses_the_config_section(admin: httpx.Client) -> None:
    p = params(admin)
    assert (p["max_seq_len"], p["cache_mode"], p["chunk_size"]) == (2048, "Q8", 512)
    assert p["cache_types"] == ["q8_0", "q8_0"] and p["flash_attention"] is True


def test_load_q4_4096_generates_coherent_text(admin: httpx.Client) -> None:
    load(admin, {"model_name": DEFAULT_MODEL, "cache_mode": "Q4", "max_seq_len": 4096})
    p = params(admin)
    assert (p["max_seq_len"], p["cache_size"], p["cache_mode"]) == (4096, 4096, "Q4")
    assert p["cache_types"] == ["q4_0", "q4_0"] and p["flash_attention"] is True
    r = admin.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"]


def test_progress_events_and_tabby_config_precedence(server: KodkodServer, admin: httpx.Client) -> None:
    body = {"model_name": TABBY, "max_seq_len": 1024, "chunk_size": 1024}
    events = load(admin, body)
    # draft then model; per component 1..100 "processing", then 100 again as "finished"
    expected = [
        {"model_type": kind, "module": m, "modules": 100, "status": "processing"}
        for kind in ("draft", "model")
        for m in range(1, 101)
    ]
    expected.insert(100, {"model_type": "draft", "module": 100, "modules": 100, "status": "finished"})
    expected.append({"model_type": "model", "module": 100, "modules": 100, "status": "finished"})
    assert events == expected
    p = params(admin)
    assert p["max_seq_len"] == 1024  # request beats use_as_default (2048)
    assert p["cache_mode"] == "Q4"  # tabby_config.yml beats use_as_default (Q8)
    assert p["chunk_size"] == 256  # tabby_config.yml beats the request (1024): §11.5, 2026-07-18+
    assert p["draft"]["id"] == DEFAULT_MODEL  # the draft_model block of tabby_config.yml
    assert p["draft"]["parameters"]["max_seq_len"] == 1024
    with server.client() as api:
        assert api.get("/v1/model/draft/list").json()["data"][0]["id"] == DEFAULT_MODEL
    assert {c["id"] for c in admin.get("/v1/model/draft/list").json()["data"]} >= {DEFAULT_MODEL, GEMMA_MODEL}
    # the same model with the same parameters: "already loaded", two 1/1 events
    with admin.stream("POST", "/v1/model/load", json=body) as r:
        assert [(e["module"], e["modules"], e["status"]) for e in events_of(r)] == [
            (1, 1, "processing"),
            (1, 1, "finished"),
        ]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"model_name": "../../etc"}, "invalid model name"),
        ({"model_name": "/etc"}, "invalid model name"),
        ({"name": "no-such-model"}, "not found"),
        ({"model_name": " "}, "required"),
        ({"model_name": DEFAULT_MODEL, "vision": True}, "vision"),
        ({"model_name": DEFAULT_MODEL, "draft_model": {"draft_model_name": "nope"}}, "draft model"),
        (
            {"model_name": GEMMA_MODEL, "draft_model": {"draft_model_name": DEFAULT_MODEL}},
            f"'{DEFAULT_MODEL}' cannot draft for '{GEMMA_MODEL}'",
        ),
    ],
)
def test_bad_load_requests_are_400_before_any_stream(
    admin: httpx.Client, body: dict[str, Any], needle: str
) -> None:
    before = admin.get("/v1/model").json()["id"]
    r = admin.post("/v1/model/load", json=body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["detail"]
    assert admin.get("/v1/model").json()["id"] == before  # nothing was unloaded


def test_load_needs_admin_and_valid_types(server: KodkodServer, admin: httpx.Client) -> None:
    with server.client() as api:
        assert api.post("/v1/model/load", json={"model_name": DEFAULT_MODEL}).status_code == 401
        assert api.post("/v1/model/unload").status_code == 401
    before = admin.get("/v1/model").json()["id"]
    # a value its row refuses is a 422 naming the field (GPU fields are accepted: test_load_table_e2e)
    for field, value in (("max_seq_len", "x"), ("cache_mode", "Q3"), ("rope_alpha", "lots")):
        r = admin.post("/v1/model/load", json={"model_name": DEFAULT_MODEL, field: value})
        assert r.status_code == 422, (field, r.text)
        assert field in str(r.json()["detail"])
    assert admin.get("/v1/model").json()["id"] == before


def _stream_until_end(
    server: KodkodServer, started: threading.Event, out: list[Any], max_tokens: int = 1800
) -> None:
    body = {
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }
    with server.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                out.append(line[5:].strip())
                started.set()
    out.append("stream ended")
    started.set()


def test_switch_models_while_a_client_streams(server: KodkodServer, admin: httpx.Client) -> None:
    """`skip_queue: true` cancels the running stream with an error event naming the reason."""
    load(admin, {"model_name": DEFAULT_MODEL})
    for target, name_in_error in ((GEMMA_MODEL, DEFAULT_MODEL), (DEFAULT_MODEL, GEMMA_MODEL)):
        started, out = threading.Event(), []
        t = threading.Thread(target=_stream_until_end, args=(server, started, out))
        t.start()
        assert started.wait(60)
        load(admin, {"model_name": target, "skip_queue": True})
        t.join(60)
        assert out.pop() == "stream ended"
        assert out and out[-1] != "[DONE]"
        error = json.loads(out[-1])["error"]
        assert name_in_error in error["message"] and "unloaded" in error["message"]
        with server.client() as c:
            assert complete(c, prompt="Hello")["model"] == target


def test_load_waits_for_the_running_stream(server: KodkodServer, admin: httpx.Client) -> None:
    """Without skip_queue a load lets the running generation finish (reference §11.3)."""
    load(admin, {"model_name": DEFAULT_MODEL})
    started, out = threading.Event(), []
    t = threading.Thread(target=_stream_until_end, args=(server, started, out, 40))
    t.start()
    assert started.wait(60)
    load(admin, {"model_name": GEMMA_MODEL})
    t.join(60)
    assert out[-2:] == ["[DONE]", "stream ended"], out[-2:]  # not cancelled by the load
    chunks = [json.loads(x) for x in out[:-2]]
    assert all(ch["model"] == DEFAULT_MODEL for ch in chunks)
    assert sum(len(ch["choices"][0]["text"]) > 0 for ch in chunks) > 1
    with server.client() as c:
        assert complete(c, prompt="Hello")["model"] == GEMMA_MODEL
    load(admin, {"model_name": DEFAULT_MODEL})


# -- inline loading --------------------------------------------------------------------------


def _prompt_tokens(admin: httpx.Client, model: str) -> int:
    load(admin, {"model_name": model})
    return int(complete(admin, prompt=PROMPT, max_tokens=1)["usage"]["prompt_tokens"])


def test_inline_switching_is_serialised(server: KodkodServer, admin: httpx.Client) -> None:
    expected = {m: _prompt_tokens(admin, m) for m in (GEMMA_MODEL, DEFAULT_MODEL)}
    assert expected[GEMMA_MODEL] != expected[DEFAULT_MODEL]  # tells the tokenizers apart
    with server.client() as api:  # an API key may not switch (§11.6) ...
        assert api.post("/v1/completions", json={"model": GEMMA_MODEL, "prompt": "x"}).status_code == 401
        assert complete(api, model=DEFAULT_MODEL, prompt="x")["model"] == DEFAULT_MODEL
        assert [c["id"] for c in api.get("/v1/models").json()["data"]] == [DEFAULT_MODEL]
    listed = {c["id"] for c in admin.get("/v1/models").json()["data"]}
    assert listed == {DEFAULT_MODEL, GEMMA_MODEL, TABBY}

    async def client(first: str, second: str) -> list[tuple[str, str, int]]:
        seen = []
        async with server.async_client(admin=True) as c:
            for i in range(20):
                want = first if i % 2 == 0 else second
                r = await c.post(
                    "/v1/completions",
                    json={
                        "model": want,
                        "prompt": PROMPT,
                        "max_tokens": 2,
                        "temperature": 0,
                    },
                )
                assert r.status_code == 200, r.text
                body = r.json()
                seen.append((want, body["model"], body["usage"]["prompt_tokens"]))
        return seen

    async def both() -> list[list[tuple[str, str, int]]]:
        return list(
            await asyncio.gather(client(DEFAULT_MODEL, GEMMA_MODEL), client(GEMMA_MODEL, DEFAULT_MODEL))
        )

    results = asyncio.run(both())
    assert sum(len(r) for r in results) == 40
    for want, got, n_prompt in (x for r in results for x in r):
        assert got == want
        assert n_prompt == expected[want]


def test_inline_switch_lets_the_running_stream_finish(server: KodkodServer, admin: httpx.Client) -> None:
    load(admin, {"model_name": DEFAULT_MODEL})
    order: list[str] = []
    started, out = threading.Event(), []

    def stream() -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with server.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    out.append(line[5:].strip())
                    started.set()
        order.append("stream ended")
        started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60)
    switched = complete(admin, model=GEMMA_MODEL, prompt="Hello")  # waits for the stream
    order.append("switched")
    t.join(60)
    assert out[-1] == "[DONE]"  # finished normally on SmolLM2, not cut off by the switch
    assert all(json.loads(x)["model"] == DEFAULT_MODEL for x in out[:-1])
    assert order == ["stream ended", "switched"] and switched["model"] == GEMMA_MODEL


# -- unloading, memory, embeddings ------------------------------------------------------------


def test_unload_returns_memory(server: KodkodServer, admin: httpx.Client) -> None:
    pid = server.proc.pid
    admin.post("/v1/model/unload")
    assert admin.post("/v1/model/unload").status_code == 503  # nothing left to unload
    before = vmrss_mb(pid)
    load(admin, {"model_name": DEFAULT_MODEL, "max_seq_len": 8192, "cache_mode": "FP16"})
    complete(admin, prompt="Hello")
    loaded = vmrss_mb(pid)
    assert admin.post("/v1/model/unload").json() is None
    after = vmrss_mb(pid)
    assert admin.get("/v1/model").status_code == 503
    assert admin.post("/v1/completions", json={"prompt": "x"}).status_code == 503
    # 98 MB of weights (mmap, unmapped on free) + 189 MB of FP16 KV cache (freed)
    assert loaded - before > 200, (before, loaded, after)
    # Unmapping the weights and freeing the KV cache give back all but a few MB: allow 10 % of
    # what the load took, for heap that glibc keeps after malloc_trim and Python-side caches.
    assert after - before < 0.1 * (loaded - before), (before, loaded, after)
    load(admin, {"model_name": DEFAULT_MODEL})


def test_embedding_endpoints_without_an_embedding_model(server: KodkodServer, admin: httpx.Client) -> None:
    r = admin.post("/v1/model/embedding/load", json={"embedding_model_name": "x"})
    assert r.status_code == 400 and "not found" in r.json()["detail"]
    with server.client() as api:
        r = api.post("/v1/embeddings", json={"input": "hello"})
        assert r.status_code == 503 and "No embedding model" in r.json()["detail"]
        assert api.get("/v1/model/embedding/list").json() == {"object": "list", "data": []}
