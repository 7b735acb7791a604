"""Model lifetime (models/manager.py, models/lifetime.py, models/gate.py) over fake backends.

What users rely on: a model is never freed while a request holds a lease on it; an admin load
lets the running requests finish first (`skip_queue` does not wait); while a load or unload is
under way new requests are refused with NoModelLoaded (→ 503) instead of waiting; and a request
that outlives `unload_grace_s` does not block the swap — the old model is freed when it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kodkod.models.manager import ModelManager, NoModelLoaded
from kodkod.models.params import LoadPlan, ModelLoadParams
from kodkod.models.registry import ModelEntry
from tests.fakes import FakeBackend

DEADLINE_S = 10.0


async def until(cond: Callable[[], bool], what: str) -> None:
    """Poll `cond` until it holds (fails after DEADLINE_S)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Loader:
    """A backend loader handing out FakeBackends, remembered by model name."""

    def __init__(self) -> None:
        self.backends: dict[str, list[FakeBackend]] = {}

    def __call__(self, source: Any, make_config: Any, **_: Any) -> FakeBackend:
        backend = FakeBackend()
        if make_config is not None:
            make_config(backend.info)
        self.backends.setdefault(source.name, []).append(backend)
        return backend


def plan(tmp: Path, name: str) -> LoadPlan:
    gguf = tmp / f"{name}.gguf"
    gguf.write_bytes(b"")
    return LoadPlan(ModelEntry(name, gguf, None), ModelLoadParams(max_seq_len=128, n_threads=1))


def manager(tmp: Path, loader: Loader, grace_s: float) -> ModelManager:
    return ModelManager(loader, tmp / "templates", gpu_available=False, unload_grace_s=grace_s)


def test_load_waits_for_leased_requests_and_refuses_new_ones(tmp_path: Path) -> None:
    async def main() -> None:
        loader = Loader()
        mgr = manager(tmp_path, loader, grace_s=DEADLINE_S * 3)
        await mgr.load(plan(tmp_path, "a"))
        lease = await mgr.acquire(None, may_switch=False)
        old = loader.backends["a"][0]

        swap = asyncio.ensure_future(mgr.load(plan(tmp_path, "b")))
        await until(lambda: mgr.gate.refusal is not None, "the load to start")
        with pytest.raises(NoModelLoaded, match="'b' is being loaded"):
            await mgr.acquire(None, may_switch=False)  # refused at once, not queued
        assert not swap.done() and not old.closed  # waits for the leased request
        assert lease.model.tokenizer.tokenize("x", add_bos=False, parse_special=False)

        lease.release()
        loaded = await asyncio.wait_for(swap, DEADLINE_S)
        assert old.closed and loaded.name == "b" and mgr.gate.refusal is None
        (await mgr.acquire(None, may_switch=False)).release()  # served again
        await mgr.unload()

    asyncio.run(main())


def test_unload_never_frees_under_a_lease(tmp_path: Path) -> None:
    async def main() -> None:
        loader = Loader()
        mgr = manager(tmp_path, loader, grace_s=0.0)  # the swap does not wait at all
        await mgr.load(plan(tmp_path, "a"))
        lease = await mgr.acquire(None, may_switch=False)
        old = loader.backends["a"][0]

        assert await mgr.unload("bye")
        assert mgr.current is None and not old.closed  # still leased: freed later
        with pytest.raises(NoModelLoaded):
            await mgr.acquire(None, may_switch=False)
        await mgr.load(plan(tmp_path, "b"))  # the swap went on meanwhile
        assert not old.closed

        lease.release()
        await until(lambda: old.closed, "the old model to be freed after its last lease")
        assert not loader.backends["b"][0].closed
        await mgr.unload()
        assert loader.backends["b"][0].closed  # no lease: freed before unload() returns

    asyncio.run(main())


def test_skip_queue_does_not_wait_for_leases(tmp_path: Path) -> None:
    async def main() -> None:
        loader = Loader()
        mgr = manager(tmp_path, loader, grace_s=0.0)
        await mgr.load(plan(tmp_path, "a"))
        lease = await mgr.acquire(None, may_switch=False)
        old = loader.backends["a"][0]
        loaded = await asyncio.wait_for(mgr.load(plan(tmp_path, "b"), skip_queue=True), DEADLINE_S)
        assert loaded.name == "b" and not old.closed and not lease.model.engine.alive
        lease.release()
        await until(lambda: old.closed, "the old model to be freed after its last lease")
        await mgr.unload()

    asyncio.run(main())
