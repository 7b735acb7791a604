"""`POST /v1/embeddings` on a fake encoder (no model): the answer is one pre-serialised JSON body
with OpenAI's shape (keys, order of rows, usage), base64 rows decode to exactly the float rows,
token-id inputs and hostile inputs (NaN-free vectors, NUL bytes, an empty list, too many inputs)
get their answers, and a request of many batches keeps its order."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from kodkod.api.openai.embeddings import answer_body
from kodkod.app import create_app
from kodkod.auth import KeyStore
from kodkod.core.encoder_types import EncoderInfo
from kodkod.settings import Settings

N_EMBD = 8


def vector(ids: Sequence[int]) -> np.ndarray:
    return np.sin(np.arange(N_EMBD) * 0.37 + sum(ids) * 1.13 + len(ids)).astype(np.float32)


class RowEncoder:
    """Input i's vector is a pattern of its token ids (rows differ, values are not round)."""

    def __init__(self, info: EncoderInfo) -> None:
        self.info = info

    def tokenize(self, text: str) -> list[int]:
        return [1, *(min(len(w), 9) for w in text.split()), 2]

    def embed(self, inputs: Sequence[Sequence[int]], lane: int = 0) -> np.ndarray:
        assert len(inputs) <= self.info.batch_sequences
        return np.array([vector(x) for x in inputs], dtype=np.float32)

    def close(self) -> None:
        pass


def make_app(tmp_path: Path) -> tuple[Any, list[RowEncoder]]:
    made: list[RowEncoder] = []

    def loader(path: Path, name: str, *, n_threads: int, lanes: int = 1) -> RowEncoder:
        info = EncoderInfo(name, path, "bert", N_EMBD, 10, 16, 64, 4, "mean", True, 12, lanes)
        made.append(RowEncoder(info))
        return made[-1]

    (tmp_path / "emb" / "enc").mkdir(parents=True)
    (tmp_path / "emb" / "enc" / "model.gguf").write_bytes(b"GGUF")
    settings = Settings.model_validate(
        {"embeddings": {"embedding_model_dir": "emb", "max_embedding_inputs": 50}, "model": {"n_threads": 2}}
    )
    keys = KeyStore(tmp_path / "keys.yml", disabled=True)

    def no_chat(*_: Any, **__: Any) -> Any:
        raise AssertionError("no chat model here")

    app = create_app(settings, keys=keys, backend_loader=no_chat, encoder_loader=loader, base_dir=tmp_path)
    return app, made


def post_all(app: Any, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        await app.state.kodkod.embeddings.load("enc")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return [await client.post("/v1/embeddings", json=b) for b in bodies]

    try:
        return asyncio.run(main())
    finally:
        app.state.kodkod.embeddings.shutdown()


def test_float_and_base64_answers_carry_the_same_rows_in_order(tmp_path: Path) -> None:
    app, made = make_app(tmp_path)
    texts = [" ".join(["word"] * (1 + i % 5)) + f" n{i}" for i in range(30)]  # many packs
    r_float, r_b64, r_ids = post_all(
        app,
        [
            {"input": texts, "model": "ignored"},
            {"input": texts, "encoding_format": "base64"},
            {"input": [[1, 4, 2], [1, 9, 9, 2]]},
        ],
    )
    assert r_float.status_code == 200 and r_float.headers["content-type"] == "application/json"
    body = r_float.json()
    assert list(body) == ["object", "data", "model", "usage"] and body["object"] == "list"
    assert body["model"] == "enc"
    tokens = sum(len(made[0].tokenize(t)) for t in texts)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}
    assert [d["index"] for d in body["data"]] == list(range(30))
    assert all(list(d) == ["object", "embedding", "index"] for d in body["data"])
    assert all(d["object"] == "embedding" for d in body["data"])
    floats = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    expected = np.array([vector(made[0].tokenize(t)) for t in texts])
    assert np.array_equal(floats, expected)  # each row its own input, in input order

    decoded = np.array(
        [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r_b64.json()["data"]]
    )
    assert np.array_equal(decoded, floats)  # base64 is the float32 bytes, little-endian
    assert r_b64.json()["usage"] == body["usage"]

    ids = r_ids.json()
    assert len(ids["data"]) == 2 and ids["usage"]["prompt_tokens"] == 7


def test_bad_inputs_get_400s_in_the_openai_shape(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path)
    empty, too_many, nul, bad_format, too_long = post_all(
        app,
        [
            {"input": []},
            {"input": ["x"] * 51},
            {"input": ["a\x00b"]},  # NUL bytes are text like any other
            {"input": ["x"], "encoding_format": "hex"},
            {"input": [" ".join(["w"] * 20)]},
        ],
    )
    assert empty.status_code == 400 and "empty" in empty.json()["detail"]
    assert too_many.status_code == 400 and "51 inputs" in too_many.json()["detail"]
    assert nul.status_code == 200 and len(nul.json()["data"]) == 1
    assert bad_format.status_code in (400, 422)
    assert too_long.status_code == 400 and "22 tokens" in too_long.json()["detail"]


@pytest.mark.parametrize("fmt", ["float", "base64"])
def test_answer_body_is_the_json_the_dict_form_gave(fmt: str) -> None:
    vectors = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    got = json.loads(answer_body(vectors, fmt, "m", 9))
    rows: list[Any] = (
        [base64.b64encode(r.astype("<f4").tobytes()).decode("ascii") for r in vectors]
        if fmt == "base64"
        else [[float(x) for x in r] for r in vectors]
    )
    assert got == {
        "object": "list",
        "data": [{"object": "embedding", "embedding": row, "index": i} for i, row in enumerate(rows)],
        "model": "m",
        "usage": {"prompt_tokens": 9, "total_tokens": 9, "completion_tokens": 0},
    }
