"""The engine wakes a consumer's event loop once per step, not once per stream or token.

Each wake-up is a `call_soon_threadsafe` (a self-pipe write that makes the loop's thread
runnable mid-step, competing with the engine for the GIL); `LoopWaker` gathers a step's
wake-ups into one, sent after the step's work. Counted here by wrapping the running loop's
`call_soon_threadsafe`, with fake backends (no model).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from kodkod.core.types import GenerationRequest
from kodkod.engine.client import EngineClient
from kodkod.engine.loop import EngineConfig
from kodkod.engine.stream import LoopWaker
from tests.fakes import FakeBackend


def test_held_marks_wake_the_loop_once_on_release() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        calls: list[Any] = []
        real = loop.call_soon_threadsafe

        def counting(cb: Any, *args: Any, **kw: Any) -> Any:
            calls.append(cb)
            return real(cb, *args, **kw)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        waker = LoopWaker(loop)
        events = [asyncio.Event() for _ in range(8)]

        def engine_step() -> None:  # what the engine thread does in one step
            waker.hold()
            for ev in events:
                waker.mark(ev)
            waker.release()

        t = threading.Thread(target=engine_step)
        t.start()
        t.join()
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in events)), 5)
        assert len(calls) == 1
        # not held: the first mark wakes at once, the next ones ride on the pending wake-up
        for ev in events:
            ev.clear()
        t = threading.Thread(target=lambda: [waker.mark(ev) for ev in events])
        t.start()
        t.join()
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in events)), 5)
        assert len(calls) == 2

    asyncio.run(main())


def test_eight_streams_cost_one_wake_up_per_step() -> None:
    async def main() -> tuple[int, int, list[int]]:
        loop = asyncio.get_running_loop()
        wakes = [0]
        real = loop.call_soon_threadsafe

        def counting(cb: Any, *args: Any, **kw: Any) -> Any:
            wakes[0] += 1
            return real(cb, *args, **kw)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        backend = FakeBackend(kv_capacity=2048, script={62: 1}, delay_s=0.002)  # the consumer keeps up
        client = EngineClient.start(backend, EngineConfig(512, 8, 64))
        try:
            reqs = [GenerationRequest(f"r{i}", [1 + 5 * i], max_tokens=60) for i in range(8)]
            results = await asyncio.gather(*(client.submit(r).collect() for r in reqs))
            deadline = loop.time() + 10
            while (s := client.stats).running or s.generated_tokens < 480:
                assert loop.time() < deadline, "stats never caught up"
                await asyncio.sleep(0.01)
            return wakes[0], s.steps, [len(t.token_ids) for t, _ in results]
        finally:
            await client.shutdown("test over")

    wakes, steps, lengths = asyncio.run(main())
    assert lengths == [60] * 8
    # 480 tokens in ~60 steps: without gathering, up to 8 wake-ups per step
    assert wakes <= steps + 4, (wakes, steps)
