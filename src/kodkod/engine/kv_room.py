"""Room in the KV cache for the scheduler: cached prefixes kept, evicted LRU, offered to the host tier.

`KVRoom` works on the scheduler's KV mirror (`KVPool`) and slot table and keeps the queue of
KV ops the scheduler's decisions cause (`ops`; the next plan carries them, `take_ops()`).
Every change to the mirror here is queued as the op that makes the same change on the backend:
cutting a slot (`truncate` → `Truncate`), and offering a cached prefix to the host-RAM tier
before it is cut (`offload` → `Offload`).

Idle cached prefixes slow every decode (llama.cpp visits every occupied cell), so while
anything runs they are kept under a budget (`busy_cache_cells`, see `engine/budget.py`); what
is pushed out goes to the host-RAM tier (`engine/host_cache.py`) when one is configured. With
that tier the budget is zero: nothing idle stays live while anything decodes. With per-slot KV
streams an idle stream is outside every other slot's attention: the budget is the whole pool,
and a sequence always fits its own stream (`make_room`).
"""

from __future__ import annotations

from kodkod.engine.budget import busy_budget
from kodkod.engine.host_cache import HostPrefixCache
from kodkod.engine.kv import KVPool, Slot, SlotState, SlotTable
from kodkod.engine.plan import KVOp, Offload, Truncate


class KVRoom:
    """The scheduler's cached prefixes: `busy_cache_cells` is the idle budget while anything
    runs (None in the config: `busy_budget()`), `evicted_since_compaction` counts evicted cells
    for `engine/compaction.py`."""

    def __init__(
        self, pool: KVPool, slots: SlotTable, host: HostPrefixCache | None, busy_cache_cells: int | None
    ) -> None:
        self.pool = pool
        self.slots = slots
        self.host = host
        self.busy_cache_cells = (
            pool.capacity  # per-slot streams: idle ones cost the running nothing
            if pool.per_slot
            else busy_cache_cells
            if busy_cache_cells is not None
            else busy_budget(pool.capacity, host is not None)
        )
        self.evicted_since_compaction = 0  # cells
        self.ops: list[KVOp] = []

    def take_ops(self) -> list[KVOp]:
        ops, self.ops = self.ops, []
        return ops

    def release(self, slot: int, *, keep: bool) -> None:
        """A sequence left `slot`: keep its computed cells as a cached prefix, or free it."""
        s = self.slots.slots[slot]
        if keep and self.pool.length(slot) > 0:
            s.state = SlotState.CACHED
            s.last_used = self.slots.tick()
        else:
            self.truncate(slot, 0)
            s.state = SlotState.FREE
            s.tokens = []

    def truncate(self, slot: int, length: int) -> None:
        if self.pool.length(slot) > length:
            self.pool.truncate(slot, length)
            self.ops.append(Truncate(slot, length))

    def offload(self, slot: Slot) -> int:
        """Offer a cached slot's prefix to the host tier (before it is cut); its length."""
        length = self.pool.length(slot.index)
        if self.host is not None and length:
            entry = self.host.offer(slot.tokens[:length], slot.adapter_key)
            if entry is not None:
                self.ops.append(Offload(slot.index, entry))
        return length

    def evict(self, exclude: int = -1) -> bool:
        """Free the least recently used cached slot (not `exclude`); False: none is cached."""
        victim = self.slots.lru_cached(exclude)
        if victim is None:
            return False
        self.evicted_since_compaction += self.offload(victim)
        self.truncate(victim.index, 0)
        victim.state = SlotState.FREE
        victim.tokens = []
        return True

    def make_room(self, cells: int, exclude: int = -1) -> bool:
        """`cells` free cells in the pool, evicting cached prefixes LRU; False: not enough."""
        if self.pool.per_slot:
            return True  # a sequence fits its own stream (max_seq_len <= slot_cells)
        while self.pool.free_cells < cells:
            if not self.evict(exclude):
                return False
        return True

    def take_slot(self, exclude: int = -1) -> int | None:
        """A free slot, evicting the LRU cached one when none is free; None: every slot runs."""
        slot = self.slots.free_slot()
        if slot is None and self.evict(exclude):
            slot = self.slots.free_slot()
        return slot

    def clear_cache(self) -> None:
        """Drop every cached prefix (not running sequences), and the host tier."""
        host, self.host = self.host, None
        while self.evict():
            pass
        self.host = host
        if host is not None:
            host.clear()

    def trim_idle_cache(self) -> None:
        """While sequences run, keep idle cached cells within the busy budget (LRU first)."""
        budget = self.busy_cache_cells
        cached = self.slots.cached()
        if sum(self.pool.length(s.index) for s in cached) <= budget:
            return  # fast path: even counting shared cells it fits
        while cached and sum(self.pool.exclusive_cells(s.index) for s in cached) > budget:
            self.evict()
            cached = self.slots.cached()
