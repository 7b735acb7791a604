"""The second prefix-cache tier: idle KV kept in host RAM instead of the live pool.

Why: llama.cpp's unified KV pool makes every decode attend over every occupied cell (masked
cells are skipped, but still visited), so idle cached prefixes slow down everyone who is
decoding (docs/measurements.md). So while anything runs, the scheduler keeps idle cached cells
under a small budget; prefixes pushed out are saved here (`llama_state_seq_get_data`) and,
when a later request shares them, restored into a free slot (`llama_state_seq_set_data`,
the same KV bytes) instead of being recomputed, which costs far more than saving and restoring.

Pure data: the scheduler decides what to offload and restore (ops in the plan), the engine
loop fills in and reads `data` when it replays those ops. Entries are evicted least recently
used to stay within `budget_bytes` (config `memory.sysmem_kv_cache`, in MB).
"""

from __future__ import annotations

from dataclasses import dataclass

from kodkod.engine.kv import common_prefix_len

MIN_TOKENS = 64  # shorter prefixes are cheaper to recompute than to keep


@dataclass(eq=False, slots=True)
class HostEntry:
    tokens: list[int]
    adapter_key: tuple = ()
    data: bytearray | None = None  # filled by the engine loop when the Offload op runs
    last_used: int = 0


class HostPrefixCache:
    __slots__ = ("budget_bytes", "entries", "bytes_used", "restores", "saves", "_clock")

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.entries: list[HostEntry] = []
        self.bytes_used = 0
        self.restores = 0
        self.saves = 0  # prefixes saved to host RAM
        self._clock = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def best_match(self, tokens: list[int], limit: int, adapter_key: tuple) -> tuple[HostEntry, int] | None:
        best: tuple[HostEntry, int] | None = None
        target = tokens[:limit]
        for e in self.entries:
            if e.adapter_key != adapter_key:
                continue
            n = common_prefix_len(e.tokens, target)
            if n > 0 and (best is None or n > best[1]):
                best = (e, n)
        return best

    def offer(self, tokens: list[int], adapter_key: tuple) -> HostEntry | None:
        """A new entry for an evicted prefix, or None when the tier already holds it."""
        if len(tokens) < MIN_TOKENS or self.budget_bytes <= 0:
            return None
        for e in list(self.entries):
            if e.adapter_key != adapter_key:
                continue
            shared = common_prefix_len(e.tokens, tokens)
            if shared == len(tokens):
                e.last_used = self._tick()
                return None  # already covered by a longer (or equal) entry
            if shared == len(e.tokens):
                self._drop(e)  # the new entry covers this one
        entry = HostEntry(list(tokens), adapter_key, None, self._tick())
        self.entries.append(entry)
        return entry

    def stored(self, entry: HostEntry, data: bytearray) -> None:
        """The engine saved `entry`'s KV: account for it and keep within the budget."""
        entry.data = data
        self.saves += 1
        if entry not in self.entries:  # superseded by a longer entry meanwhile
            return
        self.bytes_used += len(data)
        while self.bytes_used > self.budget_bytes and len(self.entries) > 1:
            victim = min((e for e in self.entries if e is not entry), key=lambda e: e.last_used)
            self._drop(victim)
        if self.bytes_used > self.budget_bytes:
            self._drop(entry)  # larger than the whole budget

    def used(self, entry: HostEntry) -> None:
        entry.last_used = self._tick()
        self.restores += 1

    def _drop(self, entry: HostEntry) -> None:
        if entry in self.entries:
            self.entries.remove(entry)
            if entry.data is not None:
                self.bytes_used -= len(entry.data)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes_used = 0
