"""The model gate: leases, serialised inline switches, epochs (no llama.cpp, fake models)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from kodkod.models.gate import Lease, ModelGate, SwitchRefused


class NoModel(Exception):
    pass


async def until(cond: Callable[[], object], what: str, timeout_s: float = 10.0) -> None:
    """Poll `cond` until it holds; fail after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


class Harness:
    """A gate over string "models" whose switches are counted and take a moment (or, when
    `proceed` is set, wait for it)."""

    def __init__(self, initial: str | None = "A") -> None:
        self.gate: ModelGate[str] = ModelGate(lambda m: m)
        self.gate.install(initial)
        self.entered: list[str] = []  # switches that have started
        self.switches: list[str] = []
        self.fail: set[str] = set()
        self.proceed: asyncio.Event | None = None

    def switcher(self, target: str):
        async def switch() -> None:
            assert self.gate.busy
            self.gate.install(None)
            self.entered.append(target)
            if self.proceed is not None:
                await self.proceed.wait()
            else:
                await asyncio.sleep(0.01)
            if target in self.fail:
                raise RuntimeError(f"cannot load {target}")
            self.switches.append(target)
            self.gate.install(target)

        return switch

    async def lease(self, want: str | None, may_switch: bool = True) -> Lease[str]:
        switch = self.switcher(want) if want is not None and may_switch else None
        return await self.gate.acquire(want, switch, NoModel)


def run(coro):
    return asyncio.run(coro)


def test_lease_and_release() -> None:
    async def main() -> None:
        h = Harness()
        lease = await h.lease(None)
        assert lease.model == "A" and h.gate.leases() == 1
        lease.release()
        lease.release()  # idempotent
        assert h.gate.leases() == 0
        h.gate.install(None)
        with pytest.raises(NoModel):
            await h.lease(None)

    run(main())


def test_switch_waits_for_leases_on_the_old_model() -> None:
    async def main() -> None:
        h = Harness()
        held = await h.lease("A")
        task = asyncio.create_task(h.lease("B"))
        await until(lambda: h.gate.pending_switch, "the switch to B to be elected")
        assert not task.done() and h.switches == []  # A is still in use
        late_a = asyncio.create_task(h.lease("A"))  # arrives after the switch was elected
        # One turn of the loop: the new waiter runs until it blocks (or is served).
        await asyncio.sleep(0)
        assert not late_a.done()
        held.release()
        b = await task
        assert b.model == "B" and h.switches == ["B"]
        await until(lambda: h.gate.pending_switch, "the switch back to A to be elected")
        assert not late_a.done()  # waits for B's lease
        b.release()
        a = await late_a
        assert a.model == "A" and h.switches == ["B", "A"]

    run(main())


def test_waiters_for_the_new_model_share_one_switch() -> None:
    async def main() -> None:
        h = Harness()
        tasks = [asyncio.create_task(h.lease(w)) for w in ("B", "B", "A", "B")]
        leases = await asyncio.gather(*tasks[:2], tasks[3])
        assert [x.model for x in leases] == ["B", "B", "B"] and h.switches == ["B"]
        for x in leases:
            x.release()
        a = await tasks[2]
        assert a.model == "A" and h.switches == ["B", "A"]

    run(main())


def test_refusal_and_failed_switch() -> None:
    async def main() -> None:
        h = Harness()
        with pytest.raises(SwitchRefused):
            await h.lease("B", may_switch=False)
        h.fail.add("B")
        with pytest.raises(RuntimeError, match="cannot load B"):
            await h.lease("B")
        assert h.gate.current is None and not h.gate.pending_switch
        with pytest.raises(NoModel):
            await h.lease(None)
        assert (await h.lease("A")).model == "A"

    run(main())


def test_any_model_waiter_waits_for_a_pending_switch() -> None:
    async def main() -> None:
        h = Harness(initial=None)
        h.proceed = asyncio.Event()
        switching = asyncio.create_task(h.lease("B"))
        await until(lambda: h.entered, "the switch to start")
        anyone = asyncio.create_task(h.lease(None))
        await asyncio.sleep(0)  # one turn of the loop: `anyone` runs until it blocks
        assert not anyone.done()
        h.proceed.set()
        assert (await switching).model == "B"
        assert (await anyone).model == "B"

    run(main())


def test_alternating_clients_never_interleave() -> None:
    """Two clients alternate between models; leases of different models never overlap."""

    async def main() -> None:
        h = Harness()
        active: dict[str, int] = {"A": 0, "B": 0}
        served: list[tuple[str, str]] = []
        rng = random.Random(7)

        async def client(first: str) -> None:
            names = [first, "B" if first == "A" else "A"] * 10
            for want in names:
                lease = await h.lease(want)
                assert lease.model == want
                other = "B" if want == "A" else "A"
                active[want] += 1
                assert active[other] == 0, "two models in use at once"
                served.append((want, lease.model))
                await asyncio.sleep(rng.random() * 0.005)
                active[want] -= 1
                lease.release()

        await asyncio.wait_for(asyncio.gather(client("A"), client("B"), client("A")), 30)
        assert len(served) == 60 and all(w == m for w, m in served)
        assert len(h.switches) <= 60

    run(main())


def test_a_cancelled_switcher_does_not_cancel_the_switch() -> None:
    async def main() -> None:
        h = Harness()
        h.proceed = asyncio.Event()
        task = asyncio.create_task(h.lease("B"))
        await until(lambda: h.entered, "the switch to start")  # inside the switch now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        h.proceed.set()
        async with h.gate.lock:  # the switch still finishes, holding the lock until done
            assert h.gate.current == "B" and h.switches == ["B"]
        assert (await h.lease(None)).model == "B"

    run(main())
