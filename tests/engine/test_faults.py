"""Fault isolation in the engine on a fake backend: a decode failing because of one sequence
fails only it; what cannot recover is fatal, reported, and refused at once; a stuck step is
noticed by the watchdog; token ids outside the vocabulary never reach the engine."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from kodkod.core.backend_types import BatchRow
from kodkod.core.types import (
    ErrorEvent,
    ErrorKind,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from kodkod.engine.client import EngineClient, EngineUnavailableError, RequestError
from kodkod.engine.faults import EngineFault
from kodkod.engine.loop import EngineConfig
from kodkod.engine.stream import RequestStream
from tests.fakes import FakeBackend

CONFIG = EngineConfig(max_seq_len=200, max_batch_size=4, chunk_size=8)


async def until(cond: Callable[[], object], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def drain(stream: RequestStream, started: asyncio.Event) -> tuple[TokenEvent, object]:
    """Every token of a stream and its final event; `started` is set at the first token."""
    ids: list[int] = []
    async for ev in stream:
        if isinstance(ev, TokenEvent):
            ids += ev.token_ids
            started.set()
        else:
            return TokenEvent("", ids), ev
    raise AssertionError("the stream ended without a final event")


def test_a_decode_failing_because_of_one_sequence_fails_only_that_sequence() -> None:
    """Token 50 makes any batch holding it fail (rows before it leave KV behind, as in
    llama.cpp). "bad" samples 50 while "good" decodes beside it: only "bad" fails, "good"
    finishes with the tokens it gets alone, the prefix cache survives, nothing is fatal."""
    backend = FakeBackend(delay_s=0.002, fail_tokens={50})
    fatal: list[BaseException] = []

    async def main() -> None:
        client = EngineClient.start(backend, CONFIG, fatal.append)
        try:
            alone, final = await client.submit(GenerationRequest("alone", [1, 2], max_tokens=30)).collect()
            assert isinstance(final, FinishEvent)
            cached_prompt = [20, 21, 22, 23, 24, 25]
            _, final = await client.submit(GenerationRequest("cache", cached_prompt, max_tokens=2)).collect()
            assert isinstance(final, FinishEvent)

            started = asyncio.Event()
            good = asyncio.ensure_future(
                drain(client.submit(GenerationRequest("good", [1, 2], max_tokens=30)), started)
            )
            await started.wait()  # "good" is decoding: "bad" joins its batches
            bad = client.submit(GenerationRequest("bad", [44], max_tokens=20))
            (tokens, good_final), (bad_tokens, bad_final) = await asyncio.gather(good, bad.collect())
            assert isinstance(good_final, FinishEvent) and good_final.reason is FinishReason.LENGTH
            assert tokens.token_ids == alone.token_ids
            assert isinstance(bad_final, ErrorEvent) and bad_final.kind is ErrorKind.BAD_REQUEST
            assert "could not evaluate" in bad_final.message
            assert bad_tokens.token_ids == [45, 46, 47, 48, 49, 50]  # 50 is sampled, then fails
            assert getattr(backend, "failed_decodes", 0) >= 2  # the batch, then "bad" alone
            # the failing batch held both rows: "good" was not collateral damage
            assert any(len(b) == 2 for b in backend.batches)

            _, final = await client.submit(GenerationRequest("again", cached_prompt, max_tokens=2)).collect()
            assert isinstance(final, FinishEvent)
            assert final.usage.cached_tokens == len(cached_prompt) - 1  # the prefix cache was kept
            assert fatal == [] and client.problem is None
            assert backend.live_samplers == 0
        finally:
            await client.shutdown("test over")

    asyncio.run(main())


def test_a_failing_prompt_prefill_fails_only_its_request() -> None:
    backend = FakeBackend(fail_tokens={50})
    fatal: list[BaseException] = []

    async def main() -> None:
        client = EngineClient.start(backend, CONFIG, fatal.append)
        try:
            _, final = await client.submit(GenerationRequest("bad", [3, 50, 4], max_tokens=5)).collect()
            assert isinstance(final, ErrorEvent) and final.kind is ErrorKind.BAD_REQUEST
            tokens, final = await client.submit(GenerationRequest("ok", [3, 4], max_tokens=5)).collect()
            assert isinstance(final, FinishEvent) and tokens.token_ids == [5, 6, 7, 8, 9]
            assert fatal == [] and client.problem is None
        finally:
            await client.shutdown("test over")

    asyncio.run(main())


def test_a_decode_that_always_fails_is_fatal_and_new_requests_are_refused_at_once() -> None:
    backend = FakeBackend(fail_decode=True)
    fatal: list[BaseException] = []

    async def main() -> None:
        client = EngineClient.start(backend, CONFIG, fatal.append)
        try:
            results = await asyncio.gather(
                *(
                    client.submit(GenerationRequest(f"r{i}", [1 + i], max_tokens=5)).collect()
                    for i in range(2)
                )
            )
            for _, final in results:
                assert isinstance(final, ErrorEvent) and final.kind is ErrorKind.UNLOADED
            assert len(fatal) == 1 and isinstance(fatal[0], EngineFault)
            assert "cannot decode" in str(fatal[0])
            assert client.problem is not None and "cannot decode" in client.problem
            with pytest.raises(EngineUnavailableError) as err:
                client.submit(GenerationRequest("late", [1], max_tokens=3))
            assert err.value.status == 503 and "cannot decode" in err.value.message
            assert backend.live_samplers == 0
        finally:
            await client.shutdown("test over")

    asyncio.run(main())


def test_a_dead_engine_thread_is_reported_and_its_requests_end() -> None:
    backend = FakeBackend()
    fatal: list[BaseException] = []

    async def main() -> None:
        client = EngineClient.start(backend, CONFIG, fatal.append)
        engine = client._engine  # break the loop outside the guarded step

        def broken(cmd: object) -> None:
            raise RuntimeError("loop bug")

        engine._handle = broken  # type: ignore[method-assign]
        try:
            _, final = await asyncio.wait_for(
                client.submit(GenerationRequest("x", [1], max_tokens=3)).collect(), 5.0
            )
            assert isinstance(final, ErrorEvent) and final.kind is ErrorKind.UNLOADED
            await until(lambda: not client.alive, "the engine thread to end")
            assert len(fatal) == 1 and "loop bug" in str(fatal[0])
            assert client.problem is not None and "engine thread failed" in client.problem
            with pytest.raises(EngineUnavailableError):
                client.submit(GenerationRequest("late", [1], max_tokens=3))
        finally:
            await client.shutdown("test over")

    asyncio.run(main())


def test_the_watchdog_reports_a_stuck_step_and_new_requests_are_refused() -> None:
    backend = FakeBackend()
    fatal: list[BaseException] = []
    release = threading.Event()
    decode = backend.decode

    def stuck(rows: list[BatchRow]) -> list[list[int]]:
        release.wait(10.0)
        return decode(rows)

    backend.decode = stuck  # type: ignore[method-assign]

    async def main() -> None:
        config = EngineConfig(max_seq_len=200, max_batch_size=4, chunk_size=8, stall_timeout_s=0.05)
        client = EngineClient.start(backend, config, fatal.append)
        try:
            stream = client.submit(GenerationRequest("slow", [1], max_tokens=3))
            await until(lambda: fatal, "the watchdog's report")
            assert "stuck in one step" in str(fatal[0])
            assert client.problem is not None and "stuck" in client.problem
            with pytest.raises(EngineUnavailableError):
                client.submit(GenerationRequest("late", [1], max_tokens=3))
            release.set()
            tokens, final = await stream.collect()
            assert isinstance(final, FinishEvent) and len(tokens.token_ids) == 3
            assert client.problem is None  # moving again
            assert len(fatal) == 1  # reported once
        finally:
            release.set()
            await client.shutdown("test over")

    asyncio.run(main())


@pytest.mark.parametrize(
    ("field", "request_kw"),
    [
        ("prompt", {"prompt_ids": [1, 64]}),
        ("prompt", {"prompt_ids": [-1]}),
        ("stop", {"stop_token_ids": [999999999]}),
        ("logit_bias", {"sampling": SamplingParams(logit_bias={999999999: 5.0})}),
        ("banned_tokens", {"sampling": SamplingParams(banned_token_ids=[3, -7])}),
        ("allowed_tokens", {"sampling": SamplingParams(allowed_token_ids=[64])}),
        ("negative_prompt", {"negative_prompt_ids": [70], "cfg_scale": 1.5}),
    ],
)
def test_token_ids_outside_the_vocabulary_are_refused_naming_field_and_id(
    field: str, request_kw: dict
) -> None:
    backend = FakeBackend()  # n_vocab 64

    async def main() -> None:
        client = EngineClient.start(backend, CONFIG)
        try:
            kw = {"prompt_ids": [1, 2], "max_tokens": 3, **request_kw}
            with pytest.raises(RequestError) as err:
                client.submit(GenerationRequest("r", **kw))
            assert err.value.status == 400 and err.value.param == field
            assert err.value.message.startswith(f"{field}: token id ")
            assert "(0..63)" in err.value.message
            _tokens, final = await client.submit(GenerationRequest("ok", [1, 2], max_tokens=3)).collect()
            assert isinstance(final, FinishEvent)
            assert backend.batches and all(t < 64 for b in backend.batches for r in b for t in r.tokens)
        finally:
            await client.shutdown("test over")

    asyncio.run(main())
