"""Who may use the loaded model, and when it may be replaced: leases with serialised switching.

A request holds a `Lease` on the model it runs on until its HTTP exchange ends; a switch to
another model (inline loading) waits until no lease on the old model is left,
so requests in flight finish on the model they started on and nothing ever runs on the wrong
model. Leases are counted per *generation* (one per `install`), and the owner of a model frees
its native handles only once its generation has no lease left (`wait_released`,
`when_released`): a lease is the promise that the model's tokenizer, templates and engine stay
usable for the whole request. Every load, unload and switch holds `lock`, so they are
serialised; an administrative load or unload also sets a *refusal* (`refusing`), and while it
is set new requests are refused at once (503) instead of waiting (newer TabbyAPI versions
answer 503 until the new model is installed).

Waiters are served in epochs, which keeps switching both safe and cheap:

* While nothing is loading and no switch is pending, a request for the loaded model (or for
  "whatever is loaded") gets its lease at once.
* The oldest waiter that needs another model is *elected* to switch. From then on, requests
  for the current model that arrive later wait (so a stream of them cannot starve the switch);
  those that were already waiting still get their lease. When the old model's leases are all
  released, the elected waiter takes `lock` and switches.
* After a switch, every waiter for the new model gets its lease, and the oldest waiter for
  some other model is elected next — e.g. a request for the old model that arrived during the
  switch switches back once the new model's requests are done.

All state changes happen on the event loop without awaiting in between, so a check and the
wait that follows it cannot miss a wake-up (`_changed` is replaced on every notification).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

M = TypeVar("M")


def _consume(task: asyncio.Future[None]) -> None:
    """Retrieve a switch task's outcome (its waiter may be gone); the waiter re-raises it."""
    if not task.cancelled():
        task.exception()


class SwitchRefused(Exception):
    """The request names a model that is not loaded and may not switch to it."""


@dataclass(eq=False, slots=True)
class _Waiter:
    seq: int
    want: str | None  # model key, or None for whatever is loaded
    may_switch: bool


@dataclass(eq=False, slots=True)
class Lease(Generic[M]):
    """The right to run on `model` until `release()` (idempotent)."""

    model: M
    generation: int
    _on_release: Callable[[Lease[M]], None] = field(repr=False)
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._on_release(self)


