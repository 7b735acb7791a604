"""End to end: the load-parameter table on a real server, and GPU fields on this CPU build.

One server for the module, started from a TabbyAPI-style `config.yml` copied from a GPU machine
(`gpu_split`, `tensor_parallel`, `autosplit_reserve`, …, a `backend: exllamav3` and a misspelt
key). Its model_dir holds SmolLM2 and `smol-tabby`, a SmolLM2 folder whose `tabby_config.yml`
the tests rewrite (it is read at every load).

- the config starts the server, the model serves a completion, and the log says, once per
  field, that each GPU field was ignored, and names the closest key to the misspelt one;
- TabbyAPI's documented load example, sent as written, loads with its max_seq_len and cache_mode
  and serves; each GPU field is a progress event with a `message` and a log warning;
- for every row the load request lists, the values the unit walk refuses are 422s, and values
  it accepts load (combined in two loads); for every row tabby_config.yml lists, refused
  values are a 400 naming the key, accepted ones load (one load).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from kodkod.settings.load_param import LoadParam, Section, Surface
from kodkod.settings.load_table import LOAD_TABLE, NO_DEVICES
from tests.server import DEFAULT_GGUF, DEFAULT_MODEL, KodkodServer
from tests.settings.test_load_table import examples

pytestmark = pytest.mark.model

TABBY = "smol-tabby"
GPU_CONFIG: dict[str, Any] = {
    "model": {
        "backend": "exllamav3",
        "max_seq_len": 512,
        "cache_mode": "Q8",
        "tensor_parallel": True,
        "tensor_parallel_backend": "nccl",
        "gpu_split_auto": False,
        "gpu_split": [20, 25],
        "autosplit_reserve": [512],
        "gpu_splt": [1],  # misspelt: a warning naming gpu_split
    },
    "draft_model": {"draft_gpu_split": [4]},
}
EXAMPLE = {  # TabbyAPI's usage page, as written
    "model_name": DEFAULT_MODEL,
    "max_seq_len": 8192,
    "tensor_parallel": True,
    "gpu_split_auto": False,
    "gpu_split": [20, 25],
    "cache_mode": "Q8",
}
IGNORED = f"ignored: {NO_DEVICES}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KodkodServer]:
    work = tmp_path_factory.mktemp("load_table")
    models = work / "models"
    models.mkdir()
    for name in (DEFAULT_MODEL, TABBY):  # real folders (a linked folder is outside model_dir)
        (models / name).mkdir()
        (models / name / DEFAULT_GGUF.name).symlink_to(DEFAULT_GGUF)
    srv = KodkodServer.start(work, GPU_CONFIG)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def admin(server: KodkodServer) -> Iterator[httpx.Client]:
    with server.client(admin=True, timeout=300.0) as c:
        yield c


def events_of(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]


def load(admin: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    with admin.stream("POST", "/v1/model/load", json=body) as r:
        if r.status_code != 200:
            r.read()
        assert r.status_code == 200, r.text
        events = events_of(r)
    assert events and "error" not in events[-1], events[-1]
    assert events[-1]["status"] == "finished" and events[-1]["model_type"] == "model"
    return events


def messages(events: list[dict[str, Any]]) -> list[str]:
    return [e["message"] for e in events if "message" in e]


def completes(server: KodkodServer) -> dict[str, Any]:
    """A short completion; tabby_config.yml may route text to reasoning, so no text check."""
    with server.client() as api:
        r = api.post(
            "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["usage"]["completion_tokens"] > 0 if "usage" in body else body["choices"]
    return body


def test_a_tabbyapi_config_with_gpu_fields_starts_and_serves(
    server: KodkodServer, admin: httpx.Client
) -> None:
    model = admin.get("/v1/model").json()
    assert model["id"] == DEFAULT_MODEL
    assert model["parameters"]["max_seq_len"] == 512 and model["parameters"]["cache_mode"] == "Q8"
    assert completes(server)["choices"][0]["text"]
    log = server.log()
    assert "unknown key 'model.gpu_splt' (ignored); did you mean 'gpu_split'?" in log
    for line in (
        "tensor_parallel: true " + IGNORED,
        "tensor_parallel_backend: nccl " + IGNORED,
        "gpu_split_auto: false " + IGNORED,
        "gpu_split: [20, 25] " + IGNORED,
        "autosplit_reserve: [512] " + IGNORED,
        "draft_gpu_split: [4] " + IGNORED,
        "backend: exllamav3 ignored: this server runs GGUF models on llama.cpp",
    ):
        assert log.count(line) == 1, (line, log[-3000:])


def test_the_documented_load_example_loads_and_serves(server: KodkodServer, admin: httpx.Client) -> None:
    events = load(admin, EXAMPLE)
    notes = messages(events)
    assert notes == [
        "tensor_parallel: true " + IGNORED,
        "gpu_split_auto: false " + IGNORED,
        "gpu_split: [20, 25] " + IGNORED,
    ]
    for e in events:  # a note is a "processing" event before any step of the model
        if "message" in e:
            assert (e["model_type"], e["module"], e["modules"], e["status"]) == (
                "model",
                0,
                100,
                "processing",
            )
    steps = [(e["module"], e["status"]) for e in events if "message" not in e]
    assert steps == [(m, "processing") for m in range(1, 101)] + [(100, "finished")]
    params = admin.get("/v1/model").json()["parameters"]
    assert params["max_seq_len"] == 8192 and params["cache_mode"] == "Q8"
    assert completes(server)["choices"][0]["text"]
    log = server.log()
    for note in notes:
        assert f"loading {DEFAULT_MODEL}: {note}" in log
    # the same again is "already loaded": the notes, then the two 1/1 events
    again = load(admin, {**EXAMPLE, "gpu_splitt": [1]})
    assert messages(again)[0] == "load request: unknown key 'gpu_splitt' ignored; did you mean 'gpu_split'?"
    assert [(e["module"], e["modules"]) for e in again if "message" not in e] == [(1, 1), (1, 1)]


# ---- the table through the load request ---------------------------------------------------

REQUEST_ROWS = [r for r in LOAD_TABLE if Surface.REQUEST in r.surfaces]


def request_body(row: LoadParam, value: Any) -> dict[str, Any]:
    if row.section is Section.MODEL:
        return {"model_name": DEFAULT_MODEL, row.name: value}
    draft = {"draft_model_name": DEFAULT_MODEL, row.name: value}
    return {"model_name": DEFAULT_MODEL, "draft_model": draft}


@pytest.mark.parametrize("row", REQUEST_ROWS, ids=[r.name for r in REQUEST_ROWS])
def test_request_refuses_what_the_table_refuses(admin: httpx.Client, row: LoadParam) -> None:
    before = admin.get("/v1/model").json()["parameters"]
    for value in examples(row)[1]:
        r = admin.post("/v1/model/load", json=request_body(row, value))
        assert r.status_code == 422, (row.name, value, r.text)
        assert row.name in json.dumps(r.json()["detail"]), r.text
    assert admin.get("/v1/model").json()["parameters"] == before  # nothing was loaded


def test_request_refuses_hostile_numbers(admin: httpx.Client) -> None:
    for field, value in (("rope_scale", math.nan), ("gpu_split", [math.inf]), ("gpu_split", [1.0] * 100_000)):
        body = json.dumps({"model_name": DEFAULT_MODEL, field: value})  # NaN / Infinity tokens
        r = admin.post("/v1/model/load", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (field, r.text[:300])


# Rows whose accepted values are checked by the unit walk only: vision true needs a projector
# (400), a prompt template or draft model must name one that exists, mtp needs an MTP head,
# rpc_servers needs workers that answer (loaded for real in tests/backends/test_rpc.py).
NOT_LOADED = {"vision", "prompt_template", "draft_model_name", "draft_mode", "rpc_servers"}


def combined(which: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model_name": DEFAULT_MODEL}
    draft: dict[str, Any] = {"draft_model_name": DEFAULT_MODEL}
    for row in REQUEST_ROWS:
        if row.name in NOT_LOADED:
            continue
        ok = examples(row)[0]
        (body if row.section is Section.MODEL else draft)[row.name] = ok[which]
    body["draft_model"] = draft
    return body


@pytest.mark.parametrize("which", [0, -1], ids=["first", "last"])
def test_request_loads_what_the_table_accepts(server: KodkodServer, admin: httpx.Client, which: int) -> None:
    load(admin, combined(which))
    assert admin.get("/v1/model").json()["parameters"]["draft"]["id"] == DEFAULT_MODEL


# ---- the table through tabby_config.yml ---------------------------------------------------

TABBY_ROWS = [r for r in LOAD_TABLE if Surface.TABBY in r.surfaces]


def write_tabby(server: KodkodServer, model: dict[str, Any], draft: dict[str, Any] | None = None) -> None:
    data: dict[str, Any] = {"model": model}
    if draft:
        data["draft_model"] = draft
    (server.workdir / "models" / TABBY / "tabby_config.yml").write_text(
        yaml.safe_dump(data), encoding="utf-8"
    )


def test_tabby_config_refuses_what_the_table_refuses(server: KodkodServer, admin: httpx.Client) -> None:
    for row in TABBY_ROWS:
        for value in examples(row)[1]:
            if row.section is Section.MODEL:
                write_tabby(server, {row.name: value})
            else:
                write_tabby(server, {}, {"draft_model_name": DEFAULT_MODEL, row.name: value})
            r = admin.post("/v1/model/load", json={"model_name": TABBY})
            assert r.status_code == 400, (row.name, value, r.text)
            detail = r.json()["detail"]
            assert f"tabby_config.yml in {TABBY}: {row.section.value}.{row.name}" in detail, detail


def test_tabby_config_loads_what_the_table_accepts(server: KodkodServer, admin: httpx.Client) -> None:
    model: dict[str, Any] = {"gpu_splitt": [1]}
    draft: dict[str, Any] = {"draft_model_name": DEFAULT_MODEL}
    for row in TABBY_ROWS:
        if row.name not in NOT_LOADED:
            (model if row.section is Section.MODEL else draft)[row.name] = examples(row)[0][0]
    write_tabby(server, model, draft)
    events = load(admin, {"model_name": TABBY})
    notes = messages(events)
    assert notes[0] == (
        f"tabby_config.yml in {TABBY}: model: unknown key 'gpu_splitt' ignored; did you mean 'gpu_split'?"
    )
    params = admin.get("/v1/model").json()
    assert params["id"] == TABBY and params["parameters"]["draft"]["id"] == DEFAULT_MODEL
    completes(server)
