"""The embedding service with a fake encoder: names and load errors, inputs checked before any
batch (numbers named), batches within the encoder's limits, the fair share of threads while the
chat engine is busy, a cancelled request that runs no further batch, and the worker's lower
scheduling priority."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from kodkod.core.encoder_types import EncoderInfo
from kodkod.models.embeddings import (
    EmbeddingInputError,
    EmbeddingLoadError,
    EmbeddingService,
    InputTooLong,
    NoEmbeddingModel,
    _plan_batches,
)


@dataclass
class FakeEncoder:
    info: EncoderInfo
    calls: list[tuple[int, int]] = field(default_factory=list)  # (inputs, threads)
    threads: int = 0
    closed: bool = False

    def tokenize(self, text: str) -> list[int]:
        return [1, *(2 for _ in text.split()), 3]

    def embed(self, inputs: Sequence[Sequence[int]]) -> np.ndarray:
        assert len(inputs) <= self.info.batch_sequences
        assert sum(len(x) for x in inputs) <= self.info.batch_tokens
        self.calls.append((len(inputs), self.threads))
        return np.array([[len(x), 0.0] for x in inputs], dtype=np.float32)

    def set_threads(self, n_threads: int) -> None:
        self.threads = n_threads

    def close(self) -> None:
        self.closed = True


def make_service(tmp_path: Path, busy: list[bool]) -> tuple[EmbeddingService, list[FakeEncoder]]:
    made: list[FakeEncoder] = []

    def loader(path: Path, name: str, *, n_threads: int) -> FakeEncoder:
        info = EncoderInfo(
            name,
            path,
            "bert",
            n_embd=2,
            n_vocab=5,
            max_input_tokens=10,
            batch_tokens=12,
            batch_sequences=4,
            pooling="mean",
            normalize=True,
            pack_tokens=7,
        )
        made.append(FakeEncoder(info))
        return made[-1]

    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.gguf").write_bytes(b"GGUF")
    return EmbeddingService(loader, tmp_path, n_threads=4, chat_busy=lambda: busy[0]), made


def test_plan_batches_respects_both_limits() -> None:
    assert _plan_batches([3, 3, 3, 3, 3], max_tokens=7, max_seqs=4) == [range(0, 2), range(2, 4), range(4, 5)]
    assert _plan_batches([1] * 9, max_tokens=100, max_seqs=4) == [range(0, 4), range(4, 8), range(8, 9)]
    assert _plan_batches([], max_tokens=5, max_seqs=2) == []


def test_load_embed_unload(tmp_path: Path) -> None:
    busy = [False]
    service, made = make_service(tmp_path, busy)

    async def run() -> None:
        with pytest.raises(NoEmbeddingModel):
            await service.embed(["x"])
        for name, words in (("missing", "not found"), ("../enc", "invalid"), ("", "invalid")):
            with pytest.raises(EmbeddingLoadError, match=words):
                await service.load(name)
        await service.load("enc")
        assert service.name == "enc" and service.names() == ["enc", "other"]
        with pytest.raises(EmbeddingLoadError, match="already loaded"):
            await service.load("enc")
        texts = [" ".join(["w"] * n) for n in (1, 2, 3, 4, 5, 6)]
        result = await service.embed(texts)
        assert result.vectors[:, 0].tolist() == [3, 4, 5, 6, 7, 8]  # order kept across batches
        assert result.prompt_tokens == 33 and result.model == "enc"
        assert [n for n, _ in made[0].calls] == [2, 1, 1, 1, 1]  # packed to 7 tokens per call
        assert all(threads == 4 for _, threads in made[0].calls)
        busy[0] = True
        await service.embed(["a b"])
        assert made[0].calls[-1][1] == 2  # half the threads while chat streams run
        await service.load("other")  # replaces the loaded one
        assert made[0].closed and service.name == "other"
        assert await service.unload() and made[1].closed
        assert not await service.unload()

    asyncio.run(run())
    service.shutdown()


def test_inputs_are_checked_before_any_batch(tmp_path: Path) -> None:
    service, made = make_service(tmp_path, [False])

    async def run() -> None:
        await service.load("enc")
        with pytest.raises(InputTooLong, match=r"input 1 has 11 tokens.*at most 10"):
            await service.embed(["ok", " ".join(["w"] * 9)])
        with pytest.raises(EmbeddingInputError, match="token id 7"):
            await service.embed([[1, 7, 3]])
        with pytest.raises(EmbeddingInputError, match="empty"):
            await service.embed([[]])
        assert made[0].calls == []

    asyncio.run(run())
    service.shutdown()


def test_a_cancelled_request_runs_no_further_batch(tmp_path: Path) -> None:
    service, made = make_service(tmp_path, [False])
    started, release = threading.Event(), threading.Event()

    async def run() -> None:
        await service.load("enc")
        enc = made[0]
        plain = enc.embed

        def gated(inputs: Sequence[Sequence[int]]) -> np.ndarray:
            started.set()
            assert release.wait(30), "the test never released the batch"
            return plain(inputs)

        enc.embed = gated  # type: ignore[method-assign]
        texts = [" ".join(["w"] * 5) for _ in range(6)]  # 7 tokens each: one batch per input
        task = asyncio.create_task(service.embed(texts))
        assert await asyncio.to_thread(started.wait, 30)
        task.cancel()  # what the endpoint does when its client goes away
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        enc.embed = plain  # type: ignore[method-assign]
        assert (await service.embed(["after"])).vectors.shape == (1, 2)
        # the batch that was running finished; none of the other five ever started
        assert [n for n, _ in enc.calls] == [1, 1]
        c = service.counters
        assert (c.requests_cancelled, c.batches_skipped, c.batches_run) == (1, 5, 1)

    asyncio.run(run())
    service.shutdown()


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is a Linux feature")
def test_the_worker_runs_at_the_configured_niceness(tmp_path: Path) -> None:
    def loader(path: Path, name: str, *, n_threads: int) -> FakeEncoder:
        raise AssertionError("not loaded here")

    base = os.getpriority(os.PRIO_PROCESS, 0)
    service = EmbeddingService(loader, tmp_path, n_threads=1, nice=min(19, base + 5))
    try:
        nice_of_worker = service._worker.submit(  # the thread all native work runs on
            lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        ).result()
    finally:
        service.shutdown()
    assert nice_of_worker == min(19, base + 5)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the caller is untouched
