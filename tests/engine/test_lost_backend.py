"""A backend that lost its process (`BackendLostError`: an RPC-backed model's engine child
ended) on a fake backend: every running stream ends with an error event naming why, the fault
is reported once with that cause, and the engine asks the dead backend nothing more (no culprit
search, no probe decode, no cache reset)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from kodkod.core.backend_types import BackendLostError, BatchRow
from kodkod.core.types import ErrorEvent, ErrorKind, GenerationRequest, TokenEvent
from kodkod.engine.client import EngineClient, EngineUnavailableError
from kodkod.engine.faults import EngineFault
from kodkod.engine.loop import EngineConfig
from kodkod.engine.stream import RequestStream
from tests.fakes import FakeBackend

CONFIG = EngineConfig(max_seq_len=400, max_batch_size=4, chunk_size=8)
REASON = (
    "the engine process of the model 'fake' was killed by SIGABRT: RPC worker 127.0.0.1:9 no "
    "longer accepts connections"
)


@dataclass
class LosingBackend(FakeBackend):
    """A FakeBackend whose process can be lost: from `lose()` on, every call that would cross
    to it raises BackendLostError; `calls_after_loss` counts them."""

    lost: threading.Event = field(default_factory=threading.Event)
    calls_after_loss: int = 0

    def lose(self) -> None:
        self.lost.set()

    def _check(self) -> None:
        if self.lost.is_set():
            self.calls_after_loss += 1
            raise BackendLostError(REASON)

    def decode(self, rows: Sequence[BatchRow]) -> list[list[int]]:
        self._check()
        return super().decode(rows)

    def kv_copy(self, src: int, dst: int, p0: int, p1: int) -> None:
        self._check()
        super().kv_copy(src, dst, p0, p1)

    def kv_remove(self, slot: int, p0: int, p1: int = -1) -> None:
        self._check()
        super().kv_remove(slot, p0, p1)

    def kv_clear(self) -> None:
        self._check()
        super().kv_clear()


async def drain(stream: RequestStream, started: asyncio.Event) -> tuple[list[int], object]:
    """A stream's token ids and its final event; `started` is set at the first token."""
    ids: list[int] = []
    async for ev in stream:
        if isinstance(ev, TokenEvent):
            ids += ev.token_ids
            started.set()
        else:
            return ids, ev
    raise AssertionError("the stream ended without a final event")


def test_a_lost_backend_ends_every_stream_with_its_reason_and_is_asked_nothing_more() -> None:
    backend = LosingBackend(delay_s=0.002)
    fatal: list[BaseException] = []

    async def main() -> None:
        client = EngineClient.start(backend, CONFIG, fatal.append)
        try:
            started = [asyncio.Event() for _ in range(4)]
            tasks = [
                asyncio.ensure_future(
                    drain(client.submit(GenerationRequest(f"r{i}", [1 + i], max_tokens=300)), started[i])
                )
                for i in range(4)
            ]
            for ev in started:
                await asyncio.wait_for(ev.wait(), 10)
            backend.lose()
            finals = await asyncio.wait_for(asyncio.gather(*tasks), 10)
            for tokens, final in finals:
                assert tokens, "every stream had produced tokens before the loss"
                assert isinstance(final, ErrorEvent), final
                assert final.kind is ErrorKind.UNLOADED
                assert "RPC worker 127.0.0.1:9 no longer accepts connections" in final.message
            assert len(fatal) == 1 and isinstance(fatal[0], EngineFault)
            assert isinstance(fatal[0].__cause__, BackendLostError)
            assert backend.calls_after_loss == 1  # the failed decode; nothing retried or probed
            with pytest.raises(EngineUnavailableError) as err:
                client.submit(GenerationRequest("late", [1], max_tokens=3))
            assert err.value.status == 503 and "no longer accepts connections" in err.value.message
            assert backend.live_samplers == 0
        finally:
            await client.shutdown("test over")

    asyncio.run(main())
