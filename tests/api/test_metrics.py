"""`GET /metrics` and `GET /slots` against a real server (one server for the module).

The server runs 4 sequences at once and lets 1 more wait (`max_waiting_requests: 1`), so four
long streams fill the batch, a fifth waits and a sixth is refused with 429. Every figure is read
back through prometheus_client's own text parser.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server import KodkodServer, wait_idle

pytestmark = pytest.mark.model

BATCH = 4
PROMPT = "The history of the lighthouse begins"
LONG_STREAM = {"prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    srv = KodkodServer.start(
        tmp_path_factory.mktemp("metrics"),
        {
            "network": {"api_servers": ["OAI", "Kobold"]},
            "model": {"max_batch_size": BATCH, "max_seq_len": 2048, "cache_size": BATCH * 2048},
            "limits": {"max_waiting_requests": 1},
        },
    )
    yield srv
    srv.stop()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: KodkodServer) -> Samples:
    """Every sample of /metrics by (name, sorted labels), parsed by prometheus_client."""
    r = httpx.get(f"{server.base_url}/metrics", headers=server.headers(), timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def model_label(server: KodkodServer) -> str:
    with server.client() as api:
        return str(api.get("/v1/model").json()["id"])


def wait_for(server: KodkodServer, check: Any, timeout_s: float = 60.0) -> Samples:
    """Scrape until `check(samples)` holds (deadline); return those samples."""
    deadline = time.monotonic() + timeout_s
    samples = scrape(server)
    while not check(samples):
        assert time.monotonic() < deadline, "the metrics never showed the expected state"
        time.sleep(0.1)
        samples = scrape(server)
    return samples


def test_metrics_need_an_api_key_and_name_the_model(server: KodkodServer) -> None:
    assert httpx.get(f"{server.base_url}/metrics", timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer not-a-key"}
    assert httpx.get(f"{server.base_url}/metrics", headers=wrong, timeout=30).status_code == 401
    samples = scrape(server)
    model = model_label(server)
    names = {name for name, _ in samples}
    for expected in (
        "kodkod:num_requests_running",
        "kodkod:num_requests_waiting",
        "kodkod:kv_cache_usage_perc",
        "kodkod:host_cache_saves_total",
        "kodkod:host_cache_restores_total",
    ):
        assert expected in names, expected
    assert value(samples, "kodkod:num_requests_running", model_name=model) == 0
    assert 0.0 <= value(samples, "kodkod:kv_cache_usage_perc", model_name=model) <= 1.0


def test_token_counters_grow_by_exactly_the_usage_and_histograms_count_each_request(
    server: KodkodServer,
) -> None:
    model = model_label(server)
    wait_idle(server)
    before = scrape(server)
    with server.client() as api:
        chat = api.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 24},
        )
        assert chat.status_code == 200, chat.text
        usages = [chat.json()["usage"]]
        finish_reasons = [chat.json()["choices"][0]["finish_reason"]]
        body = {
            "prompt": PROMPT,
            "max_tokens": 20,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with api.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: {")]
        chunks = [json.loads(line[6:]) for line in lines]
        usages.append(next(c["usage"] for c in chunks if c.get("usage")))
        ends = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        finish_reasons.append(next(f for f in ends if f))
    after = scrape(server)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, model_name=model, **labels) - value(
            before, name, model_name=model, **labels
        )

    assert grew("kodkod:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert grew("kodkod:generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert grew("kodkod:prefix_cache_queries_total") == sum(u["prompt_tokens"] for u in usages)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert grew("kodkod:prefix_cache_hits_total") == cached
    assert usages[1]["completion_tokens"] == 20
    for reason in set(finish_reasons):
        assert grew("kodkod:request_success_total", finished_reason=reason) == finish_reasons.count(reason)
    for hist in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
    ):
        assert grew(f"kodkod:{hist}_count") == 2, hist
    assert grew("kodkod:request_generation_tokens_sum") == sum(u["completion_tokens"] for u in usages)
    assert grew("kodkod:request_prompt_tokens_sum") == sum(u["prompt_tokens"] for u in usages)
    # the streamed one reached its reader token by token: 19 gaps after its first token at most
    assert 1 <= grew("kodkod:inter_token_latency_seconds_count") <= 19 + usages[0]["completion_tokens"]
    e2e = grew("kodkod:e2e_request_latency_seconds_sum")
    ttft = grew("kodkod:time_to_first_token_seconds_sum")
    assert 0 < ttft <= e2e


def test_a_list_of_prompts_counts_every_prompt_once(server: KodkodServer) -> None:
    """`/v1/completions` with two prompts and n=2: usage sums both prompts (each once, not per
    choice), streamed or not, and the prompt counters grow by exactly that."""
    model = model_label(server)
    prompts = ["A short prompt.", PROMPT + " on a rocky coast, where the keepers"]
    with server.client() as api:
        lengths = [len(api.post("/v1/token/encode", json={"text": p}).json()["tokens"]) for p in prompts]
        wait_idle(server)
        before = scrape(server)
        base = {"prompt": prompts, "n": 2, "max_tokens": 4, "ignore_eos": True}
        plain = api.post("/v1/completions", json=base)
        assert plain.status_code == 200, plain.text
        body = {**base, "stream": True, "stream_options": {"include_usage": True}}
        with api.stream("POST", "/v1/completions", json=body) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = next(c["usage"] for c in chunks if c.get("usage"))
    for usage in (plain.json()["usage"], streamed):
        assert usage["prompt_tokens"] == sum(lengths), (usage, lengths)
        assert usage["completion_tokens"] == 4 * 4
    after = scrape(server)
    grown = value(after, "kodkod:prompt_tokens_total", model_name=model) - value(
        before, "kodkod:prompt_tokens_total", model_name=model
    )
    assert grown == 2 * sum(lengths)


def test_bad_requests_are_counted_by_kind(server: KodkodServer) -> None:
    model = model_label(server)
    before = scrape(server)
    with server.client() as api:
        too_long = api.post("/v1/completions", json={"prompt": "hi", "max_tokens": 100_000})
        assert too_long.status_code == 400, too_long.text
        bad_id = api.post("/v1/completions", json={"prompt": [5, 10**9], "max_tokens": 2})
        assert bad_id.status_code == 400, bad_id.text
        nan = api.post(
            "/v1/chat/completions",
            content=b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
            headers={"content-type": "application/json"},
        )
        assert 400 <= nan.status_code < 500 and nan.status_code not in (401, 403, 429), nan.text
    after = scrape(server)
    key = "kodkod:request_errors_total"
    grown = value(after, key, model_name=model, reason="bad_request") - value(
        before, key, model_name=model, reason="bad_request"
    )
    assert grown == 3
    for reason in ("overload", "engine", "client_disconnect"):
        assert value(after, key, model_name=model, reason=reason) == value(
            before, key, model_name=model, reason=reason
        )
    # a wrong key is not a request error
    assert (
        httpx.get(f"{server.base_url}/v1/model", headers={"x-api-key": "nope"}, timeout=30).status_code == 401
    )
    assert value(scrape(server), key, model_name=model, reason="bad_request") == value(
        after, key, model_name=model, reason="bad_request"
    )


def test_slots_during_four_streams_and_a_full_queue(server: KodkodServer) -> None:
    model = model_label(server)
    wait_idle(server)
    key = "kodkod:request_errors_total"
    before = scrape(server)
    with httpx.Client(base_url=server.base_url, timeout=30) as plain:
        assert plain.get("/slots").status_code == 401
        assert plain.get("/slots", headers=server.headers()).status_code == 401  # an API key

    async def main() -> None:
        async with AsyncExitStack() as stack:
            api = await stack.enter_async_context(server.async_client())
            admin = await stack.enter_async_context(server.async_client(admin=True))
            running = [
                await stack.enter_async_context(api.stream("POST", "/v1/completions", json=LONG_STREAM))
                for _ in range(BATCH)
            ]
            assert all(r.status_code == 200 for r in running)
            deadline = time.monotonic() + 60
            while True:
                r = await admin.get("/slots")
                assert r.status_code == 200, r.text
                view = r.json()
                seqs = view["sequences"]
                if len(seqs) == BATCH and all(
                    s["state"] == "running" and s["generated_tokens"] > 0 for s in seqs
                ):
                    break
                assert time.monotonic() < deadline, view
                await asyncio.sleep(0.1)
            assert view["model"] == model
            assert view["num_running"] == BATCH and view["num_waiting"] == 0
            for s in seqs:
                assert s["prompt_tokens"] > 0 and s["age_s"] >= 0 and s["slot"] >= 0
                assert "prompt" not in s  # logging.log_prompt is off
                assert set(s["speculative"]) == {"drafted_tokens", "accepted_tokens", "acceptance_rate"}
            kv = view["kv"]
            assert kv["used_cells"] + kv["free_cells"] == kv["capacity_cells"] > 0
            assert kv["used_cells"] >= sum(s["computed_tokens"] for s in seqs)
            assert view["host_cache"]["bytes"] >= 0
            waiting = await stack.enter_async_context(api.stream("POST", "/v1/completions", json=LONG_STREAM))
            assert waiting.status_code == 200
            samples = await asyncio.to_thread(
                wait_for,
                server,
                lambda s: value(s, "kodkod:num_requests_waiting", model_name=model) == 1,
            )
            assert value(samples, "kodkod:num_requests_running", model_name=model) == BATCH
            assert value(samples, "kodkod:kv_cache_usage_perc", model_name=model) > 0
            refused = await api.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert refused.status_code == 429, refused.text
            # leaving: the five streams end without their clients reading to the end

    asyncio.run(main())
    after = wait_for(
        server,
        lambda s: (
            value(s, key, model_name=model, reason="client_disconnect")
            - value(before, key, model_name=model, reason="client_disconnect")
            >= BATCH + 1
        ),
    )
    assert (
        value(after, key, model_name=model, reason="overload")
        - value(before, key, model_name=model, reason="overload")
        == 1
    )
    assert (
        value(after, key, model_name=model, reason="client_disconnect")
        - value(before, key, model_name=model, reason="client_disconnect")
        == BATCH + 1
    )
    wait_idle(server)
