"""The engine thread end to end on a fake backend: events, stops, UTF-8, aborts, failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from kodkod.core.types import (
    EosReason,
    ErrorEvent,
    ErrorKind,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    TokenEvent,
)
from kodkod.engine.client import ContextLengthError, EngineClient
from kodkod.engine.loop import EngineConfig
from kodkod.engine.stopping import StopStringMatcher
from tests.fakes import FakeBackend


def run(fn: Callable[[EngineClient, FakeBackend], Awaitable[Any]], **backend_kw: Any) -> Any:
    backend = FakeBackend(**backend_kw)

    async def main() -> Any:
        client = EngineClient.start(backend, EngineConfig(max_seq_len=200, max_batch_size=4, chunk_size=8))
        try:
            return await fn(client, backend)
        finally:
            await client.shutdown("test over")

    return asyncio.run(main())


async def wait_idle(client: EngineClient, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = client.stats
        if s.running == 0 and s.waiting == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not idle: {client.stats}")


def test_concurrent_requests_each_finish_once_and_nothing_leaks() -> None:
    async def body(client: EngineClient, backend: FakeBackend) -> None:
        streams = [
            client.submit(GenerationRequest(f"r{i}", [10 + i, 11 + i], max_tokens=12)) for i in range(8)
        ]
        results = await asyncio.gather(*(s.collect() for s in streams))
        for i, (tokens, final) in enumerate(results):
            assert isinstance(final, FinishEvent)
            assert final.reason is FinishReason.LENGTH
            assert final.usage.completion_tokens == 12
            assert tokens.token_ids == [(12 + i + k) % 64 for k in range(12)]
        await wait_idle(client)
        assert backend.live_samplers == 0
        # max_batch_size 4: never more than 4 sequences in a decode batch
        assert max(len(b) for b in backend.batches) <= 4

    run(body)


def test_eos_stops_with_stop_str_and_is_not_emitted() -> None:
    async def body(client: EngineClient, backend: FakeBackend) -> None:
        tokens, final = await client.submit(GenerationRequest("e", [5], max_tokens=50)).collect()
        assert isinstance(final, FinishEvent)
        assert final.reason is FinishReason.STOP and final.eos_reason is EosReason.STOP_TOKEN
        assert final.stop_str == "<eos>"
        assert tokens.text == "<6><7>"

    run(body, script={7: 0}, pieces={0: b"<eos>"})


def test_min_tokens_bans_eos_until_reached() -> None:
    async def body(client: EngineClient, backend: FakeBackend) -> None:
        req = GenerationRequest("m", [5], max_tokens=6, min_tokens=4)
        tokens, _final = await client.submit(req).collect()
        # EOS (0) would come right after 6; banned, the fake's argmax falls to token 1 instead
        assert len(tokens.token_ids) >= 4
        assert tokens.token_ids[0] != 0

    run(body, script={5: 0})


def test_stop_string_split_across_tokens_never_leaks() -> None:
    pieces = {1: b"Hel", 2: b"lo W", 3: b"orld", 4: b"!"}

    async def body(client: EngineClient, backend: FakeBackend) -> None:
        stream = client.submit(GenerationRequest("s", [0], max_tokens=10, stop_strings=["o Wor"]))
        texts = []
        final = None
        async for ev in stream:
            if isinstance(ev, TokenEvent):
                texts.append(ev.text)
            else:
                final = ev
        assert "".join(texts) == "Hell"
        assert all("o" not in t[-1:] or t == "Hell" for t in texts)
        assert isinstance(final, FinishEvent)
        assert final.eos_reason is EosReason.STOP_STRING and final.stop_str == "o Wor"

    run(body, pieces=pieces, eos=63)


def test_multibyte_characters_split_over_tokens_are_never_broken() -> None:
    emoji = "😀".encode()  # F0 9F 98 80
    pieces = {1: emoji[:2], 2: emoji[2:3], 3: emoji[3:] + "字".encode()[:1], 4: "字".encode()[1:]}

    async def body(client: EngineClient, backend: FakeBackend) -> None:
        stream = client.submit(GenerationRequest("u", [0], max_tokens=4))
        texts = []
        async for ev in stream:
            if isinstance(ev, TokenEvent):
                texts.append(ev.text)
        assert "".join(texts) == "😀字"
        assert all("\ufffd" not in t for t in texts)

    run(body, pieces=pieces, eos=63)


def test_closing_a_stream_aborts_and_frees_the_slot() -> None:
    async def body(client: EngineClient, backend: FakeBackend) -> None:
        stream = client.submit(GenerationRequest("long", [1], max_tokens=190))
        got = 0
        async for ev in stream:
            if isinstance(ev, TokenEvent):
                got += len(ev.token_ids)
            if got >= 3:
                break
        stream.close()
        await wait_idle(client)
        assert backend.live_samplers == 0
        assert client.stats.generated_tokens < 190

    run(body)


def test_shutdown_ends_running_requests_with_an_error_event() -> None:
    backend = FakeBackend(delay_s=0.005)

    async def main() -> None:
        client = EngineClient.start(backend, EngineConfig(max_seq_len=200, max_batch_size=4, chunk_size=8))
        streams = [client.submit(GenerationRequest(f"x{i}", [1], max_tokens=190)) for i in range(3)]
        deadline = time.monotonic() + 10
        while client.stats.running < 3:  # all three are generating
            assert time.monotonic() < deadline, client.stats
            await asyncio.sleep(0.005)
        await client.shutdown("the model was unloaded")
        finals = [(await s.collect())[1] for s in streams]
        for f in finals:
            assert isinstance(f, ErrorEvent)
            assert f.kind is ErrorKind.UNLOADED and "unloaded" in f.message
        assert backend.live_samplers == 0
        late = client.submit(GenerationRequest("late", [1], max_tokens=3))
        _, final = await late.collect()
        assert isinstance(final, ErrorEvent)

    asyncio.run(main())


def test_a_failing_step_fails_its_requests_and_the_engine_recovers() -> None:
    """A failure after the decode (here: reading logits) fails the running requests and clears
    the cache, but the engine serves on and nothing is reported as fatal (a decode that cannot
    work at all is: tests/engine/test_faults.py)."""
    fatal: list[BaseException] = []
    backend = FakeBackend()
    logits = backend.logits
    broken = [True]

    def flaky(index: int) -> Any:
        if broken[0]:
            broken[0] = False
            raise RuntimeError("simulated failure")
        return logits(index)

    backend.logits = flaky  # type: ignore[method-assign]

    async def main() -> None:
        client = EngineClient.start(
            backend, EngineConfig(max_seq_len=200, max_batch_size=4, chunk_size=8), fatal.append
        )
        _, final = await client.submit(GenerationRequest("f", [1], max_tokens=5)).collect()
        assert isinstance(final, ErrorEvent) and final.kind is ErrorKind.INTERNAL
        tokens, final = await client.submit(GenerationRequest("ok", [1], max_tokens=5)).collect()
        assert isinstance(final, FinishEvent) and len(tokens.token_ids) == 5
        assert fatal == [] and client.problem is None
        await client.shutdown()

    asyncio.run(main())


def test_context_length_is_checked_before_submission() -> None:
    async def body(client: EngineClient, backend: FakeBackend) -> None:
        with pytest.raises(ContextLengthError) as err:
            client.submit(GenerationRequest("big", list(range(1, 60)) * 4))
        assert "200" in err.value.message and "236" in err.value.message
        with pytest.raises(ContextLengthError):
            client.submit(GenerationRequest("big2", [1] * 150, max_tokens=100))

    run(body)


def test_exclusive_work_waits_for_running_requests() -> None:
    async def body(client: EngineClient, backend: FakeBackend) -> None:
        stream = client.submit(GenerationRequest("w", [1], max_tokens=30))
        seen: list[int] = []
        fut = asyncio.ensure_future(client.run_exclusive(lambda b: seen.append(client.stats.running) or 42))
        tokens, final = await stream.collect()
        assert isinstance(final, FinishEvent) and len(tokens.token_ids) == 30
        assert await fut == 42
        assert seen == [0] or seen == [1]  # stats snapshot may lag; the request finished first
        assert final.usage.completion_tokens == 30

    run(body, delay_s=0.002)


def test_stop_matcher_holds_back_prefixes() -> None:
    m = StopStringMatcher(["</s>", "END"])
    assert m.feed("abc<") == ("abc", None)
    assert m.feed("/") == ("", None)
    assert m.feed("x") == ("</x", None)
    assert m.feed("EN") == ("", None)
    assert m.feed("D tail") == ("", "END")
