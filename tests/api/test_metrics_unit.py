"""The metrics service, its request tap and the error-counting middleware (no model)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from kodkod.api.metrics.service import ErrorReason, RequestTap, ServerMetrics, one_two_five_buckets
from kodkod.app import create_app
from kodkod.auth import KeyStore
from kodkod.core.types import EosReason, ErrorEvent, ErrorKind, FinishEvent, FinishReason, TokenEvent, Usage
from kodkod.settings import Settings


def samples(metrics: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def no_model() -> Any:
    return SimpleNamespace(current=None)


def test_token_buckets_are_one_two_five() -> None:
    assert one_two_five_buckets(1000) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
    assert one_two_five_buckets(0) == ()


def test_a_finished_request_counts_its_usage_once() -> None:
    m = ServerMetrics(no_model())
    usage = Usage(
        prompt_tokens=30,
        completion_tokens=7,
        cached_tokens=12,
        prompt_time_s=0.2,
        completion_time_s=0.5,
        drafted_tokens=9,
        accepted_draft_tokens=4,
        queue_time_s=0.05,
    )
    tap_first = RequestTap(m, "m", None, counts_prompt=True)
    tap_second = RequestTap(m, "m", None, counts_prompt=False)
    for tap in (tap_first, tap_second):
        tap([TokenEvent("a", [1])])
        tap([TokenEvent("bc", [2, 3])])  # two tokens merged: two gaps
        tap([FinishEvent(FinishReason.STOP, EosReason.STOP_TOKEN, usage)])
    s = samples(m)
    label = (("model_name", "m"),)
    assert s[("kodkod:prompt_tokens_total", label)] == 30  # the prompt once, like `usage`
    assert s[("kodkod:generation_tokens_total", label)] == 14
    assert s[("kodkod:prefix_cache_queries_total", label)] == 30
    assert s[("kodkod:prefix_cache_hits_total", label)] == 12
    assert s[("kodkod:spec_decode_num_draft_tokens_total", label)] == 18
    assert s[("kodkod:spec_decode_num_accepted_tokens_total", label)] == 8
    assert s[("kodkod:request_success_total", (("finished_reason", "stop"), ("model_name", "m")))] == 2
    assert s[("kodkod:time_to_first_token_seconds_count", label)] == 2
    assert s[("kodkod:e2e_request_latency_seconds_sum", label)] == 2 * 0.7
    assert s[("kodkod:request_queue_time_seconds_sum", label)] == 2 * 0.05
    assert s[("kodkod:request_prompt_tokens_count", label)] == 1
    assert s[("kodkod:request_generation_tokens_count", label)] == 2
    assert s[("kodkod:inter_token_latency_seconds_count", label)] == 4


def test_an_engine_error_without_an_http_exchange_is_counted_by_kind() -> None:
    m = ServerMetrics(no_model())
    RequestTap(m, "m", None, counts_prompt=True)([ErrorEvent("boom", ErrorKind.INTERNAL)])
    RequestTap(m, "m", None, counts_prompt=True)([ErrorEvent("no", ErrorKind.BAD_REQUEST)])
    m.record_error(ErrorReason.OVERLOAD)  # no model loaded: model_name ""
    m.record_embeddings("emb", 3)
    s = samples(m)
    assert s[("kodkod:request_errors_total", (("model_name", "m"), ("reason", "engine")))] == 1
    assert s[("kodkod:request_errors_total", (("model_name", "m"), ("reason", "bad_request")))] == 1
    assert s[("kodkod:request_errors_total", (("model_name", ""), ("reason", "overload")))] == 1
    assert s[("kodkod:embeddings_inputs_total", (("model_name", "emb"),))] == 3


def app_client(tmp_path: Path, settings: Settings, *, auth: bool = False) -> TestClient:
    keys_path = tmp_path / "api_tokens.yml"
    keys_path.write_text(yaml.safe_dump({"api_key": "k-api", "admin_key": "k-admin"}), encoding="utf-8")
    keys = KeyStore(keys_path, disabled=not auth)
    app = create_app(settings, keys=keys, backend_loader=None, base_dir=tmp_path)  # type: ignore[arg-type]
    return TestClient(app, base_url="http://127.0.0.1")


def test_metrics_route_needs_a_key_and_counts_bad_requests(tmp_path: Path) -> None:
    with app_client(tmp_path, Settings(), auth=True) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"x-api-key": "wrong"}).status_code == 401
        api = {"x-api-key": "k-api"}
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": "many"}, headers=api)
        assert r.status_code == 422
        r = c.post("/v1/completions", json={"prompt": "hi"}, headers=api)
        assert r.status_code == 503  # no model loaded
        r = c.get("/metrics", headers=api)
        assert r.status_code == 200
        text = r.text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    errors = {tuple(sorted(s.labels.items())): s.value for s in families["kodkod:request_errors"].samples}
    assert errors[(("model_name", ""), ("reason", "bad_request"))] == 1
    assert errors[(("model_name", ""), ("reason", "engine"))] == 1
    assert families["kodkod:num_requests_running"].type == "gauge"
    assert families["kodkod:time_to_first_token_seconds"].type == "histogram"
    assert families["kodkod:prompt_tokens"].type == "counter"


def test_metrics_off_means_no_route(tmp_path: Path) -> None:
    settings = Settings.model_validate({"logging": {"metrics": False}})
    with app_client(tmp_path, settings) as c:
        assert c.get("/metrics").status_code == 404
        assert c.app.state.kodkod.metrics is None  # type: ignore[attr-defined]


def test_two_apps_keep_separate_registries(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with app_client(tmp_path / "a", Settings()) as a, app_client(tmp_path / "b", Settings()) as b:
        assert a.post("/v1/completions", json={"prompt": 1}).status_code == 422
        text_b = b.get("/metrics").text
    assert 'reason="bad_request"' not in text_b
