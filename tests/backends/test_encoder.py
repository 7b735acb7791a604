"""The llama.cpp encoder on a tiny converted BERT: packed batches equal single inputs, vectors
are normalised when the model says so, limits are checked before llama.cpp sees a batch, and a
closed encoder refuses work instead of touching freed memory; lanes (contexts on one model) run
at the same time with the same results, and closing waits for a running call."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from kodkod.backends.llamacpp.encoder import LlamaEncoder
from kodkod.core.backend_types import BackendError, ModelClosedError
from kodkod.models.hf_encoder import convert_folder
from tests.models.tiny_bert import HIDDEN, MAX_SEQ, VOCAB, write_tiny_bert


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_encoder")
    out = root / "tiny.gguf"
    convert_folder(write_tiny_bert(root / "tiny"), out)
    return out


@pytest.fixture
def encoder(tiny_gguf: Path) -> Iterator[LlamaEncoder]:
    enc = LlamaEncoder.load(tiny_gguf, "tiny", n_threads=1)
    try:
        yield enc
    finally:
        enc.close()


def test_info_and_tokenizer_frame(encoder: LlamaEncoder) -> None:
    info = encoder.info
    assert (info.n_embd, info.max_input_tokens) == (HIDDEN, MAX_SEQ)
    assert (info.pooling, info.normalize) == ("mean", True)
    ids = encoder.tokenize("Hello the CAT")
    assert ids == [VOCAB.index(t) for t in ("[CLS]", "hello", "the", "cat", "[SEP]")]
    assert encoder.tokenize("hellolo")[1:3] == [VOCAB.index("hello"), VOCAB.index("##lo")]


def test_a_packed_batch_equals_each_input_alone(encoder: LlamaEncoder) -> None:
    texts = ["hello world", "the cat sat on the mat .", "a dog !", "cat", "world , world , world"]
    ids = [encoder.tokenize(t) for t in texts]
    batch = encoder.embed(ids)
    assert batch.shape == (len(texts), HIDDEN) and batch.dtype == np.float32
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    for row, one in zip(batch, ids, strict=True):
        assert np.allclose(row, encoder.embed([one])[0], atol=1e-5)
    assert not np.allclose(batch[0], batch[1], atol=1e-2)  # different inputs, different vectors


def test_limits_are_checked_before_llama_cpp(encoder: LlamaEncoder) -> None:
    cls, sep, cat = VOCAB.index("[CLS]"), VOCAB.index("[SEP]"), VOCAB.index("cat")
    with pytest.raises(BackendError, match="longer than"):
        encoder.embed([[cls, *([cat] * MAX_SEQ), sep]])
    with pytest.raises(BackendError, match="exceed one embedding batch"):
        encoder.embed([[cls, cat, sep]] * (encoder.info.batch_sequences + 1))
    with pytest.raises(BackendError):
        encoder.embed([[]])
    assert encoder.embed([[cls, cat, sep]]).shape == (1, HIDDEN)  # still usable


def test_a_closed_encoder_refuses_work(tiny_gguf: Path) -> None:
    enc = LlamaEncoder.load(tiny_gguf, "tiny", n_threads=1)
    ids = enc.tokenize("cat")
    enc.close()
    with pytest.raises(ModelClosedError):
        enc.embed([ids])
    with pytest.raises(ModelClosedError):
        enc.tokenize("cat")
    enc.close()  # twice is harmless


def test_lanes_run_at_once_and_give_the_same_vectors(tiny_gguf: Path) -> None:
    enc = LlamaEncoder.load(tiny_gguf, "tiny", n_threads=1, lanes=3)
    try:
        assert enc.info.lanes == 3
        texts = ["hello world", "the cat sat on the mat .", "a dog !", "cat", "world , world , world"]
        ids = [enc.tokenize(t) for t in texts]
        expected = enc.embed(ids, lane=0)
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(enc.embed, ids, lane) for lane in (0, 1, 2) for _ in range(20)]
            results = [f.result(timeout=60) for f in futures]
        for got in results:
            assert np.array_equal(got, expected)  # one model, identical contexts
        with pytest.raises(BackendError, match="no embedding lane 3"):
            enc.embed(ids, lane=3)
    finally:
        enc.close()
    for lane in (0, 1, 2):
        with pytest.raises(ModelClosedError):
            enc.embed(ids, lane=lane)


def test_close_waits_for_a_running_call(tiny_gguf: Path) -> None:
    enc = LlamaEncoder.load(tiny_gguf, "tiny", n_threads=1, lanes=2)
    ids = [enc.tokenize("the cat sat on the mat .")] * 8
    stop = threading.Event()
    done: list[int] = []

    def hammer(lane: int) -> None:
        # calls back to back until close: each either finishes or is refused, never crashes
        while not stop.is_set():
            try:
                assert enc.embed(ids, lane=lane).shape == (8, HIDDEN)
                done.append(lane)
            except ModelClosedError:
                return

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(hammer, lane) for lane in (0, 1)]
        deadline = time.monotonic() + 60
        while len(done) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        enc.close()
        stop.set()
        for f in futures:
            f.result(timeout=60)
    assert len(done) >= 10
