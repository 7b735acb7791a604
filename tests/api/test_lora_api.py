"""LoRA adapters through a real server with the default model (adapters built here): listing,
start-up loading, wrong adapters refused, scaling 0 and unloading give exactly the base output,
PEFT and GGUF forms agree, loads wait for (or cancel) running generations, and requests with
their own adapters run concurrently, each exactly as alone.

Outputs are compared exactly: text and every token's logprob. Each `greedy()` runs its request
twice and keeps the second answer, so every compared run reuses its cached prompt the same way
(prefix reuse changes the last prompt token's batch shape, hence its last bits). Exact
comparison also relies on where llama.cpp puts each sequence's KV cells: the attention sums run
in cell order, and this Q4_1 model quantises activations, so another placement moves logprobs
by up to ~0.1 and can flip a near tie (measured). Placement follows the sequence of requests as
long as the engine never trims idle cached prefixes or compacts the pool, which it does not for
a pool this size (1024 cells < `MIN_BUSY_CACHE_CELLS`, asserted below), and on batch shapes:
the server runs with `model.batch_invariant: true`, so no prompt is computed beside another
request's rows.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from kodkod.engine.budget import MIN_BUSY_CACHE_CELLS
from tests.lora_fixtures import (
    Adapter,
    make_adapter,
    model_facts,
    write_gguf_adapter,
    write_gguf_tensors,
    write_peft_adapter,
)
from tests.server import KodkodServer, wait_idle

pytestmark = pytest.mark.model

PROMPT = "<|im_start|>user\nWrite one sentence about a lighthouse.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    root = tmp_path_factory.mktemp("lora_api")
    loras = root / "loras"
    facts = model_facts(default_gguf)
    heads = (facts.n_head, facts.n_head_kv)
    style = make_adapter(default_gguf, seed=1, strength=0.1)
    write_gguf_adapter(loras / "style" / "style.gguf", style)
    write_peft_adapter(loras / "style_peft", style, heads)
    write_gguf_adapter(
        loras / "other.gguf",
        make_adapter(default_gguf, seed=2, rank=8, targets=("attn_v", "ffn_up", "ffn_down"), strength=0.15),
    )
    write_gguf_adapter(loras / "gemma.gguf", make_adapter(default_gguf, seed=3, layers=[0], arch="gemma3"))
    a, b = style.pairs["blk.0.attn_q.weight"]
    write_gguf_tensors(
        loras / "wrong_shape.gguf",
        "llama",
        {
            "blk.0.attn_q.weight.lora_a": np.zeros((4, 512), np.float32),  # hidden 576, not 512
            "blk.0.attn_q.weight.lora_b": b,
        },
    )
    embed = {"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 49152), np.float32)}
    write_peft_adapter(
        loras / "embed_peft",
        Adapter("llama", 8.0, {"blk.0.attn_q.weight": (a, b)}),
        heads,
        extra_tensors=embed,
    )
    assert MIN_BUSY_CACHE_CELLS > 1024  # see the module docstring
    config = {
        "model": {"max_seq_len": 1024, "batch_invariant": True},
        "lora": {"lora_dir": "loras", "loras": [{"name": "style", "scaling": 1.0}]},
    }
    server = KodkodServer.start(root, config)
    yield server
    server.stop()


def greedy(c: httpx.Client, **extra: Any) -> tuple[str, list[float]]:
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "logprobs": 1, **extra}
    for _ in range(2):
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def load(c: httpx.Client, *loras: dict, skip_queue: bool = False) -> httpx.Response:
    return c.post("/v1/lora/load", json={"loras": list(loras), "skip_queue": skip_queue})


def active(c: httpx.Client) -> list[tuple[str, float]]:
    r = c.get("/v1/lora")
    assert r.status_code == 200
    return [(card["id"], card["scaling"]) for card in r.json()["data"]]


def test_listing_and_startup_adapters(srv: KodkodServer) -> None:
    with srv.client(admin=True) as admin, srv.client() as api:
        assert active(admin) == [("style", 1.0)]  # lora.loras from config.yml
        names = [card["id"] for card in admin.get("/v1/loras").json()["data"]]
        assert names == ["embed_peft", "gemma", "other", "style", "style_peft", "wrong_shape"]
        assert admin.get("/v1/lora/list").json()["data"][0]["object"] == "lora"
        assert [card["id"] for card in api.get("/v1/loras").json()["data"]] == ["style"]
        assert api.post("/v1/lora/load", json={"loras": [{"name": "other"}]}).status_code == 401


def test_wrong_adapters_are_400_and_change_nothing(srv: KodkodServer) -> None:
    with srv.client(admin=True) as c:
        for body, text in [
            ({"loras": [{"name": "gemma"}]}, "architecture 'gemma3'"),
            ({"loras": [{"name": "wrong_shape"}]}, "do not fit"),
            ({"loras": [{"name": "embed_peft"}]}, "embed_tokens"),
            ({"loras": [{"name": "missing"}]}, "not found"),
            ({"loras": [{"name": "../style"}]}, "invalid LoRA name"),
            ({"loras": []}, "at least one"),
            ({"loras": [{"name": "other"}, {"name": "other"}]}, "listed twice"),
        ]:
            r = c.post("/v1/lora/load", json=body)
            assert r.status_code == 400, (body, r.text)
            assert text in r.json()["detail"], r.text
        assert c.post("/v1/lora/load", json={"loras": [{"name": "x", "scaling": -1}]}).status_code == 422
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "loras": [{"name": "gemma"}]})
        assert r.status_code == 400 and "gemma3" in r.json()["detail"]
        assert active(c) == [("style", 1.0)]
        assert c.get("/health").status_code == 200


def test_scaling_zero_and_unloading_give_exactly_the_base_output(srv: KodkodServer) -> None:
    with srv.client(admin=True) as c:
        styled = greedy(c)
        assert c.post("/v1/lora/unload").status_code == 200
        assert active(c) == []
        base = greedy(c)
        assert styled != base
        assert load(c, {"name": "style", "scaling": 0}).json() == {"success": ["style"], "failure": []}
        assert active(c) == [("style", 0.0)]
        assert greedy(c) == base
        assert load(c, {"name": "style", "scaling": 1.0}).status_code == 200
        assert greedy(c) == styled
        assert c.post("/v1/lora/unload", json={"skip_queue": False}).status_code == 200
        assert greedy(c) == base


def test_peft_and_gguf_forms_give_the_same_output(srv: KodkodServer) -> None:
    with srv.client(admin=True) as c:
        assert load(c, {"name": "style"}).status_code == 200
        from_gguf = greedy(c)
        r = load(c, {"name": "style_peft"}, {"scaling": 2.0})  # a nameless entry is a failure
        assert r.json() == {"success": ["style_peft"], "failure": [None]}
        assert active(c) == [("style_peft", 1.0)]
        assert greedy(c) == from_gguf
        assert (srv.workdir / "loras" / "style_peft" / "adapter_model.llama.gguf").is_file()
        c.post("/v1/lora/unload")


async def _stream(client: httpx.AsyncClient, body: dict, started: asyncio.Event) -> dict:
    """Stream a completion; returns the finish chunk or the error event."""
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            started.set()
            if "error" in ev:
                return ev
            for choice in ev["choices"]:
                if choice.get("finish_reason"):
                    return choice
    raise AssertionError("the stream ended without a finish or an error")


def test_load_waits_for_running_generations_or_cancels_them(srv: KodkodServer) -> None:
    long = {"prompt": PROMPT, "max_tokens": 48, "temperature": 0, "ignore_eos": True}

    async def run(skip_queue: bool, max_tokens: int) -> tuple[dict, dict, bool]:
        async with srv.async_client() as api, srv.async_client(admin=True) as admin:
            started = asyncio.Event()
            stream = asyncio.ensure_future(_stream(api, {**long, "max_tokens": max_tokens}, started))
            await started.wait()
            body = {"loras": [{"name": "other"}], "skip_queue": skip_queue}
            r = await admin.post("/v1/lora/load", json=body)
            done_when_loaded = stream.done()
            return await stream, r.json(), done_when_loaded

    final, loaded, done_first = asyncio.run(run(False, 48))
    assert loaded["success"] == ["other"]
    assert final.get("finish_reason") == "length" and done_first  # the load waited for it
    final, loaded, _ = asyncio.run(run(True, 800))
    assert loaded["success"] == ["other"]
    assert "error" in final  # skip_queue cancelled it
    wait_idle(srv)
    with srv.client(admin=True) as c:
        c.post("/v1/lora/unload")


def test_requests_with_their_own_adapters_run_concurrently_as_alone(srv: KodkodServer) -> None:
    variants = [
        {"loras": [{"name": "style", "scaling": 1.0}]},
        {"loras": [{"name": "other", "scaling": 0.8}]},
        {"loras": [{"name": "style", "scaling": 0.5}, {"name": "other", "scaling": 1.0}]},
        {"loras": []},
        {},
    ]
    with srv.client(admin=True) as c:
        alone = [greedy(c, **v) for v in variants]
        assert alone[3] == alone[4]  # no adapters active: [] and absent are the base model
        assert len({(text, tuple(lps)) for text, lps in alone[:4]}) == 4  # four different models
        assert active(c) == []  # a request's adapters do not become the active ones

    async def together() -> list[tuple[str, list[float]]]:
        async with srv.async_client() as api:

            async def one(extra: dict) -> tuple[str, list[float]]:
                body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "logprobs": 1, **extra}
                r = await api.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                choice = r.json()["choices"][0]
                return choice["text"], choice["logprobs"]["token_logprobs"]

            return await asyncio.gather(*(one(v) for v in variants))

    assert asyncio.run(together()) == alone
    with srv.client(admin=True) as c:
        assert load(c, {"name": "style"}).status_code == 200
        assert greedy(c) == alone[0]  # the active set, and a request naming it, agree
        assert greedy(c, loras=[]) == alone[3]  # [] opts out of the active adapters
        c.post("/v1/lora/unload")


def test_a_startup_adapter_that_does_not_fit_stops_startup_with_one_line(
    tmp_path: Path, default_gguf: Path
) -> None:
    from tests.api.test_startup_errors import GOOD_TOKENS, error_lines, run_kodkod
    from tests.server import MODELS

    (tmp_path / "models").symlink_to(MODELS, target_is_directory=True)
    write_gguf_adapter(
        tmp_path / "loras" / "gemma.gguf", make_adapter(default_gguf, layers=[0], arch="gemma3")
    )
    config = (
        "model:\n  model_dir: models\n  model_name: SmolLM2-135M-Instruct\n  n_threads: 1\n"
        "lora:\n  loras:\n    - name: gemma\n"
    )
    proc = run_kodkod(tmp_path, config, GOOD_TOKENS)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in error_lines(proc) if "LoRA" in ln]
    assert len(lines) == 1 and "architecture 'gemma3'" in lines[0], proc.stderr
