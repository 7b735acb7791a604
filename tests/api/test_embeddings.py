"""Embeddings end to end: a real server started with `--embedding-model-name all-MiniLM-L6-v2`
(the Hugging Face folder `kodkod models fetch --embedding` puts in models/, converted to GGUF
on load), driven by the official `openai` client.

Shown here: shapes, usage and the float/base64 forms; a batch of 64 inputs equals each input
alone; the too-long input is a 400 naming both numbers; load / unload / list and their error
answers; a chat GGUF offered as the embedding model and an encoder (GGUF or Hugging Face
folder) offered as the chat model are 400s naming why; the chat model list never offers the
encoder; an embedding request and a chat stream run at the same time and both finish; a client
that goes away mid-request stops its remaining batches (the server's log line, waited for with
a deadline); and the vectors agree with sentence-transformers run on the same Hugging Face
weights (cosine ≥ 0.999 on 60 varied sentences).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.server import DEFAULT_MODEL, MODELS, KodkodServer

pytestmark = pytest.mark.model

EMBED_MODEL = "all-MiniLM-L6-v2"
EMBED_DIR = MODELS / EMBED_MODEL
N_EMBD = 384
MAX_INPUTS = 100  # embeddings.max_embedding_inputs of this server

SENTENCES = [
    "Hi",
    "ok",
    "The cat sat on the mat.",
    "A man is eating food.",
    "A man is riding a horse.",
    "Two dogs play in the snow.",
    "The weather today is sunny with a light breeze.",
    "Quantum computers use qubits instead of bits.",
    "Paris is the capital of France.",
    "She sells seashells by the seashore.",
    "How do I reset my password?",
    "The stock market fell sharply on Monday.",
    "Photosynthesis converts light into chemical energy.",
    "I love programming in Python!",
    "What's the time?",
    "Don't count your chickens before they hatch.",
    "E = mc^2 relates mass and energy.",
    "The quick brown fox jumps over the lazy dog.",
    "1234567890",
    "email me at someone@example.com",
    "https://example.org/path?query=1&b=2",
    "Naïve café owners prefer crème brûlée.",
    "Straße, Übermut, Ökonomie und Ähnliches.",
    "El niño comió una manzana en la mañana.",
    "Le garçon a mangé une pomme.",
    "Это предложение написано на русском языке.",
    "これは日本語の文です。",
    "这是一个中文句子。",
    "한국어 문장입니다.",
    "안녕하세요 세계, Hangul 한 and Han 漢",
    "هذه جملة باللغة العربية.",
    "זה משפט בעברית.",
    "Ελληνικά γράμματα: αβγδε.",
    "Emoji test 😀🚀🎉 done.",
    "Tabs\tand\nnewlines\r\nmixed in.",
    "   leading and trailing spaces   ",
    "ALL CAPS SENTENCE SHOUTING LOUDLY",
    "mIxEd CaSe WoRdS",
    "punctuation!!! ??? ... ;;; ---",
    "C++ and C# are programming languages; so is Rust.",
    "The mitochondria is the powerhouse of the cell.",
    "unbelievably, antidisestablishmentarianism is long",
    "Supercalifragilisticexpialidocious",
    "The committee will reconvene after lunch to discuss the budget.",
    "Neural networks learn representations from data.",
    "Please turn off the lights when you leave the room.",
    "The train to Amsterdam departs from platform nine at 14:35.",
    "A long sentence " + "with many repeated words and clauses " * 10 + "ends here.",
    "Another long one: " + " ".join(f"item{i}" for i in range(60)),
    " ".join(["lorem", "ipsum", "dolor", "sit", "amet"] * 20),
    "In 1492, Columbus sailed the ocean blue, and in 1969 humans walked on the Moon.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Is it raining in Seattle again?",
    "Vector databases store embeddings for similarity search.",
    "x",
    "",
    "The end.",
    "Mathematical symbols: ∑ ∫ √ ∞ ≈ ≠ ≤ ≥",
    "Currency: €100, £50, ¥1000, $20",
    "Accents everywhere: àáâãäå çèéêë ìíîï ñòóôõö ùúûü ýÿ",
    "Mixed scripts: hello мир 世界 world",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    if not (EMBED_DIR / "model.safetensors").is_file():
        pytest.fail(f"{EMBED_DIR} is missing: run `kodkod models fetch --embedding` (./test.sh does)")
    from kodkod.models.hf_encoder import cached_gguf

    root = tmp_path_factory.mktemp("embeddings")
    emb = root / "emb"
    emb.mkdir()
    (emb / EMBED_MODEL).symlink_to(EMBED_DIR, target_is_directory=True)
    (emb / "llama-hf").mkdir()
    (emb / "llama-hf" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (emb / "empty").mkdir()
    (emb / "chat-gguf").mkdir()  # a chat model offered as an embedding model
    (emb / "chat-gguf" / default_gguf.name).symlink_to(default_gguf)
    # the chat model folder: the default model, the converted encoder as a GGUF, and the
    # Hugging Face encoder folder (neither of the last two is a chat model)
    chat = root / "chat"
    (chat / DEFAULT_MODEL).mkdir(parents=True)
    (chat / DEFAULT_MODEL / default_gguf.name).symlink_to(default_gguf)
    (chat / "minilm-gguf").mkdir()
    (chat / "minilm-gguf" / "minilm.gguf").symlink_to(cached_gguf(EMBED_DIR))  # converts once
    (chat / "minilm-hf").mkdir()
    for name in ("config.json", "modules.json"):
        (chat / "minilm-hf" / name).symlink_to(EMBED_DIR / name)
    config = {
        "embeddings": {"embedding_model_dir": "emb", "max_embedding_inputs": MAX_INPUTS},
        "network": {"disable_auth": False},
        # 2 threads: the embedding model runs two lanes (contexts) side by side, so every
        # answer below, the accuracy one included, comes through packs spread over lanes
        "model": {"model_dir": "chat", "n_threads": 2},
    }
    srv = KodkodServer.start(root, config, args=["--embedding-model-name", EMBED_MODEL], wait_s=240)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server: KodkodServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def reference() -> object:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(EMBED_DIR), device="cpu")


def vectors(client: openai.OpenAI, inputs: list[str], **kw: object) -> np.ndarray:
    r = client.embeddings.create(model="ignored", input=inputs, encoding_format="float", **kw)  # type: ignore[arg-type]
    assert [d.index for d in r.data] == list(range(len(inputs)))
    return np.array([d.embedding for d in r.data], dtype=np.float32)


def same_vectors(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float noise: the attention runs in float16 (flash attention), and which
    inputs share a batch changes the summation order, so the rows differ by about 1e-4."""
    return bool((a * b).sum(axis=1).min() >= 0.99999 and np.abs(a - b).max() < 1e-3)


