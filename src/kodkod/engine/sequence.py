"""One sequence being generated, and where its events go.

A sequence's `tokens` are its prompt followed by everything generated so far; `num_computed`
of them are in the KV cache. Every kind of work is the same idea — catch `num_computed` up to
`len(tokens)`: prefill computes a chunk of the prompt, decode computes the one token just
sampled, prefix reuse starts `num_computed` above zero, speculative verification computes the
sampled token plus drafted ones, and preemption sets it back to zero.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

from kodkod.core.types import AdapterKey, Event, GenerationRequest, Usage
from kodkod.engine.backend import Sampler
from kodkod.engine.banned import BannedStringGuard, LoopDetector
from kodkod.engine.detokenizer import IncrementalDetokenizer
from kodkod.engine.speculative.state import SpecState
from kodkod.engine.stopping import StopStringMatcher


class EventSink(Protocol):
    """Receives a sequence's events on the engine thread (must not block)."""

    def push(self, event: Event) -> None: ...


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    request: GenerationRequest
    sink: EventSink
    tokens: list[int]
    num_prompt: int
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    stop_ids: frozenset[int]  # EOS ids plus the request's stop token ids
    eos_ids: frozenset[int]
    max_len: int  # len(tokens) may not exceed this (prompt + max_tokens, capped by max_seq_len)
    _status: SeqStatus = field(default=SeqStatus.WAITING, init=False)
    slot: int = -1
    num_computed: int = 0
    num_cached: int = 0  # prompt tokens reused from the prefix cache
    sampler: Sampler | None = None
    arrival_s: float = field(default_factory=time.perf_counter)
    start_s: float = 0.0  # first admitted (set by the `status` setter)
    first_token_s: float = 0.0
    num_preemptions: int = 0
    drafted: int = 0
    accepted: int = 0
    guard: BannedStringGuard | None = None
    bans: dict[int, set[int]] = field(default_factory=dict)  # output index → banned token ids
    rewinds: int = 0
    loops: LoopDetector | None = None
    strip_prefix: str = ""  # token healing: text of the removed prompt token, not re-emitted
    partner: Sequence | None = None  # CFG: the negative-prompt sequence decoded alongside
    is_shadow: bool = False  # this is a CFG partner: decoded, never sampled
    adapter_key: AdapterKey = ()  # LoRA set it runs with (engine/adapters.py); () = base model
    spec: SpecState | None = None  # speculative decoding: how it drafts (engine/speculative/)

    @property
    def status(self) -> SeqStatus:
        return self._status

    @status.setter
    def status(self, value: SeqStatus) -> None:
        if value is SeqStatus.RUNNING and self.start_s == 0.0:
            self.start_s = time.perf_counter()  # the end of its time in the queue
        self._status = value

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    @property
    def in_prefill(self) -> bool:
        """More than the last sampled token is still to be computed."""
        return self.num_computed < len(self.tokens) - 1

    def usage(self) -> Usage:
        """Token counts and timings so far (the FinishEvent's usage)."""
        now = time.perf_counter()
        first = self.first_token_s or now
        return Usage(
            prompt_tokens=self.num_prompt,
            completion_tokens=self.num_output,
            cached_tokens=self.num_cached,
            prompt_time_s=max(0.0, first - self.arrival_s),
            queue_time_s=max(0.0, (self.start_s or first) - self.arrival_s),
            completion_time_s=max(0.0, now - first),
            drafted_tokens=self.drafted,
            accepted_draft_tokens=self.accepted,
        )

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
