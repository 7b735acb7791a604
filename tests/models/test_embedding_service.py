"""The embedding service with a fake encoder: names and load errors, inputs checked before any
batch (numbers named), batches within the encoder's limits, batches spread over the encoder's
lanes (in parallel, output order kept), the fair share of lanes while the chat engine is busy,
a cancelled request that runs no further batch, and the workers' lower scheduling priority."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from kodkod.core.encoder_types import EncoderInfo
from kodkod.models.embedding_inputs import lane_plan, plan_batches, split_tail
from kodkod.models.embeddings import (
    EmbeddingInputError,
    EmbeddingLoadError,
    EmbeddingService,
    InputTooLong,
    NoEmbeddingModel,
)


@dataclass
class FakeEncoder:
    info: EncoderInfo
    threads: int = 0  # per lane, as loaded
    calls: list[tuple[int, int]] = field(default_factory=list)  # (inputs, lane)
    closed: bool = False

    def tokenize(self, text: str) -> list[int]:
        return [1, *(2 for _ in text.split()), 3]

    def embed(self, inputs: Sequence[Sequence[int]], lane: int = 0) -> np.ndarray:
        assert len(inputs) <= self.info.batch_sequences
        assert sum(len(x) for x in inputs) <= self.info.batch_tokens
        assert 0 <= lane < self.info.lanes
        self.calls.append((len(inputs), lane))
        return np.array([[len(x), 0.0] for x in inputs], dtype=np.float32)

    def close(self) -> None:
        self.closed = True


def make_service(
    tmp_path: Path, busy: list[bool], n_threads: int = 4
) -> tuple[EmbeddingService, list[FakeEncoder]]:
    made: list[FakeEncoder] = []

    def loader(path: Path, name: str, *, n_threads: int, lanes: int = 1) -> FakeEncoder:
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
            lanes=lanes,
        )
        made.append(FakeEncoder(info, n_threads))
        return made[-1]

    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.gguf").write_bytes(b"GGUF")
    return EmbeddingService(loader, tmp_path, n_threads=n_threads, chat_busy=lambda: busy[0]), made


def test_plan_batches_respects_both_limits() -> None:
    assert plan_batches([3, 3, 3, 3, 3], max_tokens=7, max_seqs=4) == [range(0, 2), range(2, 4), range(4, 5)]
    assert plan_batches([1] * 9, max_tokens=100, max_seqs=4) == [range(0, 4), range(4, 8), range(8, 9)]
    assert plan_batches([], max_tokens=5, max_seqs=2) == []


def test_plan_batches_pairs_inputs_too_long_to_share_a_pack() -> None:
    # short inputs fill packs of max_tokens; two longer ones share a call up to pair_tokens
    assert plan_batches([12] * 6, max_tokens=63, max_seqs=64, pair_tokens=96) == [range(0, 5), range(5, 6)]
    assert plan_batches([40, 40, 40], max_tokens=63, max_seqs=64, pair_tokens=96) == [
        range(0, 2),
        range(2, 3),
    ]
    # never a third input past max_tokens, never a pair past pair_tokens, never past max_seqs
    assert plan_batches([30, 30, 10], max_tokens=63, max_seqs=64, pair_tokens=96) == [
        range(0, 2),
        range(2, 3),
    ]
    assert plan_batches([50, 50], max_tokens=63, max_seqs=64, pair_tokens=96) == [range(0, 1), range(1, 2)]
    assert plan_batches([40, 40], max_tokens=63, max_seqs=1, pair_tokens=96) == [range(0, 1), range(1, 2)]
    # without pair_tokens the pack limit alone decides
    assert plan_batches([40, 40], max_tokens=63, max_seqs=64) == [range(0, 1), range(1, 2)]


def test_split_tail_halves_the_last_batch_of_each_lane() -> None:
    batches = [range(0, 4), range(4, 8), range(8, 12), range(12, 13)]
    assert split_tail(batches, 2) == [range(0, 4), range(4, 8), range(8, 10), range(10, 12), range(12, 13)]
    assert split_tail(batches, 1) == batches  # one lane never waits for another
    assert split_tail([range(0, 3)], 4) == [range(0, 1), range(1, 3)]
    assert split_tail([], 2) == []
    covered = [i for part in split_tail(batches, 3) for i in part]
    assert covered == list(range(13))  # every input once, in order


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
        assert sorted(n for n, _ in made[0].calls) == [1, 1, 1, 1, 2]  # packed to 7 tokens per call
        assert (made[0].info.lanes, made[0].threads) == (4, 1)  # 4 threads: 4 lanes of 1
        await service.load("other")  # replaces the loaded one
        assert made[0].closed and service.name == "other"
        assert await service.unload() and made[1].closed
        assert not await service.unload()

    asyncio.run(run())
    service.shutdown()


def test_lane_plan() -> None:
    assert [lane_plan(n) for n in (0, 1, 2, 3, 4, 8, 12)] == [
        (1, 1),
        (1, 1),
        (2, 1),
        (3, 1),
        (4, 1),
        (4, 2),
        (4, 3),
    ]


class GatedLanes:
    """Wraps a fake encoder's embed: each call waits until the test opens it, and the test can
    see which calls run at the same moment."""

    def __init__(self, enc: FakeEncoder) -> None:
        self.plain = enc.embed
        self.cond = threading.Condition()
        self.running: list[int] = []  # lanes inside embed now
        self.most = 0  # most calls seen running at once
        self.opened = 0  # calls allowed to finish

    def embed(self, inputs: Sequence[Sequence[int]], lane: int = 0) -> np.ndarray:
        with self.cond:
            self.running.append(lane)
            self.most = max(self.most, len(self.running))
            self.cond.notify_all()
            assert self.cond.wait_for(lambda: self.opened > 0, 30), "the test never opened the gate"
            self.opened -= 1
            self.running.remove(lane)
        return self.plain(inputs, lane)

    def wait_running(self, n: int) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.running) == n, 30)

    def open(self, n: int) -> None:
        with self.cond:
            self.opened += n
            self.cond.notify_all()


@pytest.mark.parametrize("chat_busy", [False, True])
def test_batches_run_on_free_lanes_in_parallel_and_keep_their_order(tmp_path: Path, chat_busy: bool) -> None:
    service, made = make_service(tmp_path, [chat_busy], n_threads=2)

    async def run() -> None:
        await service.load("enc")
        enc = made[0]
        gate = GatedLanes(enc)
        enc.embed = gate.embed  # type: ignore[method-assign]
        lengths = [5, 1, 4, 2, 3, 5, 1, 2]  # words; tokens = words + 2
        texts = [" ".join(["w"] * n) for n in lengths]
        task = asyncio.create_task(service.embed(texts))
        parallel = 1 if chat_busy else 2  # while chat streams run, half the lanes
        assert await asyncio.to_thread(gate.wait_running, parallel)
        other = asyncio.create_task(service.embed(["x y"]))  # waits for a lane too
        gate.open(100)
        result, alone = await asyncio.gather(task, other)
        assert result.vectors[:, 0].tolist() == [n + 2 for n in lengths]  # each row its own input
        assert alone.vectors[:, 0].tolist() == [4]
        assert gate.most == parallel  # never more calls at once than lanes allowed
        used = {lane for _, lane in enc.calls}
        assert used == ({0} if chat_busy else {0, 1})

    asyncio.run(run())
    service.shutdown()


def test_a_failing_batch_fails_the_request_and_frees_its_lanes(tmp_path: Path) -> None:
    service, made = make_service(tmp_path, [False], n_threads=2)

    async def run() -> None:
        await service.load("enc")
        enc = made[0]
        plain = enc.embed

        def broken(inputs: Sequence[Sequence[int]], lane: int = 0) -> np.ndarray:
            if len(inputs[0]) == 7:
                raise RuntimeError("native failure")
            return plain(inputs, lane)

        enc.embed = broken  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="native failure"):
            await service.embed(["a", "w w w w w", "b", "c"])
        enc.embed = plain  # type: ignore[method-assign]
        result = await asyncio.wait_for(service.embed(["a b", "c"] * 4), 30)  # both lanes free again
        assert result.vectors[:, 0].tolist() == [4, 3] * 4

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
    service, made = make_service(tmp_path, [False], n_threads=1)  # one lane
    started, release = threading.Event(), threading.Event()

    async def run() -> None:
        await service.load("enc")
        enc = made[0]
        plain = enc.embed

        def gated(inputs: Sequence[Sequence[int]], lane: int = 0) -> np.ndarray:
            started.set()
            assert release.wait(30), "the test never released the batch"
            return plain(inputs, lane)

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


def test_a_cancelled_request_on_two_lanes_starts_no_further_batch(tmp_path: Path) -> None:
    service, made = make_service(tmp_path, [False], n_threads=2)

    async def run() -> None:
        await service.load("enc")
        enc = made[0]
        gate = GatedLanes(enc)
        enc.embed = gate.embed  # type: ignore[method-assign]
        texts = [" ".join(["w"] * 5) for _ in range(6)]  # one batch per input
        task = asyncio.create_task(service.embed(texts))
        assert await asyncio.to_thread(gate.wait_running, 2)  # one batch on each lane
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.open(2)
        enc.embed = gate.plain  # type: ignore[method-assign]
        assert (await asyncio.wait_for(service.embed(["after", "more"]), 30)).vectors.shape == (2, 2)
        # the two running batches, then the new request's one batch, halved for the two lanes
        assert len(enc.calls) == 4
        c = service.counters
        assert (c.requests_cancelled, c.batches_skipped) == (1, 4)

    asyncio.run(run())
    service.shutdown()


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is a Linux feature")
def test_the_worker_runs_at_the_configured_niceness(tmp_path: Path) -> None:
    def loader(path: Path, name: str, *, n_threads: int, lanes: int = 1) -> FakeEncoder:
        raise AssertionError("not loaded here")

    base = os.getpriority(os.PRIO_PROCESS, 0)
    service = EmbeddingService(loader, tmp_path, n_threads=2, nice=min(19, base + 5))
    try:
        nice_of_workers = [
            worker.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
            for worker in (service._worker, *service._lane_workers)  # the threads all native work runs on
        ]
    finally:
        service.shutdown()
    assert nice_of_workers == [min(19, base + 5)] * 3
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the caller is untouched


def test_a_lane_thread_runs_the_request_s_packs_without_a_hand_off_each(tmp_path: Path) -> None:
    service, _ = make_service(tmp_path, [False], n_threads=1)  # one lane
    trips: list[int] = []  # packs run per trip to the lane's thread

    async def run() -> None:
        await service.load("enc")
        plain = service._run_packs

        def counted(*args: object) -> int:
            trips.append(plain(*args))  # type: ignore[arg-type]
            return trips[-1]

        service._run_packs = counted  # type: ignore[method-assign]
        texts = [" ".join(["w"] * 5) for _ in range(6)]  # 7 tokens each: one pack per input
        result = await service.embed(texts)
        assert result.vectors[:, 0].tolist() == [7] * 6
        assert trips == [6]  # one trip to the thread for all six packs
        assert service.counters.batches_run == 6

    asyncio.run(run())
    service.shutdown()


def test_a_waiting_request_gets_the_lane_after_the_running_pack(tmp_path: Path) -> None:
    service, made = make_service(tmp_path, [False], n_threads=1)  # one lane
    lengths: list[int] = []  # tokens of the first input of each pack, in the order they ran

    async def run() -> None:
        await service.load("enc")
        enc = made[0]
        gate = GatedLanes(enc)

        def recorded(inputs: Sequence[Sequence[int]], lane: int = 0) -> np.ndarray:
            rows = gate.embed(inputs, lane)
            lengths.append(len(inputs[0]))
            return rows

        enc.embed = recorded  # type: ignore[method-assign]
        first = asyncio.create_task(service.embed([" ".join(["w"] * 5)] * 4))  # 4 packs of 7 tokens
        assert await asyncio.to_thread(gate.wait_running, 1)
        second = asyncio.create_task(service.embed(["x y"]))  # 4 tokens: waits for the lane
        deadline = asyncio.get_running_loop().time() + 30
        while service._lane_waiters == 0:  # tokenized meanwhile, it now waits for the lane
            assert asyncio.get_running_loop().time() < deadline, "the second request never waited for a lane"
            await asyncio.sleep(0.001)
        gate.open(100)
        await asyncio.wait_for(asyncio.gather(first, second), 30)
        assert lengths == [7, 4, 7, 7, 7]  # the waiting request ran right after the running pack

    asyncio.run(run())
    service.shutdown()


def test_a_cancelled_request_logs_the_batches_its_lane_thread_finished(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service, made = make_service(tmp_path, [False], n_threads=1)  # one lane

    async def run() -> None:
        await service.load("enc")
        enc = made[0]
        gate = GatedLanes(enc)
        enc.embed = gate.embed  # type: ignore[method-assign]
        texts = [" ".join(["w"] * 5) for _ in range(6)]  # one batch per input
        task = asyncio.create_task(service.embed(texts))
        gate.open(2)  # two batches finish on the lane's thread, the third waits at the gate

        def third_running() -> bool:
            with gate.cond:
                return bool(gate.cond.wait_for(lambda: len(enc.calls) == 2 and len(gate.running) == 1, 30))

        assert await asyncio.to_thread(third_running)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.open(1)
        enc.embed = gate.plain  # type: ignore[method-assign]
        assert (await asyncio.wait_for(service.embed(["after"]), 30)).vectors.shape == (1, 2)

    with caplog.at_level(logging.INFO, logger="kodkod.models.embeddings"):
        asyncio.run(run())
    service.shutdown()
    assert "cancelled (client gone) after 2 of 6 batches; 3 skipped" in caplog.text
