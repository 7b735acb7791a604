"""`SchedulerConfig`: what the scheduler (`engine/scheduler.py`) is built with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch_size: int
    chunk_size: int
    min_shared_prefix: int = 16  # tokens of common prompt worth waiting for
    # While anything runs, idle cached prefixes may occupy at most this many live cells (they
    # slow every decode down); the rest go to the host-RAM tier or are dropped. None: see
    # `busy_budget()`.
    busy_cache_cells: int | None = None
    # Prefill each prompt alone and never beside decode rows, so a request's output does not
    # depend on its neighbours (slower under concurrency); else steps mix them.
    batch_invariant: bool = False
    # llama.cpp's CPU flash attention can run its tiled kernel (unquantised KV): in the shared
    # pool a step then holds at most DECODE_MAX_ROWS decode rows (engine/decode_rows.py)
    tiled_attention: bool = False
