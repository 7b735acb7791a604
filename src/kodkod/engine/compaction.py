"""Compacting the KV pool while the engine is idle.

llama.cpp attends over every cell up to the highest occupied one (`used_max_p1`), and this
version has no KV defragmentation. Evicting idle prefixes (the busy budget, pressure) leaves
holes below the prefixes that stay, so the attention range stays wide and every later decode
pays for it (docs/measurements.md). When nothing runs or waits and enough cells were evicted
since the last time, the scheduler first trims the idle cache to its busy budget (as the next
request would: pushed-out prefixes go to the host tier; a zero budget trims nothing here), then
the engine saves every cached slot (`llama_state_seq_get_data`), clears the pool, and restores
them from cell 0 up. Slots that shared a prefix share it again: a slot is restored whole, its
first `shared` positions dropped and taken from the slot it shares them with (`seq_cp`), so the
cell count — and the scheduler's `KVPool` mirror, which does not change — stay exactly as they
were.

Pools of up to `MIN_BUSY_CACHE_CELLS` are left alone, like the busy budget leaves them, and so
are per-slot KV streams (a stream's cells are attended by its own slot only; nothing to pack).
Any failure clears the whole cache (nothing is running, so nobody loses output). Cost: saving
and restoring every cached token, paid only at idle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from kodkod.engine.backend import Backend
from kodkod.engine.budget import MIN_BUSY_CACHE_CELLS
from kodkod.engine.kv import common_prefix_len
from kodkod.engine.scheduler import Scheduler

log = logging.getLogger(__name__)

COMPACT_AFTER_EVICTED = 512  # cells evicted since the last compaction before one is worth it


@dataclass(frozen=True, slots=True)
class Move:
    slot: int
    share_from: int  # a slot restored earlier whose first `shared` cells this slot shares; -1: none
    shared: int


def plan_compaction(sched: Scheduler) -> list[Move] | None:
    """The cached slots in restore order, or None when compaction is not due or not possible."""
    if sched.running or sched.waiting or sched.room.evicted_since_compaction < COMPACT_AFTER_EVICTED:
        return None
    if sched.pool.per_slot or sched.pool.capacity <= MIN_BUSY_CACHE_CELLS:
        return None  # small pools: little to gain, and KV placement stays request-determined
    if sched.room.busy_cache_cells > 0:
        sched.room.trim_idle_cache()  # what the next request would trim anyway: before packing, not after
    # (a zero budget — with a host tier — keeps live only what the next request adopts, which is
    # not known yet: pack every cached slot)
    sched.room.evicted_since_compaction = 0
    pool = sched.pool
    cached = sorted(sched.slots.cached(), key=lambda s: -pool.length(s.index))
    if not cached:
        return None
    moves: list[Move] = []
    for slot in cached:
        cells = pool.cells(slot.index)
        best = Move(slot.index, -1, 0)
        for done in moves:
            n = common_prefix_len(pool.cells(done.slot), cells)
            if n > best.shared:
                best = Move(slot.index, done.slot, n)
        moves.append(best)
    # a slot is restored whole before its shared part is dropped: that much must be free
    peak = max((m.shared for m in moves if m.shared < pool.length(m.slot)), default=0)
    if peak > pool.free_cells:
        return None
    return moves


def compact(backend: Backend, sched: Scheduler, moves: list[Move]) -> None:
    """Carry out a plan on the backend (raises on failure: the caller clears the cache)."""
    pool = sched.pool
    saved = {m.slot: backend.kv_save(m.slot) for m in moves if m.shared < pool.length(m.slot)}
    backend.kv_clear()
    for m in moves:
        if m.slot in saved:
            backend.kv_restore(m.slot, saved[m.slot])
            if m.shared:
                backend.kv_remove(m.slot, 0, m.shared)
        if m.shared:
            backend.kv_copy(m.share_from, m.slot, 0, m.shared)


def compact_if_due(
    backend: Backend, sched: Scheduler, sync: Callable[[], None], reset: Callable[[], None]
) -> bool:
    """Idle: compact when due (True: done). `sync()` first replays the scheduler's queued KV
    ops; on failure the prefix cache is cleared with `reset()`."""
    moves = plan_compaction(sched)
    if moves is None:
        return False
    sync()
    try:
        compact(backend, sched, moves)
    except Exception:
        log.exception("KV compaction failed; clearing the prefix cache")
        reset()
        return False
    return True
