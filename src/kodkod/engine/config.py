"""`EngineConfig`: what an engine is built with (from the model's load parameters), and
`build_parts()`: the parts of its step, wired together."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kodkod.engine.backend import Backend
from kodkod.engine.host_cache import HostPrefixCache
from kodkod.engine.processor import OutputProcessor
from kodkod.engine.runner import ModelRunner
from kodkod.engine.scheduler import Scheduler, SchedulerConfig
from kodkod.engine.sequence import Sequence
from kodkod.engine.speculative.speculator import Speculator
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
    batch_invariant: bool = False  # prompts prefilled alone, never beside decode rows (scheduler.py)
    # llama.cpp's CPU flash attention over an unquantised KV cache (its tiled kernel can run):
    # decode steps in the shared pool stay under its row threshold (engine/decode_rows.py)
    tiled_attention: bool = True
    # seconds for step and decode timing (stats, speculation's cost measurements); tests
    # pass a fake clock that their fake backends advance by set costs
    clock: Callable[[], float] = time.perf_counter


@dataclass(frozen=True, slots=True)
class StepParts:
    """scheduler → (speculator) → runner → processor: one engine step."""

    sched: Scheduler
    spec: Speculator
    runner: ModelRunner
    processor: OutputProcessor


def build_parts(
    backend: Backend, config: EngineConfig, draft: Backend | None, fail: Callable[[Sequence, str], None]
) -> StepParts:
    """`draft`: the draft model's backend, or None; `fail(seq, message)` ends a sequence whose
    row cannot be decoded (the runner's fault isolation)."""
    if backend.slot_cells and config.max_seq_len > backend.slot_cells:
        raise ValueError(
            f"max_seq_len {config.max_seq_len} exceeds the {backend.slot_cells} KV cells of each "
            "slot's own stream (per-slot KV layout)"
        )
    spec = Speculator(config.speculative, draft, backend.num_slots, config.clock)
    host = HostPrefixCache(config.host_cache_bytes) if config.host_cache_bytes > 0 else None
    sched = Scheduler(
        SchedulerConfig(
            config.max_batch_size,
            config.chunk_size,
            busy_cache_cells=config.busy_cache_cells,
            batch_invariant=config.batch_invariant,
            tiled_attention=config.tiled_attention,
        ),
        backend.kv_capacity,
        backend.num_slots,
        host,
        backend.slot_cells,
    )
    runner = ModelRunner(backend, host, spec, fail, sched.flush, config.clock)
    return StepParts(sched, spec, runner, OutputProcessor(backend, sched, spec))
