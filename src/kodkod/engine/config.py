"""`EngineConfig`: what an engine is built with (from the model's load parameters)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kodkod.engine.speculative.state import SpecConfig


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_seq_len: int
    max_batch_size: int
    chunk_size: int
    speculative: SpecConfig = field(default_factory=SpecConfig)  # drafting (engine/speculative/)
    host_cache_bytes: int = 0  # second prefix-cache tier in host RAM (0: off)
    busy_cache_cells: int | None = None  # idle live cells while running (engine/budget.py)
    stall_timeout_s: float = 300.0  # one step taking longer is reported as stuck (problem())
