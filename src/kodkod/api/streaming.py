"""The stream-until-done loop shared by the OpenAI and Kobold generation endpoints.

`event_stream(streams, surface, ping_s)` is the whole streamed answer of a generation: it reads
the engine streams of every choice (`fan_in`: merged event batches, one choice at a time),
asks the surface for the frames of each event, sends an SSE comment (`: ping`) whenever
nothing arrived for `ping_s`, and ends after the last choice finished — or at the first error
event, which the surface frames in its own shape. What differs per API is only the
`StreamSurface`: the frames before the first event, for a token, for a finish, for an error,
and after the last finish (OpenAI: usage chunk and `[DONE]`; Kobold: nothing).

Disconnects: Starlette cancels the body when the client goes away, and the response always
runs its cleanup when it ends — closing every engine stream (which aborts a running request
within one engine step) and the caller's `on_end` — also when the client was gone before the
body ever started, where a generator's own `finally` would never run.
Non-streamed answers wait with `until_done` (`collect` for a list of choices), which polls for
a disconnect meanwhile, aborts the work and answers a vanished client with 422.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Protocol, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kodkod.api.errors import ApiError
from kodkod.api.generation import SSE_HEADERS, error_for, fan_in, sse_ping
from kodkod.core.types import ErrorEvent, FinishEvent, TokenEvent
from kodkod.engine.stream import RequestStream

T = TypeVar("T")

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


class StreamSurface(Protocol):
    """How one API frames a streamed generation (`index` is the choice)."""

    def opening(self) -> Iterable[str]:
        """Frames before any engine event (role chunks, echoed prompts)."""
        ...

    def on_token(self, index: int, ev: TokenEvent) -> Iterable[str]: ...

    def on_finish(self, index: int, ev: FinishEvent) -> Iterable[str]: ...

    def on_error(self, index: int, ev: ErrorEvent) -> str:
        """The error frame; the stream ends after it."""
        ...

    def closing(self) -> Iterable[str]:
        """Frames after every choice finished (not after an error)."""
        ...


async def stream_frames(
    streams: list[RequestStream], surface: StreamSurface, ping_s: float | None
) -> AsyncIterator[str]:
    """The frames of the whole answer (see the module docstring)."""
    for frame in surface.opening():
        yield frame
    async for index, events in fan_in(streams, ping_s):
        if index < 0:
            yield sse_ping()
            continue
        for ev in events:
            if isinstance(ev, TokenEvent):
                for frame in surface.on_token(index, ev):
                    yield frame
            elif isinstance(ev, FinishEvent):
                for frame in surface.on_finish(index, ev):
                    yield frame
            else:
                yield surface.on_error(index, ev)
                return
    for frame in surface.closing():
        yield frame


class EventStreamResponse(StreamingResponse):
    """An SSE response that always runs `cleanup` when it ends, however it ends."""

    def __init__(self, body: AsyncIterator[str], cleanup: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


def event_stream(
    streams: list[RequestStream],
    surface: StreamSurface,
    ping_s: float | None,
    on_end: Callable[[], None] | None = None,
) -> EventStreamResponse:
    """The streamed answer of a generation; the streams are closed (and `on_end` called) when
    the response ends."""

    def cleanup() -> None:
        for s in streams:
            s.close()  # aborts the engine request if it is still running
        if on_end is not None:
            on_end()

    return EventStreamResponse(stream_frames(streams, surface, ping_s), cleanup)


async def until_done(request: Request, work: Awaitable[T], poll_s: float = DISCONNECT_POLL_S) -> T:
    """`await work`, cancelling it and answering 422 if the client goes away meanwhile."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ApiError(422, "the request was cancelled by the client")
    finally:
        if not task.done():
            task.cancel()


async def collect(
    request: Request, streams: list[RequestStream], poll_s: float = DISCONNECT_POLL_S
) -> list[tuple[TokenEvent, FinishEvent]]:
    """Run every stream to the end; abort them all if the client goes away (→ 422); an error
    event of any choice is the answer's error."""
    try:
        results = await until_done(request, asyncio.gather(*(s.collect() for s in streams)), poll_s)
    finally:
        for s in streams:
            s.close()
    out: list[tuple[TokenEvent, FinishEvent]] = []
    for tokens, final in results:
        if isinstance(final, ErrorEvent):
            raise error_for(final)
        out.append((tokens, final))
    return out
