"""KV use as `/metrics` reports it: cells a running request holds, with idle cached prefixes
counted as free even when a running sequence shares part of them."""

from __future__ import annotations

from kodkod.api.metrics.collector import kv_usage_fraction
from kodkod.engine.kv import KVPool, SlotState, SlotTable
from kodkod.engine.stats import EngineStats


def test_cells_shared_with_a_running_sequence_are_not_idle() -> None:
    pool = KVPool(capacity=100, num_slots=3)
    table = SlotTable(pool, 3)
    pool.append(0, 40)  # a finished request's prompt, cached
    table.slots[0].state = SlotState.CACHED
    pool.copy_prefix(0, 1, 30)  # a running request reuses 30 of its cells …
    pool.append(1, 5)  # … and computed 5 more
    table.slots[1].state = SlotState.ACTIVE
    assert table.num_cached_tokens == 40
    assert table.num_idle_cells == 10  # only the 10 cells nobody running holds
    stats = EngineStats(
        cached_tokens=table.num_cached_tokens,
        idle_cells=table.num_idle_cells,
        free_cells=pool.free_cells,
        kv_capacity=pool.capacity,
    )
    assert pool.free_cells == 55
    assert kv_usage_fraction(stats) == 0.35  # 30 shared + 5 own cells of 100
    pool.truncate(1, 0)  # the request ends: its cells go, the cached prefix stays
    table.slots[1].state = SlotState.FREE
    idle = EngineStats(idle_cells=table.num_idle_cells, free_cells=pool.free_cells, kv_capacity=100)
    assert kv_usage_fraction(idle) == 0.0
