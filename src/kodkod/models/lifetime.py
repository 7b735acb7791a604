"""The end of a loaded model's life: wait for its generations, free it after its last lease.

A model is retired in three steps by the model manager (`models/manager.py`), holding the
gate's lock:

1. optionally `wait_for_generations`: until every lease on it is released. Once its engine has
   nothing left to compute, a lease that is still held belongs to a request that is between
   steps (tokenizing, compiling a grammar, sending its last chunks); it gets at most `grace_s`
   more, so a client that stopped reading cannot hold a swap forever;
2. the manager uninstalls it and stops its engine (running requests end with an error event);
3. `free_when_released`: frees its native handles in a worker thread once no lease is left —
   at once when the leases drain within `grace_s`, else when the last one is released (the
   swap goes on meanwhile). A handle is never freed under a lease.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from kodkod.engine.client import EngineClient
from kodkod.models.gate import ModelGate

log = logging.getLogger(__name__)

POLL_S = 0.05


class Retirable(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def engine(self) -> EngineClient: ...


M = TypeVar("M", bound=Retirable)


def _busy(engine: EngineClient) -> bool:
    stats = engine.stats
    return engine.alive and bool(stats.running or stats.waiting)


@dataclass(slots=True)
class Retirer(Generic[M]):
    gate: ModelGate[M]
    grace_s: float
    free: Callable[[M], None]  # blocking: frees a model's native handles (worker thread)
    _pending: set[asyncio.Future[None]] = field(default_factory=set)

    async def wait_for_generations(self, model: M, generation: int) -> None:
        """Until no lease on `generation` is left (see the module docstring for the bound)."""
        if self.gate.leases(generation):
            log.info("waiting for %d requests on %s to finish", self.gate.leases(generation), model.name)
        while self.gate.leases(generation):
            if _busy(model.engine):
                await self.gate.wait_released(generation, POLL_S)
                continue
            released = await self.gate.wait_released(generation, self.grace_s)
            if released or not _busy(model.engine):
                return

    async def free_when_released(self, model: M, generation: int) -> None:
        """Free `model` (already uninstalled, engine stopped) once `generation` has no lease."""
        if await self.gate.wait_released(generation, self.grace_s):
            await asyncio.to_thread(self.free, model)
            log.info("unloaded %s", model.name)
            return
        log.warning(
            "unloaded %s, but %d requests still use it: it is freed when the last one ends",
            model.name,
            self.gate.leases(generation),
        )
        self.gate.when_released(generation, lambda: self._free_later(model))

    def _free_later(self, model: M) -> None:
        task = asyncio.ensure_future(asyncio.to_thread(self.free, model))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        task.add_done_callback(lambda _: log.info("freed %s", model.name))
