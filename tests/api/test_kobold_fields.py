"""Kobold field names and meanings, auth and the open endpoints, on a real server.

What KoboldAI clients send that differs from the OpenAI fields (phrase bans, GBNF `grammar`,
`trim_stop`, `singleline`, `memory`, `dynatemp_range`, `use_default_badwordsids`, …) must reach
the shared sampler fields; sampler presets apply to Kobold requests too. Bodies are KoboldAI
Lite's defaults with a few fields changed. The schema mapping is also checked without a server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from kodkod.api.kobold.convert import kobold_values
from kodkod.api.kobold.jobs import JobTable, KoboldJob
from kodkod.api.kobold.schemas import KoboldGenerateRequest
from kodkod.api.state import OverrideState
from kodkod.app import create_app
from kodkod.auth import KeyStore
from kodkod.settings import Settings
from tests.api.test_kobold import LITE_BODY, MAX_SEQ_LEN, lite, long_body, start_server
from tests.server import KodkodServer

pytestmark = pytest.mark.model

# SillyTavern's KoboldAI Classic body.
ST_CLASSIC_BODY: dict[str, Any] = {
    "prompt": "User: Hello!\nBot:",
    "use_story": False,
    "use_memory": False,
    "use_authors_note": False,
    "use_world_info": False,
    "max_context_length": 8192,
    "max_length": 8,
    "rep_pen": 1.1,
    "rep_pen_range": 600,
    "rep_pen_slope": 0,
    "temperature": 1,
    "tfs": 1,
    "top_a": 0,
    "top_k": 0,
    "top_p": 0.95,
    "min_p": 0,
    "typical": 1,
    "sampler_order": [6, 0, 1, 2, 3, 4, 5],
    "singleline": False,
    "use_default_badwordsids": False,
    "mirostat": 0,
    "mirostat_eta": 0.1,
    "mirostat_tau": 5,
    "grammar": "",
    "stop_sequence": ["\nUser:"],
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    srv = start_server(tmp_path_factory)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: KodkodServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


# -- the schema mapping, without a server ------------------------------------------------------


def test_lite_body_maps_onto_the_shared_fields() -> None:
    req = KoboldGenerateRequest.model_validate(
        {
            **LITE_BODY,
            "banned_tokens": ["foo", 7],
            "rep_pen_range": 0,
            "bypass_eos": True,
            "grammar": 'root ::= "a"',
            "render_special": True,
            "sampler_seed": 3,
            "dynatemp_range": 0.5,
        }
    )
    values = kobold_values(req, OverrideState())
    assert values["banned_strings"] == ["foo"] and values["banned_tokens"] == [7]
    assert values["penalty_range"] == -1  # Kobold's 0 = the whole context
    assert values["ban_eos_token"] is True
    assert values["grammar_string"] == 'root ::= "a"'
    assert values["skip_special_tokens"] is False
    assert values["seed"] == 3
    assert values["max_tokens"] == 768 and values["repetition_penalty"] == 1.05
    assert values["stop"] == ["### Instruction:", "### Response:"]
    assert (values["min_temp"], values["max_temp"]) == (0.25, 1.25)  # 0.75 ∓ 0.5


def test_neutral_kobold_fields_leave_presets_in_charge() -> None:
    overrides = OverrideState(
        overrides={"ban_eos_token": {"override": True}, "penalty_range": {"override": 64}}
    )
    body = {"prompt": "x", "use_default_badwordsids": False, "bypass_eos": False}
    values = kobold_values(KoboldGenerateRequest.model_validate(body), overrides)
    assert values["ban_eos_token"] is True and values["penalty_range"] == 64


def test_jobs_without_a_genkey_belong_to_their_client() -> None:
    aborted: list[str] = []

    class Engine:
        def abort(self, request_id: str) -> None:
            aborted.append(request_id)

    table = JobTable()
    jobs = [
        KoboldJob("k", "r1", "10.0.0.1", False, Engine()),  # type: ignore[arg-type]
        KoboldJob("r2", "r2", "10.0.0.1", True, Engine()),  # type: ignore[arg-type]
        KoboldJob("r3", "r3", "10.0.0.2", True, Engine()),  # type: ignore[arg-type]
        KoboldJob("k", "r4", "10.0.0.2", False, Engine()),  # type: ignore[arg-type]
    ]
    for job in jobs:
        table.add(job)
    assert table.latest("k", None) is jobs[3]
    assert table.latest(None, "10.0.0.1") is jobs[1]
    assert table.abort(None, "10.0.0.2") == 1 and aborted == ["r3"]
    assert table.abort("k", None) == 2 and aborted == ["r3", "r1", "r4"]
    table.remove(jobs[3])
    assert table.latest("k", None) is jobs[0] and len(table) == 3


@pytest.mark.parametrize(
    ("servers", "mounted"), [(["OAI"], False), (["oai", "KOBOLD"], True), (["Kobold"], True)]
)
def test_kobold_routes_are_mounted_when_configured(tmp_path: Path, servers: list[str], mounted: bool) -> None:
    settings = Settings.model_validate({"network": {"api_servers": servers}})
    keys = KeyStore(tmp_path / "api_tokens.yml", disabled=True)
    app = create_app(
        settings,
        keys=keys,
        backend_loader=None,
        base_dir=tmp_path,  # type: ignore[arg-type]
    )
    with TestClient(app, base_url="http://127.0.0.1") as c:
        for path in ("/api/v1/info/version", "/api/latest/info/version", "/api/extra/version"):
            assert (c.get(path).status_code == 200) is mounted, path
        if mounted:  # and no model is loaded
            assert c.get("/api/v1/model").json() == {"result": "ReadOnly"}
            assert c.get("/api/v1/config/max_context_length").status_code == 503
            assert c.post("/api/v1/generate", json=lite(max_length=1)).status_code == 503
            assert c.post("/api/extra/tokencount", json={"prompt": "x"}).status_code == 503
            assert c.post("/api/extra/abort", json={"genkey": "x"}).json() == {"success": True}


# -- open endpoints and auth ------------------------------------------------------------------


def test_version_and_soft_prompt_endpoints_need_no_key(server: KodkodServer) -> None:
    with httpx.Client(base_url=server.base_url) as anon:
        assert anon.get("/api/v1/info/version").json() == {"result": "1.2.5"}
        assert anon.get("/api/latest/info/version").json() == {"result": "1.2.5"}
        assert anon.get("/api/extra/version").json() == {"result": "KoboldCpp", "version": "1.74"}
        assert anon.get("/api/v1/config/soft_prompts_list").json() == {"values": []}
        assert anon.get("/api/v1/config/soft_prompt").json() == {"value": ""}
        assert anon.put("/api/v1/config/soft_prompt", json={"value": "x"}).json() == {}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/v1/generate"),
        ("POST", "/api/latest/generate"),
        ("POST", "/api/extra/generate/stream"),
        ("POST", "/api/extra/abort"),
        ("GET", "/api/extra/generate/check"),
        ("POST", "/api/extra/generate/check"),
        ("POST", "/api/extra/tokencount"),
        ("GET", "/api/v1/model"),
        ("GET", "/api/v1/config/max_length"),
        ("GET", "/api/v1/config/max_context_length"),
        ("GET", "/api/extra/true_max_context_length"),
    ],
)
def test_kobold_routes_need_the_api_key(server: KodkodServer, method: str, path: str) -> None:
    with httpx.Client(base_url=server.base_url) as anon:
        r = anon.request(method, path, json=lite(max_length=1))
    assert r.status_code == 401, r.text


# -- Kobold field meanings ---------------------------------------------------------------------


def test_generate_with_sillytavern_classic_body(client: httpx.Client) -> None:
    r = client.post("/api/v1/generate", json=ST_CLASSIC_BODY)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["completion_tokens"] <= 8


def test_memory_is_prepended_to_the_prompt(client: httpx.Client) -> None:
    memory = "You are a helpful storyteller. Keep it short.\n"
    r = client.post("/api/v1/generate", json=lite(memory=memory, max_length=1))
    both = client.post("/api/extra/tokencount", json={"prompt": memory + LITE_BODY["prompt"]}).json()
    assert r.json()["results"][0]["prompt_tokens"] == both["value"]


def test_sampler_presets_apply_to_kobold_requests(server: KodkodServer, client: httpx.Client) -> None:
    with server.client(admin=True) as admin:
        forced = {"max_tokens": {"override": 3, "force": True}}
        assert admin.post("/v1/sampling/override/switch", json={"overrides": forced}).status_code == 200
        try:
            r = client.post("/api/v1/generate", json=long_body("KCPP-PRESET", 20))
            assert r.json()["results"][0]["completion_tokens"] == 3
        finally:
            admin.post("/v1/sampling/override/unload")
    r = client.post("/api/v1/generate", json=long_body("KCPP-PRESET", 5))
    assert r.json()["results"][0]["completion_tokens"] == 5


def test_kobold_only_fields_are_honoured(client: httpx.Client) -> None:
    body = lite(
        max_length=10,
        stop_sequence=[],
        rep_pen_range=0,
        dynatemp_range=0.25,
        use_default_badwordsids=True,
        render_special=True,
        sampler_seed=7,
    )
    (result,) = client.post("/api/v1/generate", json=body).json()["results"]
    assert result["completion_tokens"] == 10  # EOS banned by use_default_badwordsids
    assert result["finish_reason"] == "length"


def test_trim_stop_false_keeps_the_stop_sequence(client: httpx.Client) -> None:
    greedy = lite(max_length=24, temperature=0, stop_sequence=[], bypass_eos=True)
    text = client.post("/api/v1/generate", json=greedy).json()["results"][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    assert stop.strip(), text
    at = text.find(stop)
    stopped = {**greedy, "stop_sequence": [stop]}
    trimmed = client.post("/api/v1/generate", json=stopped).json()["results"][0]
    kept = client.post("/api/v1/generate", json={**stopped, "trim_stop": False}).json()["results"][0]
    assert trimmed["text"] == text[:at] and trimmed["finish_reason"] == "stop"
    assert kept["text"] == text[: at + len(stop)]


def test_singleline_stops_at_the_first_newline(client: httpx.Client) -> None:
    body = lite(max_length=32, temperature=0, stop_sequence=[], singleline=True, prompt="A list:\n1.")
    assert "\n" not in client.post("/api/v1/generate", json=body).json()["results"][0]["text"]


def test_nsigma_is_top_n_sigma_like_on_openai(client: httpx.Client) -> None:
    """Kobold's `nsigma` is the shared `top_n_sigma` (it was a 400 here, honoured on OpenAI):
    a tiny n-sigma keeps only the top token, so the output is the greedy one."""
    greedy = lite(max_length=12, temperature=0, stop_sequence=[])
    want = client.post("/api/v1/generate", json=greedy).json()["results"][0]["text"]
    r = client.post(
        "/api/v1/generate", json={**greedy, "temperature": 1.5, "nsigma": 0.001, "sampler_seed": 7}
    )
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["text"] == want
    assert client.post("/api/v1/generate", json=lite(max_length=2, nsigma=-1)).status_code == 422


def test_lite_phrase_bans_are_banned_strings(client: httpx.Client) -> None:
    """Lite's `banned_tokens` is a list of phrases (TabbyAPI answers 422 to it)."""
    greedy = lite(max_length=32, temperature=0, stop_sequence=[])
    free = client.post("/api/v1/generate", json=greedy).json()["results"][0]["text"]
    assert "cat" in free.lower(), free  # the story is about a cat
    r = client.post("/api/v1/generate", json={**greedy, "banned_tokens": ["cat", "Cat", "CAT"]})
    assert r.status_code == 200, r.text
    assert "cat" not in r.json()["results"][0]["text"].lower()


def test_lite_grammar_is_a_gbnf_grammar(client: httpx.Client) -> None:
    body = lite(max_length=8, grammar='root ::= "yes" | "no"', stop_sequence=[])
    r = client.post("/api/v1/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["text"] in ("yes", "no")
    assert client.post("/api/v1/generate", json=lite(max_length=2, grammar="")).status_code == 200


def test_context_overflow_is_a_400_before_any_stream(client: httpx.Client) -> None:
    body = lite(max_length=MAX_SEQ_LEN + 1)
    for path in ("/api/v1/generate", "/api/extra/generate/stream"):
        r = client.post(path, json=body)
        assert r.status_code == 400, path
        assert r.json()["error"]["code"] == "context_length_exceeded"


def test_unknown_genkeys(client: httpx.Client) -> None:
    assert client.post("/api/extra/generate/check", json={"genkey": "nope"}).json() == {"results": []}
    assert client.get("/api/extra/generate/check").json() == {"results": []}
    assert client.post("/api/extra/abort", json={"genkey": "nope"}).json() == {"success": True}
    assert client.post("/api/extra/abort", content=b"not json").json() == {"success": True}
