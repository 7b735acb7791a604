"""The engine's live state per sequence (`GET /slots`), taken on the engine thread on request.

Another thread asks with `SlotsProbe.ask()` (a Future) and wakes the engine with any command;
the engine answers pending asks when it next publishes its stats (`engine/stats.py`
`snapshot`), so the sequences, slots and host tier are read by the thread that owns them and
the hot loop pays one attribute read per publish when nobody asks. Prompt token ids are copied
only when an ask wants them (the API shows prompt text only when `logging.log_prompt` is on).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kodkod.engine.group import mains
from kodkod.engine.kv import SlotState

if TYPE_CHECKING:
    from kodkod.engine.backend import Backend
    from kodkod.engine.scheduler import Scheduler
    from kodkod.engine.sequence import Sequence


@dataclass(frozen=True, slots=True)
class SequenceView:
    request_id: str
    state: str  # "running" | "waiting"
    slot: int  # -1 while waiting
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int  # prompt tokens reused from the prefix cache
    computed_tokens: int  # tokens in the KV cache
    age_s: float  # since the request reached the engine
    drafted_tokens: int
    accepted_draft_tokens: int
    preemptions: int
    prompt_ids: tuple[int, ...] | None = None  # only when asked for

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_draft_tokens / self.drafted_tokens if self.drafted_tokens else None


@dataclass(frozen=True, slots=True)
class CachedPrefixView:
    slot: int
    tokens: int  # cells its KV holds


@dataclass(frozen=True, slots=True)
class EngineSlots:
    """What the engine holds right now."""

    sequences: tuple[SequenceView, ...]
    cached_prefixes: tuple[CachedPrefixView, ...]
    kv_capacity: int  # cells
    kv_free_cells: int
    num_slots: int
    host_cache_entries: int
    host_cache_bytes: int
    host_cache_budget_bytes: int

    @property
    def kv_used_cells(self) -> int:
        return self.kv_capacity - self.kv_free_cells


def _view(seq: Sequence, now_s: float, with_prompt: bool) -> SequenceView:
    return SequenceView(
        request_id=seq.request_id,
        state=seq.status.value,
        slot=seq.slot,
        prompt_tokens=seq.num_prompt,
        generated_tokens=seq.num_output,
        cached_tokens=seq.num_cached,
        computed_tokens=seq.num_computed,
        age_s=max(0.0, now_s - seq.stats.arrival_s),
        drafted_tokens=seq.stats.drafted,
        accepted_draft_tokens=seq.stats.accepted,
        preemptions=seq.stats.num_preemptions,
        prompt_ids=tuple(seq.tokens[: seq.num_prompt]) if with_prompt else None,
    )


def take_slots(sched: Scheduler, backend: Backend, with_prompt: bool) -> EngineSlots:
    """The engine's state now (engine thread only). CFG partner sequences are left out."""
    now_s = time.perf_counter()
    seqs = [*sched.running, *sched.waiting]
    host = sched.host
    return EngineSlots(
        sequences=tuple(_view(s, now_s, with_prompt) for s in mains(seqs)),
        cached_prefixes=tuple(
            CachedPrefixView(s.index, sched.pool.length(s.index))
            for s in sched.slots.slots
            if s.state is SlotState.CACHED
        ),
        kv_capacity=backend.kv_capacity,
        kv_free_cells=sched.pool.free_cells,
        num_slots=backend.num_slots,
        host_cache_entries=len(host.entries) if host is not None else 0,
        host_cache_bytes=host.bytes_used if host is not None else 0,
        host_cache_budget_bytes=host.budget_bytes if host is not None else 0,
    )


class SlotsProbe:
    """Asks for an `EngineSlots` from any thread; the engine thread answers (`answer`)."""

    __slots__ = ("_lock", "_asks", "pending")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._asks: list[tuple[Future[EngineSlots], bool]] = []
        self.pending = False  # read by the engine thread at every publish: cheap when False

    def ask(self, with_prompt: bool) -> Future[EngineSlots]:
        fut: Future[EngineSlots] = Future()
        with self._lock:
            self._asks.append((fut, with_prompt))
            self.pending = True
        return fut

    def answer(self, sched: Scheduler, backend: Backend) -> None:
        """Engine thread: answer every pending ask."""
        with self._lock:
            asks, self._asks = self._asks, []
            self.pending = False
        plain: EngineSlots | None = None
        full: EngineSlots | None = None
        for fut, with_prompt in asks:
            if not fut.set_running_or_notify_cancel():  # the asker gave up
                continue
            try:
                if with_prompt:
                    full = full or take_slots(sched, backend, True)
                    fut.set_result(full)
                else:
                    plain = plain or take_slots(sched, backend, False)
                    fut.set_result(plain)
            except Exception as exc:  # never let a probe break the engine
                fut.set_exception(exc)

    def fail_all(self, message: str) -> None:
        with self._lock:
            asks, self._asks = self._asks, []
            self.pending = False
        for fut, _ in asks:
            if not fut.done():
                fut.set_exception(RuntimeError(message))
