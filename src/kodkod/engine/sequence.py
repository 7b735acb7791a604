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
from typing import TYPE_CHECKING, Protocol

from kodkod.core.types import AdapterKey, Event, GenerationRequest, Usage
from kodkod.engine.backend import Sampler
from kodkod.engine.banned import BannedStringGuard, LoopDetector
from kodkod.engine.detokenizer import IncrementalDetokenizer
from kodkod.engine.speculative.state import SpecState
from kodkod.engine.stopping import StopStringMatcher

if TYPE_CHECKING:
    from kodkod.engine.group import SeqGroup


class EventSink(Protocol):
    """Receives a sequence's events on the engine thread (must not block)."""

    def push(self, event: Event) -> None: ...


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class SeqStats:
    """What a sequence's usage reports (timings and counts); written a few times per step."""

    arrival_s: float = field(default_factory=time.perf_counter)
    start_s: float = 0.0  # first admitted (set by Sequence's `status` setter): queue time ends
    first_token_s: float = 0.0  # 0.0: nothing sampled yet
    num_preemptions: int = 0
    drafted: int = 0  # speculative tokens drafted / accepted
    accepted: int = 0


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
    stats: SeqStats = field(default_factory=SeqStats)
    # output guards: banned strings (and the rewinds they cause), loops, token healing
    guard: BannedStringGuard | None = None
    bans: dict[int, set[int]] = field(default_factory=dict)  # output index → banned token ids
    rewinds: int = 0
    loops: LoopDetector | None = None
    strip_prefix: str = ""  # token healing: text of the removed prompt token, not re-emitted
    group: SeqGroup | None = None  # CFG pair (engine/group.py); None: a group of one
    adapter_key: AdapterKey = ()  # LoRA set it runs with (engine/adapters.py); () = base model
    spec: SpecState | None = None  # speculative decoding: how it drafts (engine/speculative/)

    @property
    def status(self) -> SeqStatus:
        return self._status

    @status.setter
    def status(self, value: SeqStatus) -> None:
        if value is SeqStatus.RUNNING and self.stats.start_s == 0.0:
            self.stats.start_s = time.perf_counter()  # the end of its time in the queue
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
        st = self.stats
        first = st.first_token_s or now
        return Usage(
            prompt_tokens=self.num_prompt,
            completion_tokens=self.num_output,
            cached_tokens=self.num_cached,
            prompt_time_s=max(0.0, first - st.arrival_s),
            queue_time_s=max(0.0, (st.start_s or first) - st.arrival_s),
            completion_time_s=max(0.0, now - first),
            drafted_tokens=st.drafted,
            accepted_draft_tokens=st.accepted,
        )

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
