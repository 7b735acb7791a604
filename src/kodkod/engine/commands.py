"""Commands other threads put on the engine thread's queue (see `engine/loop.py`)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from kodkod.core.types import GenerationRequest
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