def test_shapes_usage_and_encodings(client: openai.OpenAI, reference: object) -> None:
    one = client.embeddings.create(model="x", input="The cat sat on the mat.", encoding_format="float")
    assert one.object == "list" and one.model == EMBED_MODEL and len(one.data) == 1
    vec = np.array(one.data[0].embedding)
    assert vec.shape == (N_EMBD,) and abs(np.linalg.norm(vec) - 1.0) < 1e-5
    texts = ["Hello world", "A man is eating food.", "Naïve café"]
    r = client.embeddings.create(model="x", input=texts, encoding_format="float")
    counts = [len(reference.tokenizer(t)["input_ids"]) for t in texts]  # type: ignore[attr-defined]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(counts)
    floats = np.array([d.embedding for d in r.data], dtype=np.float32)
    # the client's default asks for base64 and decodes it itself
    decoded = np.array([d.embedding for d in client.embeddings.create(model="x", input=texts).data])
    assert np.array_equal(decoded.astype(np.float32), floats)
    raw = client.embeddings.create(model="x", input=texts, encoding_format="base64")
    by_hand = np.stack([np.frombuffer(base64.b64decode(str(d.embedding)), "<f4") for d in raw.data])
    assert np.array_equal(by_hand, floats)
    ids = reference.tokenizer(texts[1])["input_ids"]  # type: ignore[attr-defined]
    as_ids = client.embeddings.create(model="x", input=[ids], encoding_format="float")
    assert as_ids.usage.prompt_tokens == len(ids)
    # alone vs batched with others: the last bits differ
    assert same_vectors(np.array([as_ids.data[0].embedding]), floats[1:2])


