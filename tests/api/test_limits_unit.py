"""Bounds without a model: stop/banned matching work, stalled readers, the in-flight count,
request-limit validation and the settings section."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from kodkod.api.errors import ApiError
from kodkod.api.validation import check_choices, check_generation_limits
from kodkod.core.types import (
    EosReason,
    ErrorEvent,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    TokenEvent,
    Usage,
)
from kodkod.engine import stream as stream_mod
from kodkod.engine.banned import BannedStringGuard
from kodkod.engine.client import EngineClient
from kodkod.engine.loop import EngineConfig
from kodkod.engine.stopping import StopStringMatcher, partial_match_len
from kodkod.engine.stream import RequestStream
from kodkod.settings import LimitsSettings, Settings
from tests.fakes import FakeBackend

# -- stop / banned strings ---------------------------------------------------------------------


def naive_partial(text: str, needles: list[str]) -> int:
    best = 0
    for needle in needles:
        for n in range(1, len(needle)):
            if n <= len(text) and text.endswith(needle[:n]):
                best = max(best, n)
    return best


def naive_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Everything before the first stop string (by end position, then start), whole text."""
    best: tuple[int, int, str] | None = None
    for s in stops:
        i = text.find(s)
        if i != -1 and (best is None or (i + len(s), i) < best[:2]):
            best = (i + len(s), i, s)
    return (text, None) if best is None else (text[: best[1]], best[2])


def test_partial_match_len_agrees_with_the_naive_definition() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        needles = [
            "".join(rng.choice("ab") for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(1, 4))
        ]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        max_len = max(len(n) for n in needles)
        assert partial_match_len(text, needles, max_len) == naive_partial(text, needles), (text, needles)


class RecordingStr(str):
    """A str that records how it is indexed (to show only the tail is read)."""

    keys: list[Any]

    def __getitem__(self, key: Any) -> str:
        self.keys.append(key)
        return str.__getitem__(self, key)


def test_partial_match_looks_only_at_the_tail_of_a_long_text() -> None:
    text = RecordingStr("x" * 1_000_000 + "sto")
    text.keys = []
    assert partial_match_len(text, ["stop", "halt"], 4) == 3
    assert text.keys == [slice(-3, None, None)]  # one tail slice of max_len - 1 characters


def test_stop_matcher_streams_like_the_naive_matcher_and_holds_little() -> None:
    rng = random.Random(11)
    for _ in range(1500):
        stops = [
            "".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))
        ]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 40)))
        m = StopStringMatcher(stops)
        out, hit, i = [], None, 0
        while i < len(text) and hit is None:
            piece = text[i : i + rng.randint(1, 4)]
            i += len(piece)
            emitted, hit = m.feed(piece)
            out.append(emitted)
            if hit is None:
                # held text is bounded by the longest stop string, not by the text so far
                assert len(m._held) < max(len(s) for s in stops)
        if hit is None:
            out.append(m.flush())
        got = "".join(out)
        want_text, want_hit = naive_stop(text, stops)
        if hit is None:
            assert want_hit is None and got == text
        else:
            # the text up to the stop string, which is where it occurs; no stop string in it
            assert hit in stops and text.startswith(got + hit)
            assert not any(s in got for s in stops)
            assert want_hit is not None and len(got) <= len(want_text)


def test_long_generation_with_many_long_stop_strings_keeps_the_buffer_small() -> None:
    stops = [("ab" * 500)[:999] + chr(0x4E00 + k) for k in range(64)]  # 64 × 1,000 chars
    m = StopStringMatcher(stops)
    released = 0
    for _ in range(5000):
        emitted, hit = m.feed("abababab")
        assert hit is None
        released += len(emitted)
        assert len(m._held) <= 999
    assert released + len(m.flush()) == 5000 * 8


def test_banned_guard_holds_a_bounded_tail_over_a_long_generation() -> None:
    guard = BannedStringGuard(["x" * 300 + "!"])
    released = 0
    for k in range(20_000):
        res = guard.feed(k, "xxxxx")
        assert res.rewind_to is None
        released += len(res.text)
        assert len(guard._held) <= 300 + 5
    assert released + len(guard.flush()) == 100_000


