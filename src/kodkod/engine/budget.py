"""The busy budget: how many live KV cells idle cached prefixes may keep while anything runs.

llama.cpp visits every occupied cell on every decode, so idle prefixes slow running streams;
the scheduler trims them to this budget (LRU first) and pushes what it trims to the host-RAM
tier when there is one (`engine/scheduler.py`, `engine/host_cache.py`).
"""

from __future__ import annotations

# Each idle cell in the attention range adds to the cost of every decode step, so a pool full
# of idle prefixes slows running streams noticeably (docs/measurements.md). Trimming has a
# price too: prefixes pushed out must be restored or recomputed, and new sequences land in
# other cells, so the attention sums run in another order (results move in the last bits, like
# another batch shape would). The floor keeps small pools untrimmed, so their KV placement
# depends only on the requests.
MIN_BUSY_CACHE_CELLS = 2048
# With a host-RAM tier, keeping a prefix live is the worse deal: saving and restoring it is
# paid once per token, keeping N idle cells is paid on every decode step, so pushing it out
# wins after a few steps (docs/measurements.md).
HOST_BUSY_CACHE_CELLS = 0
HOST_MIN_GAIN = 32  # restore from host RAM only when it reuses this many more tokens


def busy_budget(capacity: int, host_tier: bool) -> int:
    """The default busy budget: none with a host-RAM tier to push prefixes out to; without
    one, 1/8 of the pool, at least MIN_BUSY_CACHE_CELLS (a dropped prefix must be recomputed,
    which costs as much as thousands of decode steps of keeping its cells)."""
    return HOST_BUSY_CACHE_CELLS if host_tier else max(capacity // 8, MIN_BUSY_CACHE_CELLS)
