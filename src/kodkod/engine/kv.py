"""The engine's mirror of the backend's KV pool: cells, slots and the prefix cache.

llama.cpp's unified KV cache is a pool of cells; a cell holds one position of one or more
sequences, and is free when no sequence holds it. `seq_cp` makes the destination share the
source's cells (no copy), `seq_rm` drops a sequence from cells. `KVPool` keeps the same
ownership with virtual cell ids, so the scheduler knows exactly how many cells are free
without asking C, and can plan copies, rollbacks and evictions as pure data.

With per-slot KV streams (`slot_cells > 0`, the backend's `kv_unified` off) each slot owns
`slot_cells` cells of its own: a slot can never hold more, cells freed in one slot are no use
to another, and a prefix copied into another slot takes cells of its own there (a real copy,
nothing shared). `room(slot)` is what a slot may still take in either layout.

`SlotTable` tracks what each slot holds. A slot is FREE, ACTIVE (a running sequence's KV) or
CACHED (a finished sequence's KV kept for prefix reuse, evicted least-recently-used first).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class KVPool:
    """Exact cell accounting for a pool shared by slots, or for one stream of `slot_cells`
    cells per slot (counts only, no data)."""

    __slots__ = ("capacity", "slot_cells", "_refs", "_free", "_num_free", "_cells")

    def __init__(self, capacity: int, num_slots: int, slot_cells: int = 0) -> None:
        self.slot_cells = slot_cells
        if slot_cells > 0:  # stream i holds virtual cells [i * slot_cells, (i + 1) * slot_cells)
            capacity = slot_cells * num_slots
            self._free = [
                list(range((i + 1) * slot_cells - 1, i * slot_cells - 1, -1)) for i in range(num_slots)
            ]
        else:
            self._free = [list(range(capacity - 1, -1, -1))]
        self.capacity = capacity
        self._num_free = capacity
        self._refs = [0] * capacity
        self._cells: list[list[int]] = [[] for _ in range(num_slots)]

    @property
    def per_slot(self) -> bool:
        return self.slot_cells > 0

    @property
    def free_cells(self) -> int:
        """Free cells in all (per-slot streams: summed over the slots)."""
        return self._num_free

    def room(self, slot: int) -> int:
        """How many more cells `slot` could take now."""
        return len(self._free[slot if self.slot_cells else 0])

    def length(self, slot: int) -> int:
        return len(self._cells[slot])

    def append(self, slot: int, n: int) -> None:
        free = self._free[slot if self.slot_cells else 0]
        if n > len(free):
            raise MemoryError(f"KV pool: {n} cells wanted in slot {slot}, {len(free)} free")
        cells, refs = self._cells[slot], self._refs
        for _ in range(n):
            c = free.pop()
            refs[c] = 1
            cells.append(c)
        self._num_free -= n

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """dst (empty) holds the first n positions of src: sharing its cells in one pool, in
        cells of its own with per-slot streams."""
        assert not self._cells[dst], "copy into a non-empty slot"
        if self.slot_cells:
            self.append(dst, min(n, self.length(src)))
            return
        shared = self._cells[src][:n]
        refs = self._refs
        for c in shared:
            refs[c] += 1
        self._cells[dst] = shared

    def truncate(self, slot: int, n: int) -> None:
        """Keep the first n positions of `slot`, releasing the rest."""
        cells = self._cells[slot]
        if n >= len(cells):
            return
        refs, free = self._refs, self._free[slot if self.slot_cells else 0]
        for c in cells[n:]:
            refs[c] -= 1
            if refs[c] == 0:
                free.append(c)
                self._num_free += 1
        del cells[n:]

    def cells(self, slot: int) -> list[int]:
        """The slot's virtual cell ids by position (read-only: shared with the pool)."""
        return self._cells[slot]

    def exclusive_cells(self, slot: int) -> int:
        """Cells that would be freed if `slot` were cleared."""
        refs = self._refs
        return sum(1 for c in self._cells[slot] if refs[c] == 1)


class SlotState(enum.Enum):
    FREE = "free"
    ACTIVE = "active"
    CACHED = "cached"


@dataclass(slots=True)
class Slot:
    """A sequence slot. Its KV holds `tokens[:pool.length(index)]` (for an ACTIVE slot `tokens`
    is the running sequence's own list, which may already hold tokens not yet computed)."""

    index: int
    state: SlotState = SlotState.FREE
    tokens: list[int] = field(default_factory=list)
    last_used: int = 0
    adapter_key: tuple = ()  # LoRA set its KV was computed with (engine/adapters.py)


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists (slice compares run in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(slots=True)
class PrefixMatch:
    slot: int
    length: int


class SlotTable:
    """Slot states plus longest-prefix lookup and LRU eviction of cached prefixes."""

    __slots__ = ("slots", "pool", "_clock")

    def __init__(self, pool: KVPool, num_slots: int) -> None:
        self.slots = [Slot(i) for i in range(num_slots)]
        self.pool = pool
        self._clock = 0

    def tick(self) -> int:
        self._clock += 1
        return self._clock

    def free_slot(self) -> int | None:
        for s in self.slots:
            if s.state is SlotState.FREE:
                return s.index
        return None

    def cached(self) -> list[Slot]:
        return [s for s in self.slots if s.state is SlotState.CACHED]

    def lru_cached(self, exclude: int = -1) -> Slot | None:
        best: Slot | None = None
        for s in self.slots:
            if (
                s.state is SlotState.CACHED
                and s.index != exclude
                and (best is None or s.last_used < best.last_used)
            ):
                best = s
        return best

    def best_match(self, tokens: list[int], limit: int, adapter_key: tuple = ()) -> PrefixMatch | None:
        """The slot whose KV shares the longest prefix with tokens[:limit]; only slots computed
        with the same LoRA set count (other adapters give other KV for the same tokens)."""
        best: PrefixMatch | None = None
        target = tokens[:limit]
        for s in self.slots:
            valid = self.pool.length(s.index)
            if s.state is SlotState.FREE or valid == 0 or s.adapter_key != adapter_key:
                continue
            n = common_prefix_len(s.tokens[:valid], target)
            if n > 0 and (best is None or n > best.length):
                best = PrefixMatch(s.index, n)
        return best

    @property
    def num_cached_tokens(self) -> int:
        return sum(self.pool.length(s.index) for s in self.slots if s.state is SlotState.CACHED)

    @property
    def num_idle_cells(self) -> int:
        """Cells held by cached slots alone (not shared with a running sequence). A cell two
        cached slots share counts as held, so this errs towards less idle."""
        pool = self.pool
        return sum(pool.exclusive_cells(s.index) for s in self.slots if s.state is SlotState.CACHED)
