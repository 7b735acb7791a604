"""End to end: every sampler parameter has an effect, through a real server and the real model.

One server for the module, started with `sampling.override_preset: safe_defaults` (what the
sample config selects) and `model.batch_invariant: true`. Tests that need no preset clear it
first. Outputs are compared only between runs of the same batch shape, or for the same seed
with different neighbours (which llama.cpp keeps identical with prompts prefilled alone, what
`batch_invariant` does; see engine notes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import KodkodServer

pytestmark = pytest.mark.model

PROMPT = "Once upon a time, in a small village by the sea,"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    srv = KodkodServer.start(
        tmp_path_factory.mktemp("samplers"),
        {"sampling": {"override_preset": "safe_defaults"}, "model": {"batch_invariant": True}},
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(server: KodkodServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def admin(server: KodkodServer) -> Iterator[httpx.Client]:
    with server.client(admin=True) as c:
        yield c


@pytest.fixture()
def no_preset(admin: httpx.Client) -> Iterator[None]:
    assert admin.post("/v1/sampling/override/unload").status_code == 200
    yield
    admin.post("/v1/sampling/override/unload")


def complete(api: httpx.Client, **body: Any) -> dict[str, Any]:
    r = api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, **body})
    assert r.status_code == 200, r.text
    return r.json()


def text(api: httpx.Client, **body: Any) -> str:
    return str(complete(api, **body)["choices"][0]["text"])


def chat_tokens(api: httpx.Client, content: str, **body: Any) -> list[int]:
    r = api.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 12,
            "logprobs": True,
            **body,
        },
    )
    assert r.status_code == 200, r.text
    return [item["token_id"] for item in r.json()["choices"][0]["logprobs"]["content"]]


def token_id(api: httpx.Client, piece: str) -> int:
    ids = api.post("/v1/token/encode", json={"text": piece}).json()["tokens"]
    assert len(ids) == 1, ids
    return int(ids[0])


def test_startup_preset_is_selected(api: httpx.Client) -> None:
    r = api.get("/v1/sampling/override/list")
    assert r.status_code == 200
    body = r.json()
    assert body["selected_preset"] == "safe_defaults"
    assert body["overrides"]["temperature"]["override"] == 0.8
    assert body["presets"] == []  # names are for admins only


def test_top_k_1_equals_greedy(api: httpx.Client, no_preset: None) -> None:
    greedy = text(api, temperature=0)
    assert text(api, top_k=1, temperature=1.3, seed=1) == greedy
    assert text(api, top_k=1, top_p=0.2, min_p=0.1, seed=2) == greedy


def test_logit_bias_plus_100_is_the_only_output(api: httpx.Client, no_preset: None) -> None:
    target = token_id(api, " banana")
    got = chat_tokens(api, "Write a poem.", logit_bias={str(target): 100}, temperature=1.0)
    assert got == [target] * 12


def test_allowed_tokens_restrict_every_token(api: httpx.Client, no_preset: None) -> None:
    allowed = [token_id(api, w) for w in (" yes", " no", " maybe", ".")]
    got = chat_tokens(api, "Tell me about the ocean.", allowed_tokens=allowed, temperature=1.5, seed=3)
    assert len(got) == 12 and set(got) <= set(allowed)
    csv = ",".join(str(t) for t in allowed)  # the string form
    assert set(chat_tokens(api, "Hi!", allowed_token_ids=csv, seed=4)) <= set(allowed)


def test_banned_tokens_never_appear(api: httpx.Client, no_preset: None) -> None:
    greedy = chat_tokens(api, "Count from one to ten.", temperature=0)
    banned = sorted(set(greedy[:4]))
    got = chat_tokens(api, "Count from one to ten.", temperature=0, banned_tokens=banned)
    assert got and not set(got) & set(banned)
    got = chat_tokens(
        api, "Count from one to ten.", temperature=0, custom_token_bans=",".join(map(str, banned))
    )
    assert not set(got) & set(banned)


# Each setting alone, with the same seed, must change the text the neutral request gives.
BASE: dict[str, Any] = {"seed": 1234, "temperature": 1.3, "max_tokens": 16}
EFFECTS: list[dict[str, Any]] = [
    {"top_k": 3},
    {"top_p": 0.3},
    {"min_p": 0.2},
    {"top_a": 0.4},
    {"tfs": 0.5},
    {"typical": 0.3},
    {"nsigma": 0.7},
    {"smoothing_factor": 2.0},
    {"skew": 3.0},
    {"temperature": 0.3},
    {"min_temp": 0.1, "max_temp": 0.4},
    {"xtc_probability": 1.0, "xtc_threshold": 0.05},
    {"repetition_penalty": 3.0},
    {"repetition_penalty": 3.0, "penalty_range": 16, "repetition_decay": 16},
    {"mirostat_mode": 2, "mirostat_tau": 2.0},
    {"mirostat_mode": 1, "mirostat_tau": 2.0},
    {"adaptive_target": 0.3, "min_p": 0.05},
]


@pytest.fixture(scope="module")
def neutral(api: httpx.Client, admin: httpx.Client) -> str:
    admin.post("/v1/sampling/override/unload")
    return text(api, **BASE)


def test_the_seed_reproduces(api: httpx.Client, no_preset: None, neutral: str) -> None:
    assert text(api, **BASE) == neutral
    assert text(api, **{**BASE, "seed": 1235}) != neutral


@pytest.mark.parametrize("setting", EFFECTS, ids=lambda s: ",".join(s))
def test_every_sampler_has_an_effect(
    api: httpx.Client, no_preset: None, neutral: str, setting: dict[str, Any]
) -> None:
    assert text(api, **{**BASE, **setting}) != neutral


LOOP = "The cat sat. The cat sat. The cat sat. The cat sat. The cat"


@pytest.mark.parametrize(
    "setting",
    [
        {"dry_multiplier": 3.0},
        {"repetition_penalty": 3.0},
        {"frequency_penalty": 1.5},
        {"presence_penalty": 1.5},
        {"repetition_penalty": 3.0, "penalty_range": 8, "repetition_decay": 8},
    ],
    ids=lambda s: ",".join(s),
)
def test_penalties_and_dry_break_a_greedy_loop(
    api: httpx.Client, no_preset: None, setting: dict[str, Any]
) -> None:
    greedy = text(api, prompt=LOOP, temperature=0, max_tokens=10)
    assert greedy.startswith(" sat. The cat sat.")
    assert text(api, prompt=LOOP, temperature=0, max_tokens=10, **setting) != greedy


def test_penalty_range_0_is_an_empty_window(api: httpx.Client, no_preset: None) -> None:
    greedy = text(api, prompt=LOOP, temperature=0, max_tokens=10)
    got = text(api, prompt=LOOP, temperature=0, max_tokens=10, repetition_penalty=3.0, penalty_range=0)
    assert got == greedy  # TabbyAPI: the penalties look at no tokens at all


def test_temperature_last_matters(api: httpx.Client, no_preset: None) -> None:
    base = {"seed": 99, "temperature": 4.0, "min_p": 0.3, "max_tokens": 12}
    assert text(api, **base, temperature_last=True) != text(api, **base, temperature_last=False)


def test_same_seed_same_text_with_batch_neighbours(server: KodkodServer, no_preset: None) -> None:
    body = {
        "prompt": PROMPT,
        "max_tokens": 16,
        "seed": 4242,
        "temperature": 1.0,
        "top_p": 0.95,
        "min_p": 0.02,
        "repetition_penalty": 1.1,
        "xtc_probability": 0.5,
        "dry_multiplier": 0.5,
    }

    async def run() -> tuple[str, str, list[str]]:
        async with server.async_client() as c:
            alone = (await c.post("/v1/completions", json=body)).json()["choices"][0]["text"]
            others = [
                asyncio.create_task(
                    c.post(
                        "/v1/completions",
                        json={
                            "prompt": f"Question {i}: what is the capital of France? Answer:",
                            "max_tokens": 128,
                            "temperature": 1.2,
                            "seed": i,
                            "ignore_eos": True,
                        },
                    )
                )
                for i in range(4)
            ]
            deadline = asyncio.get_running_loop().time() + 60
            engine: dict[str, Any] = {}
            while engine.get("running", 0) < len(others):  # until the neighbours are decoding
                assert asyncio.get_running_loop().time() < deadline, engine
                await asyncio.sleep(0.05)
                engine = (await c.get("/health")).json().get("engine") or {}
            crowded = (await c.post("/v1/completions", json=body)).json()["choices"][0]["text"]
            # ours and its neighbours shared batches: they were decoding before it was sent and
            # are still going now that it is done
            assert not any(t.done() for t in others)
            done = [(await t).json()["choices"][0]["text"] for t in others]
            return alone, crowded, done

    alone, crowded, neighbours = asyncio.run(run())
    assert crowded == alone
    assert all(neighbours)
    other_seed = text_with(server, {**body, "seed": 4243})
    assert other_seed != alone


def text_with(server: KodkodServer, body: dict[str, Any]) -> str:
    with server.client() as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["text"])


def test_forced_preset_value_overrides_the_request(
    api: httpx.Client, admin: httpx.Client, no_preset: None
) -> None:
    greedy = text(api, temperature=0)
    hot = {"temperature": 1.8, "seed": 5}
    assert text(api, **hot) != greedy
    r = admin.post(
        "/v1/sampling/override/switch", json={"overrides": {"temperature": {"override": 0, "force": True}}}
    )
    assert r.status_code == 200 and r.json() is None
    assert text(api, **hot) == greedy  # a forced 0 is still forced
    listing = admin.get("/v1/sampling/override/list").json()
    assert listing["selected_preset"] is None
    assert listing["overrides"]["temperature"] == {"override": 0.0, "force": True, "additive": False}
    admin.post("/v1/sampling/override/unload")
    assert text(api, **hot) != greedy


def test_non_forced_preset_is_only_a_default(api: httpx.Client, admin: httpx.Client, no_preset: None) -> None:
    greedy = text(api, temperature=0)
    admin.post("/v1/sampling/override/switch", json={"overrides": {"temperature": {"override": 0.0}}})
    assert text(api, seed=5) == greedy  # filled in: the request sent no temperature
    assert text(api, seed=5, temperature=1.8) != greedy


def test_preset_switch_by_name_and_errors(api: httpx.Client, admin: httpx.Client, no_preset: None) -> None:
    r = admin.post("/v1/sampling/override/switch", json={"preset": "sample_preset"})
    assert r.status_code == 200
    listing = admin.get("/v1/sampling/override/list").json()
    assert listing["selected_preset"] == "sample_preset"
    assert {"safe_defaults", "sample_preset"} <= set(listing["presets"])
    assert "max_tokens" not in listing["overrides"]
    assert admin.post("/v1/sampling/override/switch", json={"preset": "nope"}).status_code == 400
    assert admin.post("/v1/sampling/override/switch", json={}).status_code == 400
    bad = {"overrides": {"top_p": {"override": 3}}}
    assert admin.post("/v1/sampling/override/switch", json=bad).status_code == 400
    assert api.post("/v1/sampling/override/switch", json={"preset": "safe_defaults"}).status_code == 401
    assert api.post("/v1/sampling/override/unload").status_code == 401
    assert admin.post("/v1/sampling/override/unload").status_code == 200
    listing = admin.get("/v1/sampling/overrides").json()
    assert listing["overrides"] == {} and listing["selected_preset"] is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"skew": 1.0, "mirostat_mode": 2}, "skew"),
        ({"mirostat_mode": 2, "adaptive_target": 0.5}, "adaptive_target"),
        ({"dry_multiplier": 1.0, "dry_base": 0.5}, "dry_base"),
        ({"allowed_tokens": [10_000_000]}, "allowed_tokens"),
    ],
)
def test_contradictions_are_400_naming_the_field(api: httpx.Client, body: dict[str, Any], field: str) -> None:
    r = api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, **body})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == field and field.split("_")[0] in r.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"temperature": 11},
        {"top_p": 1.5},
        {"typical": 0},
        {"min_p": -0.1},
        {"top_k": -2},
        {"repetition_penalty": 0},
        {"mirostat_mode": 3},
        {"logit_bias": {"x": 1}},
        {"min_tokens": 10, "max_tokens": 5},
        {"min_temp": 2.0, "max_temp": 1.0},
        {"xtc_probability": 2},
        {"smoothing_factor": -1},
        {"nsigma": -1},
    ],
)
def test_out_of_range_values_are_422(api: httpx.Client, body: dict[str, Any]) -> None:
    r = api.post("/v1/completions", json={"prompt": PROMPT, **{"max_tokens": 4, **body}})
    assert r.status_code == 422, r.text


def test_min_tokens_and_ban_eos(api: httpx.Client, no_preset: None) -> None:
    msg = [{"role": "user", "content": "Reply with just the word yes."}]
    body = {"messages": msg, "max_tokens": 40, "temperature": 0}
    short = api.post("/v1/chat/completions", json=body).json()
    n = short["usage"]["completion_tokens"]
    assert short["choices"][0]["finish_reason"] == "stop" and n < 30
    longer = api.post("/v1/chat/completions", json={**body, "min_tokens": n + 6}).json()
    assert longer["usage"]["completion_tokens"] >= n + 6
    banned = api.post("/v1/chat/completions", json={**body, "max_tokens": n + 4, "ignore_eos": True}).json()
    assert banned["usage"]["completion_tokens"] == n + 4
    assert banned["choices"][0]["finish_reason"] == "length"


def test_sillytavern_tabby_default_body(api: httpx.Client) -> None:
    body = {
        "prompt": PROMPT,
        "max_new_tokens": 12,
        "max_tokens": 12,
        "temperature": 0.7,
        "top_p": 0.5,
        "typical_p": 1,
        "typical": 1,
        "sampler_seed": -1,
        "min_p": 0,
        "repetition_penalty": 1.2,
        "frequency_penalty": 0,
        "presence_penalty": 0,
        "top_k": 40,
        "skew": 0,
        "min_tokens": 0,
        "add_bos_token": True,
        "smoothing_factor": 0,
        "smoothing_curve": 1,
        "dry_allowed_length": 2,
        "dry_multiplier": 0,
        "dry_base": 1.75,
        "dry_sequence_breakers": '["\\n", ":", "\\"", "*"]',
        "dry_penalty_last_n": 0,
        "max_tokens_second": 0,
        "stopping_strings": ["\nUser:"],
        "stop": ["\nUser:"],
        "truncation_length": 8192,
        "ban_eos_token": False,
        "skip_special_tokens": True,
        "top_a": 0,
        "tfs": 1,
        "mirostat_mode": 0,
        "mirostat_tau": 5,
        "mirostat_eta": 0.1,
        "custom_token_bans": "",
        "banned_strings": [],
        "api_type": "tabby",
        "legacy_api": False,
        "xtc_threshold": 0.1,
        "xtc_probability": 0,
        "n": 1,
        "rep_pen": 1.2,
        "rep_pen_range": 0,
        "repetition_decay": 0,
        "repetition_penalty_range": 0,
        "temperature_last": True,
        "speculative_ngram": False,
        "seed": -1,
        "guidance_scale": 1,
        "negative_prompt": "",
        "grammar_string": "",
        "json_schema": {},
        "repeat_penalty": 1.2,
        "tfs_z": 1,
        "repeat_last_n": 0,
        "n_predict": 12,
        "num_predict": 12,
        "num_ctx": 8192,
        "mirostat": 0,
        "ignore_eos": False,
        "rep_pen_slope": 1,
        "stream": False,
    }
    r = api.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"]
    with api.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        assert s.status_code == 200
        assert "data: [DONE]" in s.read().decode()
