"""Commands other threads send the engine thread (see `engine/loop.py`), and its mailbox.

The `Mailbox` queues commands until the engine closes it; from then on every command is answered
at once with the closing message (a submit gets an ErrorEvent, exclusive work and a shutdown their
future), and closing answers the commands still queued: nothing sent to a stopped engine waits.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from kodkod.core.types import ErrorEvent, ErrorKind, GenerationRequest
from kodkod.engine.backend import Backend
from kodkod.engine.sequence import EventSink


@dataclass(slots=True)
class Submit:
    request: GenerationRequest
    sink: EventSink


@dataclass(slots=True)
class Abort:
    request_id: str


@dataclass(slots=True)
class Exclusive:
    fn: Callable[[Backend], Any]
    cancel_running: bool
    future: Future


@dataclass(slots=True)
class Shutdown:
    message: str
    future: Future = field(default_factory=Future)


Command = Submit | Abort | Exclusive | Shutdown


def answer_closed(cmd: Command, message: str) -> None:
    """Answer a command the stopped engine will never handle."""
    if isinstance(cmd, Submit):
        cmd.sink.push(ErrorEvent(message, ErrorKind.UNLOADED))
    elif isinstance(cmd, Exclusive):
        cmd.future.set_exception(RuntimeError(message))
    elif isinstance(cmd, Shutdown):
        cmd.future.set_result(None)


class Mailbox:
    """The engine thread's command queue (any thread puts, the engine thread gets)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed: str | None = None  # set once the engine stops taking commands

    def put(self, cmd: Command) -> None:
        with self._lock:
            message = self._closed
            if message is None:
                self._queue.put(cmd)
                return
        answer_closed(cmd, message)

    def get(self, timeout_s: float) -> Command | None:
        """The next command, waiting up to `timeout_s` (0: none); None when there is none."""
        try:
            return self._queue.get(timeout=timeout_s) if timeout_s > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def close(self, message: str) -> None:
        """Stop taking commands; answer those still queued."""
        with self._lock:
            self._closed = message
        while (cmd := self.get(0)) is not None:
            answer_closed(cmd, message)