def _embedded_inputs(server: KodkodServer) -> float:
    """`kodkod:embeddings_inputs_total` summed over models, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with server.client() as http:
        text = http.get("/metrics").text
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "kodkod:embeddings_inputs_total"
    )


def test_batch_of_64_matches_each_input_alone(server: KodkodServer, client: openai.OpenAI) -> None:
    inputs = [SENTENCES[i % len(SENTENCES)] + f" #{i}" for i in range(64)]
    before = _embedded_inputs(server)
    batch = vectors(client, inputs)
    assert batch.shape == (64, N_EMBD)
    assert _embedded_inputs(server) - before == 64  # the metrics count exactly the inputs
    for i in (0, 17, 33, 63):
        alone = vectors(client, [inputs[i]])[0]
        assert same_vectors(batch[i : i + 1], alone[None]), i


def test_accuracy_against_sentence_transformers(client: openai.OpenAI, reference: object) -> None:
    ours = vectors(client, SENTENCES)
    theirs = reference.encode(SENTENCES, normalize_embeddings=False, batch_size=16)  # type: ignore[attr-defined]
    theirs = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
    cosines = (ours * theirs).sum(axis=1)
    assert len(SENTENCES) >= 50
    worst = int(np.argmin(cosines))
    assert cosines.min() >= 0.999, (SENTENCES[worst], float(cosines[worst]))


def test_too_long_and_hostile_inputs(server: KodkodServer, client: openai.OpenAI) -> None:
    ok = " ".join(["word"] * 254)  # 254 tokens + [CLS] + [SEP] = 256, the model's limit
    assert len(vectors(client, [ok])) == 1
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="x", input=["short", ok + " word"])
    message = str(err.value)
    assert "input 1 has 257 tokens" in message and "at most 256" in message
    assert err.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    with server.client() as api:
        for body, status in (
            ({"input": []}, 400),
            ({"input": ["x"] * (MAX_INPUTS + 1)}, 400),
            ({"input": [[101, 10**9, 102]]}, 400),
            ({"input": [[]]}, 400),
            ({"input": [-1]}, 422),
            ({"input": {"a": 1}}, 422),
            ({"input": "x", "encoding_format": "fp16"}, 422),
        ):
            r = api.post("/v1/embeddings", json=body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]["message"]
        nul = api.post("/v1/embeddings", json={"input": "nul\u0000byte"})
        assert nul.status_code == 200
    assert vectors(client, ["still serving"]).shape == (1, N_EMBD)


def test_chat_model_list_never_offers_the_encoder(server: KodkodServer) -> None:
    with server.client(admin=True) as admin:
        chat_models = [c["id"] for c in admin.get("/v1/models").json()["data"]]
        assert chat_models == [DEFAULT_MODEL]
        # an encoder given as the chat model: a 400 that says what it is and where it loads
        for name, words in (
            ("minilm-gguf", "is an embedding model (architecture bert)"),
            ("minilm-hf", "sentence-transformers folder"),
        ):
            r = admin.post("/v1/model/load", json={"model_name": name})
            assert r.status_code == 400, r.text
            assert words in r.json()["detail"] and "/v1/model/embedding/load" in r.json()["detail"]
        assert admin.get("/v1/model").json()["id"] == DEFAULT_MODEL  # the chat model still serves


def test_load_unload_list(server: KodkodServer, client: openai.OpenAI) -> None:
    with server.client(admin=True) as admin, server.client() as api:
        listed = [c["id"] for c in admin.get("/v1/model/embedding/list").json()["data"]]
        assert listed == [EMBED_MODEL, "chat-gguf", "empty", "llama-hf"]
        assert [c["id"] for c in api.get("/v1/model/embedding/list").json()["data"]] == [EMBED_MODEL]
        assert api.get("/v1/model/embedding").json()["id"] == EMBED_MODEL
        assert api.post("/v1/model/embedding/unload").status_code == 401  # admin only
        again = admin.post("/v1/model/embedding/load", json={"embedding_model_name": EMBED_MODEL})
        assert again.status_code == 400 and "already loaded" in again.json()["detail"]
        for name, words in (
            ("chat-gguf", "not an embedding model: a llama text-generation model"),
            ("llama-hf", "LlamaForCausalLM"),
            ("empty", "neither"),
            ("missing", "not found"),
            ("../emb", "invalid"),
        ):
            r = admin.post("/v1/model/embedding/load", json={"embedding_model_name": name})
            assert r.status_code == 400 and words in r.json()["detail"], (name, r.text)
            assert api.get("/v1/model/embedding").json()["id"] == EMBED_MODEL  # still loaded
        assert admin.post("/v1/model/embedding/unload").status_code == 200
        assert api.get("/v1/model/embedding").status_code == 503
        assert api.get("/v1/model/embedding/list").json()["data"] == []
        with pytest.raises(openai.InternalServerError) as err:
            client.embeddings.create(model="x", input="hello")
        assert err.value.status_code == 503
        assert admin.post("/v1/model/embedding/unload").status_code == 503
        # the older field name `name` still loads, and the server serves again
        r = admin.post("/v1/model/embedding/load", json={"name": EMBED_MODEL, "embeddings_device": "cpu"})
        assert r.json() == {"model_type": "embedding_model", "module": 1, "modules": 1, "status": "finished"}
    assert vectors(client, ["back again"]).shape == (1, N_EMBD)


def test_concurrent_with_a_chat_stream(server: KodkodServer, client: openai.OpenAI) -> None:
    # heavy enough that the stream produces tokens while it runs
    texts = [f"Sentence number {i} about the sea, " + "waves and wind and salt " * 12 for i in range(96)]
    alone = vectors(client, texts)

    async def run() -> tuple[int, np.ndarray, str | None]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0
        ) as aclient:
            stream = await aclient.chat.completions.create(
                model="x",
                messages=[{"role": "user", "content": "Tell a long story about a lighthouse."}],
                max_tokens=120,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            during = 0  # chunks that arrived while the embedding request was running
            finish = None
            embed_task: asyncio.Task[np.ndarray] | None = None

            async def embed() -> np.ndarray:
                r = await aclient.embeddings.create(model="x", input=texts, encoding_format="float")
                return np.array([d.embedding for d in r.data], dtype=np.float32)

            async for chunk in stream:
                if not chunk.choices:
                    continue
                if embed_task is None:
                    embed_task = asyncio.create_task(embed())  # sent while the stream runs
                during += not embed_task.done()
                finish = chunk.choices[0].finish_reason or finish
            assert embed_task is not None
            return during, await embed_task, finish

    during, together, finish = asyncio.run(run())
    assert finish == "length"
    assert during > 1  # the stream kept producing tokens while the embedding request ran
    assert same_vectors(together, alone)
    with httpx.Client(base_url=server.base_url, timeout=30) as h:
        assert h.get("/health").status_code == 200


def test_a_vanished_client_stops_its_remaining_batches(server: KodkodServer, client: openai.OpenAI) -> None:
    # 100 inputs of 250 tokens: one batch each, seconds of work in all
    texts = [f"input {i} " + " ".join(["lighthouse"] * 246) for i in range(MAX_INPUTS)]
    marker = "embedding request cancelled (client gone) after "
    seen = server.log().count(marker)
    # the client gives up after 1 s
    with server.client(timeout=httpx.Timeout(30.0, read=1.0)) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/embeddings", json={"input": texts})
    # leaving the block closed the connection: the server notices and stops the request
    deadline = time.monotonic() + 60
    while server.log().count(marker) == seen:
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.1)
    line = server.log().split(marker)[seen + 1].splitlines()[0]  # "<done> of <total> batches; <n> skipped"
    done, total, skipped = (int(w) for w in line.replace(";", "").split() if w.isdigit())
    # only the batches running at that moment (one per lane, two lanes) finished
    assert total == MAX_INPUTS and done < total and skipped >= total - done - 2 > 0, line
    assert vectors(client, ["still serving"]).shape == (1, N_EMBD)
