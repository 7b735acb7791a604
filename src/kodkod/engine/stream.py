"""The bridge from the engine thread to one request's asyncio consumer.

The engine calls `push(event)` from its thread. Events collect in a small list under a lock,
and the consumer's event loop is woken with `call_soon_threadsafe` only when no wake-up is
already pending — so one wake-up per consumer turn, however fast tokens come. The consumer
takes everything pending at once and merges consecutive `TokenEvent`s: a slow reader gets
bigger pieces, never an unbounded queue, and never slows the engine.

A reader that stops reading altogether (an SSE client that keeps its connection open but no
longer reads: the socket fills and the response's send blocks) would hold its sequence and KV
until max_tokens. With `stall_timeout_s`, once output has sat unconsumed that long while the
engine keeps producing, the request is aborted (`on_close`), which frees its sequence, and an
error event is queued for the reader in case it ever resumes.
`on_end` is called exactly once, when the request ends (final event pushed, or closed).

`LoopWaker`: the wake-ups of every stream on one event loop, gathered per engine step. While
the engine holds it (`hold()`, around a step) pushes only mark their stream; `release()` wakes
the loop once for all of them. Each `call_soon_threadsafe` is a write to the loop's self-pipe
that makes the loop thread runnable, and on a machine with few cores that thread then competes
with the engine for the GIL in the middle of the step: one wake-up per step, after its work,
keeps the HTTP side's CPU off the decode's critical path (it runs while llama_decode has
released the GIL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from kodkod.core.types import ErrorEvent, ErrorKind, Event, FinishEvent, TokenEvent

log = logging.getLogger(__name__)


def merge_tokens(events: list[Event]) -> list[Event]:
    """Coalesce runs of TokenEvents into one (text, ids and logprobs concatenated)."""
    out: list[Event] = []
    for ev in events:
        prev = out[-1] if out else None
        if isinstance(ev, TokenEvent) and isinstance(prev, TokenEvent):
            logprobs = None
            if prev.logprobs is not None or ev.logprobs is not None:
                logprobs = (prev.logprobs or []) + (ev.logprobs or [])
            out[-1] = TokenEvent(prev.text + ev.text, prev.token_ids + ev.token_ids, logprobs)
        else:
            out.append(ev)
    return out


class LoopWaker:
    """Wakes the consumers of one event loop, at most once per engine step (see above).

    `hold`, `release` and `mark` are called on the engine thread; the loop runs `_fire`."""

    __slots__ = ("_loop", "_lock", "_marked", "_scheduled", "_held")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._marked: list[asyncio.Event] = []
        self._scheduled = False  # a _fire is queued on the loop
        self._held = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def hold(self) -> None:
        self._held = True

    def release(self) -> None:
        self._held = False
        with self._lock:
            if not self._marked or self._scheduled:
                return
            self._scheduled = True
        self._wake()

    def mark(self, ready: asyncio.Event) -> None:
        """Set `ready` on the loop: now, or when the engine releases its hold."""
        with self._lock:
            self._marked.append(ready)
            if self._held or self._scheduled:
                return
            self._scheduled = True
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        with self._lock:
            marked, self._marked = self._marked, []
            self._scheduled = False
        for ready in marked:
            ready.set()


class RequestStream:
    """Async iterator of a request's (merged) events; `push` is called from the engine thread."""

    __slots__ = (
        "request_id",
        "_loop",
        "_lock",
        "_pending",
        "_wake_pending",
        "_ready",
        "_done",
        "_on_close",
        "_taps",
        "_on_end",
        "_ended",
        "_stall_timeout_s",
        "_pending_since_s",
        "_stalled",
        "_waker",
    )

    def __init__(
        self,
        request_id: str,
        loop: asyncio.AbstractEventLoop,
        on_close: Callable[[str], None] | None = None,
        *,
        on_end: Callable[[str], None] | None = None,
        stall_timeout_s: float | None = None,
        waker: LoopWaker | None = None,
    ) -> None:
        """`waker`: wakes `loop` once per engine step for all its streams (None: each push
        that finds the consumer idle wakes the loop itself)."""
        self.request_id = request_id
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[Event] = []
        self._wake_pending = False
        self._ready = asyncio.Event()
        self._done = False
        self._on_close = on_close
        self._taps: tuple[Callable[[list[Event]], None], ...] = ()
        self._on_end = on_end
        self._ended = False
        self._stall_timeout_s = stall_timeout_s
        self._pending_since_s = 0.0  # when the oldest unconsumed event was pushed
        self._stalled = False
        self._waker = waker if waker is not None and waker.loop is loop else None

    # engine thread ---------------------------------------------------------------------------

    def push(self, event: Event) -> None:
        stalled = False
        with self._lock:
            if not self._pending:
                self._pending_since_s = time.monotonic()
            elif (
                self._stall_timeout_s is not None
                and not self._stalled
                and time.monotonic() - self._pending_since_s > self._stall_timeout_s
            ):
                self._stalled = stalled = True
            self._pending.append(event)
            if stalled:  # what a reader that comes back sees: no silent, normal-looking end
                self._pending.append(
                    ErrorEvent(
                        f"the request was aborted: its output went unread for over {self._stall_timeout_s} s",
                        ErrorKind.INTERNAL,
                    )
                )
            wake = not self._wake_pending
            self._wake_pending = True
        if stalled or isinstance(event, FinishEvent | ErrorEvent):
            self._end()
        if stalled:
            log.warning(
                "request %s: output unread for over %s s, aborting it", self.request_id, self._stall_timeout_s
            )
            if self._on_close is not None:
                self._on_close(self.request_id)
        if not wake:
            return
        if self._waker is not None:
            self._waker.mark(self._ready)
            return
        with contextlib.suppress(RuntimeError):  # the consumer's loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(self._ready.set)

    def _end(self) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        if self._on_end is not None:
            self._on_end(self.request_id)

    @property
    def stalled(self) -> bool:
        """True once the request was aborted because its output went unread."""
        return self._stalled

    # consumer side ---------------------------------------------------------------------------

    def _idle_timeout(self, fired: list[bool]) -> None:
        fired.append(True)
        self._ready.set()

    def _take(self) -> list[Event]:
        with self._lock:
            events, self._pending = self._pending, []
            self._wake_pending = False
        return events

    async def batches(self, idle_s: float | None = None) -> AsyncIterator[list[Event]]:
        """Yield lists of merged events until the finish or error event (inclusive).

        With `idle_s`, an empty list is yielded whenever nothing arrived for that long (the
        caller sends a keep-alive then).
        """
        try:
            while not self._done:
                events = self._take()
                if not events:
                    self._ready.clear()
                    if idle_s:
                        fired: list[bool] = []
                        timer = self._loop.call_later(idle_s, self._idle_timeout, fired)
                        await self._ready.wait()
                        timer.cancel()
                        events = self._take()
                        if not events:
                            if fired:
                                yield []
                            continue
                    else:
                        await self._ready.wait()
                        continue
                merged = merge_tokens(events)
                for i, ev in enumerate(merged):
                    if isinstance(ev, FinishEvent | ErrorEvent):  # the end: nothing after it
                        merged = merged[: i + 1]
                        self._done = True
                        break
                for tap in self._taps:
                    tap(merged)
                yield merged
        finally:
            self.close()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iter_events()

    async def _iter_events(self) -> AsyncIterator[Event]:
        async for batch in self.batches():
            for ev in batch:
                yield ev

    async def collect(self) -> tuple[TokenEvent, FinishEvent | ErrorEvent]:
        """Run to the end; return all output as one TokenEvent plus the final event."""
        text: list[str] = []
        ids: list[int] = []
        logprobs: list = []
        any_logprobs = False
        final: FinishEvent | ErrorEvent | None = None
        async for ev in self:
            if isinstance(ev, TokenEvent):
                text.append(ev.text)
                ids.extend(ev.token_ids)
                if ev.logprobs is not None:
                    any_logprobs = True
                    logprobs.extend(ev.logprobs)
            else:
                final = ev
        assert final is not None
        return TokenEvent("".join(text), ids, logprobs if any_logprobs else None), final

    def add_tap(self, tap: Callable[[list[Event]], None]) -> None:
        """Also hand every batch the consumer takes to `tap` (on the consumer's event loop;
        used by the request log and the metrics)."""
        self._taps = (*self._taps, tap)

    @property
    def finished(self) -> bool:
        return self._done

    def close(self) -> None:
        """Stop listening; an unfinished request is aborted in the engine."""
        if not self._done:
            self._done = True
            if self._on_close is not None:
                self._on_close(self.request_id)
        self._end()
