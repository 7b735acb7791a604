"""Adapter groups in the engine, on fakes: one LoRA set per decode (groups take turns), no
prefix reuse across sets, the set switched before each decode, requests resolved again after
a swap."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

from kodkod.core.backend_types import AdapterError, BackendCapabilities, BatchRow
from kodkod.core.types import (
    AdapterKey,
    ErrorEvent,
    ErrorKind,
    FinishEvent,
    GenerationRequest,
)
from kodkod.engine.adapters import pick_group
from kodkod.engine.client import EngineClient
from kodkod.engine.loop import EngineConfig
from kodkod.engine.scheduler import Scheduler, SchedulerConfig, StepKind
from tests.engine.test_scheduler import make_seq, run_step
from tests.fakes import FakeBackend

A: AdapterKey = ((1, 1.0),)
B: AdapterKey = ((2, 0.5),)


def keyed(rid: str, prompt: list[int], key: AdapterKey) -> Any:
    seq = make_seq(rid, prompt)
    seq.adapter_key = key
    return seq


def test_pick_group_takes_groups_in_turn() -> None:
    seqs = [keyed("a1", [1], A), keyed("b1", [1], B), keyed("n", [1], ()), keyed("a2", [1], A)]
    assert pick_group(seqs, None) == [seqs[2]]  # smallest key first: the base model
    assert pick_group(seqs, ()) == [seqs[0], seqs[3]]
    assert pick_group(seqs, A) == [seqs[1]]
    assert pick_group(seqs, B) == [seqs[2]]  # wraps around
    same = [keyed("x", [1], A), keyed("y", [1], A)]
    assert pick_group(same, B) == same


def test_decode_steps_hold_one_adapter_set_and_alternate() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=8, chunk_size=64), capacity=512, num_slots=8)
    seqs = [keyed("a1", [1, 2, 3], A), keyed("b1", [4, 5, 6], B), keyed("a2", [7, 8, 9], A)]
    for s in seqs:
        sched.add(s)
    groups = []
    for _ in range(12):
        plan = run_step(sched)
        if plan.kind is StepKind.DECODE:
            keys = {e.seq.adapter_key for e in plan.entries}
            assert len(keys) == 1
            groups.append(keys.pop())
    assert groups[:4] == [A, B, A, B]
    assert all(len([g for g in groups if g == k]) >= 2 for k in (A, B))


def test_prefixes_are_reused_only_under_the_same_adapters() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=4, chunk_size=64), capacity=512, num_slots=8)
    prompt = list(range(1, 30))
    first = keyed("first", prompt, A)
    sched.add(first)
    while first.num_computed < len(prompt):
        run_step(sched)
    sched.remove(first)  # its KV stays as a cached prefix computed with A
    other = keyed("other", prompt, B)
    sched.add(other)
    sched.schedule()
    assert other.num_cached == 0
    same = keyed("same", prompt, A)
    sched.add(same)
    sched.schedule()
    assert same.num_cached == len(prompt) - 1


@dataclass
class FakeHost:
    """Adapters as ids; the 'model' adds each adapter's id·3 to the next token."""

    loaded: dict[str, int]
    active: tuple[tuple[str, float], ...] = ()
    current: AdapterKey = ()
    source: Any = None

    def key_for(self, wanted: Seq[tuple[str, float]] | None) -> AdapterKey:
        items = self.active if wanted is None else wanted
        for name, _ in items:
            if name not in self.loaded:
                raise AdapterError(f"the LoRA adapter {name!r} is not loaded")
        return tuple(sorted((self.loaded[n], float(s)) for n, s in items if s))

    def use(self, key: AdapterKey) -> None:
        self.current = key

    def activate(self, items: Seq[tuple[str, Any, float]]) -> None:
        self.active = tuple((n, s) for n, _, s in items)

    def clear(self) -> None:
        self.loaded.clear()
        self.active = ()


