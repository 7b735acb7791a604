"""The shared stream-until-done loop (kodkod.api.streaming) over real RequestStreams.

The engine is played by the test: it pushes events into the streams as the engine thread would.
What the OpenAI and Kobold endpoints rely on: frames come in event order with the surface's
shapes, the stream ends after the last finish (closing frames) or at the first error (the
surface's error frame, the other choices aborted), idle streams get keep-alive pings, the
response's cleanup aborts unfinished requests however the response ends — also when the client
was gone before the body started — and a non-streamed wait answers a vanished client with 422.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.requests import ClientDisconnect

from kodkod.api.errors import ApiError
from kodkod.api.streaming import collect, event_stream, stream_frames, until_done
from kodkod.core.types import (
    EosReason,
    ErrorEvent,
    ErrorKind,
    FinishEvent,
    FinishReason,
    TokenEvent,
    Usage,
)
from kodkod.engine.stream import RequestStream

DEADLINE_S = 10.0


class Surface:
    """Frames as readable strings."""

    def opening(self) -> Iterator[str]:
        yield "open"

    def on_token(self, index: int, ev: TokenEvent) -> Iterator[str]:
        yield f"{index}:{ev.text}"

    def on_finish(self, index: int, ev: FinishEvent) -> Iterator[str]:
        yield f"{index}:finish"

    def on_error(self, index: int, ev: ErrorEvent) -> str:
        return f"{index}:error:{ev.message}"

    def closing(self) -> Iterator[str]:
        yield "close"


def finish() -> FinishEvent:
    return FinishEvent(FinishReason.STOP, EosReason.STOP_TOKEN, Usage(1, 1))


def make_streams(n: int, aborted: list[str]) -> list[RequestStream]:
    loop = asyncio.get_running_loop()
    return [RequestStream(f"r{i}", loop, aborted.append) for i in range(n)]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, DEADLINE_S))


def test_frames_follow_the_events_and_close_after_the_last_finish() -> None:
    async def main() -> tuple[list[str], list[str]]:
        aborted: list[str] = []
        a, b = make_streams(2, aborted)
        a.push(TokenEvent("he", [1]))
        a.push(TokenEvent("llo", [2]))  # merged with "he": one frame
        a.push(finish())
        b.push(TokenEvent("x", [3]))
        b.push(finish())
        frames = [f async for f in stream_frames([a, b], Surface(), None)]
        return frames, aborted

    frames, aborted = run(main())
    assert frames[0] == "open" and frames[-1] == "close"
    body = frames[1:-1]
    assert sorted(body) == ["0:finish", "0:hello", "1:finish", "1:x"]
    assert body.index("0:hello") < body.index("0:finish")
    assert body.index("1:x") < body.index("1:finish")
    assert aborted == []  # finished requests are not aborted


def test_an_error_ends_the_stream_in_the_surface_shape_and_aborts_the_others() -> None:
    async def main() -> tuple[list[str], list[str]]:
        aborted: list[str] = []
        a, b = make_streams(2, aborted)
        a.push(TokenEvent("t", [1]))
        a.push(ErrorEvent("boom", ErrorKind.INTERNAL))
        frames = [f async for f in stream_frames([a, b], Surface(), None)]
        return frames, aborted

    frames, aborted = run(main())
    assert frames == ["open", "0:t", "0:error:boom"]  # no closing frames after an error
    assert aborted == ["r1"]  # the choice still running is stopped in the engine


def test_an_idle_stream_gets_keep_alive_pings() -> None:
    async def main() -> list[str]:
        (s,) = make_streams(1, [])
        frames = stream_frames([s], Surface(), 0.01)
        got = [await anext(frames), await anext(frames)]
        s.push(finish())
        got += [f async for f in frames]
        return got

    frames = run(main())
    assert frames[:2] == ["open", ": ping\n\n"]
    assert frames[-2:] == ["0:finish", "close"]


def test_cleanup_aborts_the_request_when_the_client_left_before_the_body_started() -> None:
    async def main() -> tuple[list[str], list[str]]:
        aborted: list[str] = []
        ended: list[str] = []
        streams = make_streams(2, aborted)
        response = event_stream(streams, Surface(), None, on_end=lambda: ended.append("end"))

        async def receive() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            raise OSError("the client is gone")

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "method": "POST",
            "path": "/",
            "headers": [],
        }
        with pytest.raises(ClientDisconnect):
            await response(scope, receive, send)
        return aborted, ended

    aborted, ended = run(main())
    assert sorted(aborted) == ["r0", "r1"]
    assert ended == ["end"]


class GoneClient:
    async def is_disconnected(self) -> bool:
        return True


def test_a_non_streamed_wait_answers_a_vanished_client_with_422_and_stops_the_work() -> None:
    async def main() -> bool:
        never = asyncio.get_running_loop().create_future()
        with pytest.raises(ApiError) as err:
            await until_done(GoneClient(), never, poll_s=0.01)  # type: ignore[arg-type]
        assert err.value.status == 422
        return never.cancelled()

    assert run(main())


def test_collect_aborts_every_choice_for_a_vanished_client() -> None:
    async def main() -> list[str]:
        aborted: list[str] = []
        streams = make_streams(2, aborted)
        streams[0].push(finish())
        with pytest.raises(ApiError):
            await collect(GoneClient(), streams, poll_s=0.01)  # type: ignore[arg-type]
        return aborted

    assert run(main()) == ["r1"]


def test_collect_reports_a_failed_choice_as_the_answer_error() -> None:
    class Here:
        async def is_disconnected(self) -> bool:
            return False

    async def main() -> None:
        a, b = make_streams(2, [])
        a.push(finish())
        b.push(ErrorEvent("too long", ErrorKind.CONTEXT_LENGTH))
        await collect(Here(), [a, b], poll_s=0.01)  # type: ignore[arg-type]

    with pytest.raises(ApiError) as err:
        run(main())
    assert err.value.status == 400 and "too long" in str(err.value)
