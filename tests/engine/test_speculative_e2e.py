"""Speculative decoding end to end, with real models and a real server.

Pairs with one vocabulary are derived offline with `kodkod models derive` (cached in models/):

* exactness: target = SmolLM2-135M-Instruct Q4_1 (the default model), draft = its Q8_0 copy,
  static speculation (`dynamic_draft: false`, `draft_num_tokens: 4`: every step drafts, so the
  test does not depend on timing). Quantised targets compute each batch row independently
  here (measured: bit-identical logits for rows verified in chunks of 2–17 and decoded one by
  one), so greedy and seeded outputs must be identical with and without speculation (the
  2048-cell pool is never trimmed or compacted, so KV placement — which moves the last bits
  too — follows the requests alone);
* the benchmark pair: target = the F32 copy, draft = the Q4_1 original, adaptive drafting.

One server for the module; the tests run in order (the last ones swap models).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from kodkod.backends.llamacpp.quantize import quantize_model
from kodkod.engine.budget import MIN_BUSY_CACHE_CELLS
from kodkod.models.derive import derive
from tests.server import DEFAULT_MODEL, GEMMA_MODEL, MODELS, KodkodServer

pytestmark = pytest.mark.model

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "List three colours.",
    "Explain what a CPU does.",
    "Tell me a joke about cats.",
    "What is 12 times 12?",
    "Describe the sea in one sentence.",
    "Give me a name for a dog.",
    "Why is the sky blue?",
    "Write the alphabet.",
    "Count from one to ten.",
    "What do bees make?",
    "Name a famous painter.",
    "How do plants grow?",
    "Say hello in Spanish.",
    "What is the opposite of hot?",
    "Write a short story about a robot.",
    "What is water made of?",
    "Recommend a book.",
    "Repeat after me: the quick brown fox jumps over the lazy dog.",
]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def pair(default_gguf: Path) -> dict[str, str]:
    """Derived copies of the default model (made once, kept in models/)."""
    return {
        kind: derive(MODELS, DEFAULT_MODEL, kind, quantize=quantize_model).name for kind in ("q8_0", "f32")
    }


def static_draft(name: str) -> dict[str, Any]:
    return {"draft_model_name": name, "draft_num_tokens": 4, "dynamic_draft": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pair: dict[str, str]) -> Iterator[KodkodServer]:
    assert MIN_BUSY_CACHE_CELLS >= 2048  # never trimmed or compacted: see the module docstring
    srv = KodkodServer.start(
        tmp_path_factory.mktemp("spec"),
        {
            "model": {"max_seq_len": 2048},
            "draft_model": {"draft_model_dir": "models", **static_draft(pair["q8_0"])},
        },
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(server: KodkodServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def admin(server: KodkodServer) -> Iterator[httpx.Client]:
    with server.client(admin=True, timeout=300) as c:
        yield c


def chat(client: httpx.Client, text: str, **body: Any) -> dict[str, Any]:
    r = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": text}], "max_tokens": 24, "temperature": 0, **body},
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def content(resp: dict[str, Any]) -> str:
    return str(resp["choices"][0]["message"]["content"])


def load(admin: httpx.Client, body: dict[str, Any]) -> None:
    with admin.stream("POST", "/v1/model/load", json=body) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert events and "error" not in events[-1], events[-1]


def test_draft_is_listed_and_described(api: httpx.Client, admin: httpx.Client, pair: dict[str, str]) -> None:
    assert [m["id"] for m in api.get("/v1/model/draft/list").json()["data"]] == [pair["q8_0"]]
    listed = {m["id"] for m in admin.get("/v1/model/draft/list").json()["data"]}
    assert {DEFAULT_MODEL, pair["q8_0"], pair["f32"]} <= listed
    params = api.get("/v1/model").json()["parameters"]
    assert params["draft"]["id"] == pair["q8_0"]


def test_a_draft_with_another_vocabulary_is_a_clear_400(admin: httpx.Client) -> None:
    r = admin.post(
        "/v1/model/load", json={"model_name": DEFAULT_MODEL, "draft_model": {"draft_model_name": GEMMA_MODEL}}
    )
    assert r.status_code == 400
    message = json.dumps(r.json())
    assert GEMMA_MODEL in message and DEFAULT_MODEL in message and "vocab" in message


def test_constrained_json_with_a_draft_still_validates(api: httpx.Client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    for who in ("a pilot", "a baker", "a poet"):
        resp = chat(api, f"Describe {who} as JSON.", max_tokens=60, response_format=fmt)
        jsonschema.validate(json.loads(content(resp)), PERSON)
        assert resp["usage"].get("drafted_tokens", 0) > 0, resp  # grammar-masked rows were verified


def complete(client: httpx.Client, prompt: str, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 40, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_stop_string_inside_an_accepted_run(api: httpx.Client) -> None:
    prompt = "Counting in words: one, two, three, four,"
    full = complete(api, prompt)["choices"][0]["text"]
    words = full.split()
    assert len(words) > 8, full
    stop = words[len(words) // 2]  # somewhere in the middle: inside a drafted run
    stopped = complete(api, prompt, stop=[stop])
    assert stopped["choices"][0]["text"] == full[: full.index(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["accepted_draft_tokens"] > 0


def test_counters_in_model_card_and_health(server: KodkodServer, api: httpx.Client) -> None:
    engine = api.get("/v1/model").json()["parameters"]["engine"]
    assert engine["drafted_tokens"] >= engine["accepted_draft_tokens"] > 0
    assert 0 < engine["draft_acceptance_rate"] <= 1 and engine["mean_draft_tokens"] > 0
    health = httpx.get(server.base_url + "/health").json()["engine"]
    assert health["drafted_tokens"] >= engine["drafted_tokens"] and health["draft_steps"] > 0


def run_all(api: httpx.Client, **extra: Any) -> tuple[list[str], list[str], dict[str, int]]:
    greedy = [content(chat(api, p, **extra)) for p in CHAT_PROMPTS]
    sampled = [
        content(chat(api, p, temperature=0.9, top_p=0.95, seed=1234 + i, **extra))
        for i, p in enumerate(CHAT_PROMPTS[:5])
    ]
    engine = api.get("/v1/model").json()["parameters"]["engine"]
    return greedy, sampled, engine


def test_20_prompts_identical_with_draft_model_ngrams_and_neither(
    api: httpx.Client, admin: httpx.Client
) -> None:
    with_draft, sampled_draft, e1 = run_all(api)
    with_ngram, sampled_ngram, e2 = run_all(api, speculative_ngram=True)
    assert e2["drafted_tokens"] > e1["drafted_tokens"] > 0  # both ran speculatively
    load(admin, {"model_name": DEFAULT_MODEL, "max_seq_len": 2048})  # no draft model
    plain, sampled_plain, e3 = run_all(api)
    assert e3["drafted_tokens"] == 0
    assert with_draft == plain
    assert with_ngram == plain
    assert sampled_draft == sampled_plain == sampled_ngram  # seeded draws are keyed by position


def test_f32_target_with_its_q4_1_original_as_draft(
    server: KodkodServer, admin: httpx.Client, api: httpx.Client, pair: dict[str, str]
) -> None:
    """The benchmark pair, adaptive drafting: the draft is cheap, so it drafts, and the F32
    model's own greedy text comes out (F32 batch rows differ from single-token rows in the
    last bits, so this compares the start of the text, not every token)."""
    load(admin, {"model_name": pair["f32"], "max_seq_len": 2048})
    prompt = "Write a long story about a dragon who learns to paint."
    plain = content(chat(api, prompt, max_tokens=48))
    load(
        admin,
        {"model_name": pair["f32"], "max_seq_len": 2048, "draft_model": {"draft_model_name": DEFAULT_MODEL}},
    )
    resp = chat(api, prompt, max_tokens=48)
    assert resp["usage"]["accepted_draft_tokens"] > 0.5 * resp["usage"]["drafted_tokens"] > 0
    assert content(resp)[:40] == plain[:40]
    r = admin.post("/v1/model/unload")
    assert r.status_code == 200
    assert api.get("/v1/model/draft/list").json()["data"] == []