class AdapterBackend(FakeBackend):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.adapters = FakeHost({"a": 1, "b": 2})
        self.capabilities = BackendCapabilities(adapters=self.adapters)
        self.batch_keys: list[AdapterKey] = []

    def next_token(self, t: int) -> int:
        shift = 3 * sum(uid for uid, _ in self.adapters.current)
        return (t + 1 + shift) % self.n_vocab

    def decode(self, rows: Seq[BatchRow]) -> list[list[int]]:
        self.batch_keys.append(self.adapters.current)
        return super().decode(rows)


def expected(start: int, shift: int, n: int) -> list[int]:
    out, t = [], start
    for _ in range(n):
        t = (t + 1 + shift) % 64
        out.append(t)
    return out


def run(body: Any, **kw: Any) -> Any:
    backend = AdapterBackend(**kw)

    async def main() -> Any:
        client = EngineClient.start(backend, EngineConfig(max_seq_len=200, max_batch_size=4, chunk_size=8))
        try:
            return await body(client, backend)
        finally:
            await client.shutdown("test over")

    return asyncio.run(main())


def test_concurrent_requests_with_different_adapters_each_get_their_own_output() -> None:
    async def body(client: EngineClient, backend: AdapterBackend) -> None:
        reqs = [
            GenerationRequest("a", [10, 11], max_tokens=8, adapters=(("a", 1.0),)),
            GenerationRequest("b", [10, 11], max_tokens=8, adapters=(("b", 1.0),)),
            GenerationRequest("base", [10, 11], max_tokens=8, adapters=()),
            GenerationRequest("zero", [10, 11], max_tokens=8, adapters=(("a", 0.0),)),
        ]
        results = await asyncio.gather(*(client.submit(r).collect() for r in reqs))
        for (tokens, final), shift in zip(results, (3, 6, 0, 0), strict=True):
            assert isinstance(final, FinishEvent)
            assert tokens.token_ids == expected(11, shift, 8)
        # every decode ran with one set; several sets were in use
        assert len(set(backend.batch_keys)) == 3

    run(body)


def test_unknown_adapter_is_a_bad_request() -> None:
    async def body(client: EngineClient, backend: AdapterBackend) -> None:
        req = GenerationRequest("x", [10, 11], max_tokens=4, adapters=(("missing", 1.0),))
        _, final = await client.submit(req).collect()
        assert isinstance(final, ErrorEvent) and final.kind is ErrorKind.BAD_REQUEST
        assert "missing" in final.message

    run(body)


def test_waiting_requests_follow_a_swap() -> None:
    """A request queued behind a LoRA swap runs with the new active set; one naming an
    adapter the swap freed ends with an error."""

    async def body(client: EngineClient, backend: AdapterBackend) -> None:
        long = client.submit(GenerationRequest("long", [10, 11], max_tokens=30))
        deadline = asyncio.get_running_loop().time() + 10
        while client.stats.running < 1:  # `long` is generating
            assert asyncio.get_running_loop().time() < deadline, client.stats
            await asyncio.sleep(0.005)

        def swap(b: Any) -> None:
            b.adapters.loaded.pop("b")
            b.adapters.activate([("a", None, 1.0)])

        swapped = asyncio.ensure_future(client.run_exclusive(swap))
        await asyncio.sleep(0)  # one turn of the loop: the swap's command is queued
        follows = client.submit(GenerationRequest("follows", [20, 21], max_tokens=4))
        names_b = client.submit(GenerationRequest("names_b", [20, 21], max_tokens=4, adapters=(("b", 1.0),)))
        (long_tokens, long_final), _ = await asyncio.gather(long.collect(), swapped)
        assert isinstance(long_final, FinishEvent)
        assert long_tokens.token_ids == expected(11, 0, 30)  # finished before the swap
        tokens, final = await follows.collect()
        assert isinstance(final, FinishEvent) and tokens.token_ids == expected(21, 3, 4)
        _, final = await names_b.collect()
        assert isinstance(final, ErrorEvent) and final.kind is ErrorKind.BAD_REQUEST

    run(body, delay_s=0.005)