class ModelGate(Generic[M]):
    def __init__(self, key_of: Callable[[M], str]) -> None:
        self.lock = asyncio.Lock()
        self._key_of = key_of
        self._current: M | None = None
        self._generation = 0
        self._leases: dict[int, int] = {}
        self._queue: list[_Waiter] = []
        self._designated: _Waiter | None = None
        self._barrier = 0  # waiters with seq >= barrier queue behind the designated switch
        self._next_seq = 0
        self._changed = asyncio.Event()
        self._refusal: str | None = None
        self._on_released: dict[int, list[Callable[[], None]]] = {}

    # -- state ------------------------------------------------------------------------------

    @property
    def current(self) -> M | None:
        return self._current

    @property
    def busy(self) -> bool:
        """A load, unload or switch is running."""
        return self.lock.locked()

    @property
    def pending_switch(self) -> bool:
        return self._designated is not None

    @property
    def generation(self) -> int:
        """The current model's generation (leases are counted per generation)."""
        return self._generation

    @property
    def refusal(self) -> str | None:
        """Why new requests are refused right now (an admin load or unload), or None."""
        return self._refusal

    def leases(self, generation: int | None = None) -> int:
        """Leases held on the current model (or on `generation`'s)."""
        return self._leases.get(self._generation if generation is None else generation, 0)

    @contextmanager
    def refusing(self, message: str) -> Iterator[None]:
        """Refuse new requests (acquire raises its `no_model()`) while the block runs."""
        self._refusal = message
        self._notify()
        try:
            yield
        finally:
            self._refusal = None
            self._notify()

    async def wait_released(self, generation: int, timeout_s: float | None = None) -> bool:
        """Wait until `generation` has no lease left; False if `timeout_s` ran out first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while self.leases(generation):
            changed = self._changed
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return not self.leases(generation)
        return True

    def when_released(self, generation: int, callback: Callable[[], None]) -> None:
        """Call `callback` (on the event loop) once `generation` has no lease left."""
        if not self.leases(generation):
            callback()
            return
        self._on_released.setdefault(generation, []).append(callback)

    def install(self, model: M | None) -> None:
        """Make `model` current (None: nothing loaded). Leases on the old one stay counted
        against the old generation and no longer block anything."""
        self._current = model
        self._generation += 1
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _matches(self, w: _Waiter, model: M | None) -> bool:
        if model is None:
            return False
        return w.want is None or w.want == self._key_of(model)

    def _elect(self) -> None:
        if self._designated is not None:
            return
        candidates = [
            w
            for w in self._queue
            if w.want is not None and w.may_switch and not self._matches(w, self._current)
        ]
        if candidates:
            self._designated = min(candidates, key=lambda w: w.seq)
            self._barrier = self._next_seq
            self._notify()

    def _grant(self) -> Lease[M]:
        assert self._current is not None
        gen = self._generation
        self._leases[gen] = self._leases.get(gen, 0) + 1
        return Lease(self._current, gen, self._release)

    def _release(self, lease: Lease[M]) -> None:
        left = self._leases.get(lease.generation, 0) - 1
        if left > 0:
            self._leases[lease.generation] = left
        else:
            self._leases.pop(lease.generation, None)
            for callback in self._on_released.pop(lease.generation, []):
                callback()
        self._notify()

    # -- operations -------------------------------------------------------------------------

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold `lock` for a load/unload/switch; waiters wait meanwhile."""
        async with self.lock:
            self._notify()
            try:
                yield
            finally:
                self._notify()
        self._elect()
        self._notify()

    async def acquire(
        self,
        want: str | None,
        switch: Callable[[], Awaitable[None]] | None,
        no_model: Callable[[], Exception],
    ) -> Lease[M]:
        """A lease on the model keyed `want` (None: whatever is loaded).

        `switch()` (called holding `lock`, once the old model's leases are released) makes
        `want` current; without it a request for another model raises SwitchRefused. With
        nothing loaded and nothing about to be, `no_model()` is raised.
        """
        w = _Waiter(self._next_seq, want, switch is not None)
        self._next_seq += 1
        self._queue.append(w)
        try:
            while True:
                changed = self._changed
                if self._refusal is not None:
                    raise no_model()
                if not self.lock.locked():
                    lease = await self._step(w, switch, no_model)
                    if lease is not None:
                        return lease
                    if self._changed is not changed:
                        continue  # the step changed something: look again at once
                await changed.wait()
        finally:
            self._queue.remove(w)
            if self._designated is w:
                self._designated = None
                self._elect()
            self._notify()

    async def _step(
        self,
        w: _Waiter,
        switch: Callable[[], Awaitable[None]] | None,
        no_model: Callable[[], Exception],
    ) -> Lease[M] | None:
        current = self._current
        designated = self._designated
        if self._matches(w, current) and (designated is None or designated is w or w.seq < self._barrier):
            return self._grant()
        if w.want is None:
            if current is None and designated is None:
                raise no_model()
            return None
        if switch is None:
            if designated is None or not self._matches(w, current):
                raise SwitchRefused(w.want)
            return None
        self._elect()
        if self._designated is w and self.leases() == 0:
            # Its own task, shielded: a waiter that goes away must not cancel a load halfway.
            task = asyncio.ensure_future(self._run_switch(w, switch))
            task.add_done_callback(_consume)
            await asyncio.shield(task)
        return None

    async def _run_switch(self, w: _Waiter, switch: Callable[[], Awaitable[None]]) -> None:
        async with self.exclusive():
            # Look again: an admin load may have got there first, or a waiter that was ahead
            # of the election may have taken a lease before this task got the lock.
            if not self._matches(w, self._current) and self.leases() == 0:
                await switch()