# -- stalled readers, the in-flight count -----------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_stream_aborts_when_output_sits_unread_past_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr(stream_mod.time, "monotonic", clock)
    aborted: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        s = RequestStream("r", loop, aborted.append, stall_timeout_s=60.0)
        s.push(TokenEvent("a", [1]))
        clock.now += 59.0
        s.push(TokenEvent("b", [2]))
        assert aborted == [] and not s.stalled  # under the timeout
        clock.now += 2.0
        s.push(TokenEvent("c", [3]))
        assert aborted == ["r"] and s.stalled  # the oldest unread event is 61 s old
        s.push(TokenEvent("d", [4]))
        assert aborted == ["r"]  # once
        s.push(FinishEvent(FinishReason.ABORT, EosReason.ABORTED, Usage(1, 4)))  # the abort
        events = [ev async for ev in s]  # a reader that comes back sees an error, not an end
        assert [type(ev) for ev in events] == [TokenEvent, ErrorEvent]
        assert events[0].text == "abc" and "unread" in events[1].message

    asyncio.run(main())


def test_a_reader_that_keeps_up_is_never_aborted_however_slow_the_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr(stream_mod.time, "monotonic", clock)
    aborted: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        s = RequestStream("r", loop, aborted.append, stall_timeout_s=60.0)
        batches = s.batches()
        for k in range(5):
            s.push(TokenEvent(str(k), [k]))
            assert (await anext(batches))[0].text == str(k)
            clock.now += 600.0  # a long prefill between tokens: nothing waits unread
        s.push(FinishEvent(FinishReason.LENGTH, EosReason.MAX_NEW_TOKENS, Usage(1, 5)))
        assert isinstance((await anext(batches))[-1], FinishEvent)
        assert aborted == []

    asyncio.run(main())


def test_in_flight_counts_every_request_until_it_ends() -> None:
    async def main() -> None:
        client = EngineClient.start(
            FakeBackend(delay_s=0.02), EngineConfig(max_seq_len=200, max_batch_size=2, chunk_size=8)
        )

        def long(rid: str) -> GenerationRequest:
            return GenerationRequest(rid, [1], max_tokens=190, ban_eos_token=True)

        try:
            done = client.submit(GenerationRequest("done", [1], max_tokens=2))
            closed = client.submit(long("closed"))
            third = client.submit(long("third"))
            assert client.in_flight == 3 and client.queued == 1
            await done.collect()  # ends when its finish event is pushed
            assert client.in_flight == 2
            closed.close()  # ends when its reader lets go
            assert client.in_flight == 1 and client.queued == 0
            third.close()
            assert client.in_flight == 0
        finally:
            await client.shutdown("test over")

    asyncio.run(main())


# -- request limits ----------------------------------------------------------------------------


def values(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "logprobs": 0,
        "top_logprobs": 0,
        "stop": [],
        "banned_strings": [],
        "dry_sequence_breakers": ["\n"],
    }
    return {**base, **kw}


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"logprobs": 21}, "logprobs"),
        ({"top_logprobs": 100000}, "top_logprobs"),
        ({"stop": ["s"] * 65}, "stop"),
        ({"stop": "x" * 1001}, "stop"),
        ({"banned_strings": ["b"] * 257}, "banned_strings"),
        ({"banned_strings": ["y" * 1001]}, "banned_strings"),
        ({"dry_sequence_breakers": ["z"] * 65}, "dry_sequence_breakers"),
    ],
)
def test_generation_limits_refuse_with_a_400_naming_the_field(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(ApiError) as exc:
        check_generation_limits(values(**kw), LimitsSettings())
    assert exc.value.status == 400 and exc.value.param == field


def test_generation_limits_accept_values_at_the_limit() -> None:
    check_generation_limits(
        values(logprobs=20, top_logprobs=20, stop=["s" * 1000] * 64, banned_strings=["b"] * 256),
        LimitsSettings(),
    )
    check_choices(128, LimitsSettings())
    with pytest.raises(ApiError) as exc:
        check_choices(129, LimitsSettings())
    assert exc.value.status == 400


def test_limits_section_defaults_and_validation() -> None:
    limits = Settings().limits
    assert limits.max_request_body_bytes == 16 * 1024 * 1024
    assert limits.max_waiting_requests == 512 and limits.max_logprobs == 20
    with pytest.raises(ValueError):
        Settings.model_validate({"limits": {"stalled_stream_timeout_s": 0}})
