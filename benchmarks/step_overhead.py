"""Per-step engine work outside llama_decode, on the engine alone (no HTTP), with the real model.

    .venv/bin/python benchmarks/step_overhead.py [--streams 1 8] [--tokens 256] [--profile N]

Runs the engine (EngineClient on the llama.cpp backend, the default model, greedy, EOS banned)
with each number of concurrent streams and prints, per step:

* wall time outside `llama_decode` (the engine's own step_time_s − decode_time_s counters);
* the engine thread's CPU time outside `llama_decode` (`time.thread_time` around each step,
  minus the decode's own thread CPU) — what a profile attributes to Python, and the figure to
  trust on a loaded machine, where wall time also counts waiting for a core;
* with `--profile N`: the N functions with the most own time (cProfile of the engine thread).

The consumer is a plain asyncio task draining each request's events (what the HTTP side does
before it formats SSE), so this measures the engine and the bridge, not the HTTP server.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from kodkod.backends.llamacpp.backend import LlamaCppBackend  # noqa: E402
from kodkod.core.backend_types import ContextConfig, ModelSource  # noqa: E402
from kodkod.core.types import GenerationRequest, SamplingParams  # noqa: E402
from kodkod.engine.client import EngineClient  # noqa: E402
from kodkod.engine.loop import EngineConfig, EngineLoop  # noqa: E402
from kodkod.models.manager import available_threads  # noqa: E402
from tests.server import DEFAULT_GGUF  # noqa: E402

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
GREEDY = SamplingParams(temperature=0.0)
TOPICS = ["the sea", "a dragon", "robots", "a lighthouse", "winter", "a city", "a cat", "the moon"]


class TimedBackend:
    """The backend with its decode's wall and thread-CPU time added up."""

    def __init__(self, inner: LlamaCppBackend) -> None:
        self._inner = inner
        self.decode_cpu_s = 0.0

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def decode(self, rows):  # type: ignore[no-untyped-def]
        c0 = time.thread_time()
        try:
            return self._inner.decode(rows)
        finally:
            self.decode_cpu_s += time.thread_time() - c0


def run(backend: LlamaCppBackend, streams: int, tokens: int, profile: cProfile.Profile | None) -> dict:
    backend.kv_clear()  # each run's engine starts from an empty cache
    timed = TimedBackend(backend)
    step_cpu = [0.0]
    original = EngineLoop._step

    def step(self: EngineLoop) -> None:  # the engine thread's CPU per step
        c0 = time.thread_time()
        if profile is not None:
            profile.enable()
        try:
            original(self)
        finally:
            if profile is not None:
                profile.disable()
            step_cpu[0] += time.thread_time() - c0

    EngineLoop._step = step  # type: ignore[method-assign]
    try:

        async def main() -> dict:
            config = EngineConfig(4096, max(8, streams), 512)
            client = EngineClient.start(timed, config, None)  # type: ignore[arg-type]
            try:
                prompts = [
                    backend.tokenize(
                        CHAT.format(f"Write a long story about {TOPICS[i % 8]}."),
                        add_bos=False,
                        parse_special=True,
                    )
                    for i in range(streams)
                ]
                reqs = [
                    GenerationRequest(f"r{i}", p, GREEDY, max_tokens=tokens, ban_eos_token=True)
                    for i, p in enumerate(prompts)
                ]

                async def drain(r: GenerationRequest) -> int:
                    n = 0
                    async for _ev in client.submit(r):
                        n += 1
                    return n

                t0 = time.perf_counter()
                await asyncio.gather(*(drain(r) for r in reqs))
                wall = time.perf_counter() - t0
                deadline = time.monotonic() + 10
                while client.stats.running or client.stats.generated_tokens < streams * tokens:
                    assert time.monotonic() < deadline, "stats never caught up"
                    await asyncio.sleep(0.01)
                s = client.stats
                return {
                    "steps": s.steps,
                    "tok_s": streams * tokens / wall,
                    "wall_outside_ms": 1000 * (s.step_time_s - s.decode_time_s) / s.steps,
                    "cpu_outside_ms": 1000 * (step_cpu[0] - timed.decode_cpu_s) / s.steps,
                }
            finally:
                await client.shutdown("done")

        return asyncio.run(main())
    finally:
        EngineLoop._step = original  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0, help="print the top N functions by own time")
    args = ap.parse_args()
    threads = available_threads()
    backend = LlamaCppBackend.load(
        ModelSource(DEFAULT_GGUF, "default"),
        lambda info: ContextConfig(cache_size=8192, num_slots=64, batch_tokens=2048, n_threads=threads),
    )
    print(f"model {DEFAULT_GGUF.name}, {threads} threads, {args.tokens} tokens, {args.rounds} rounds")
    try:
        for n in args.streams:
            prof = cProfile.Profile() if args.profile else None
            res = [run(backend, n, args.tokens, prof) for _ in range(args.rounds)]
            med = sorted(res, key=lambda r: r["cpu_outside_ms"])[len(res) // 2]
            per_round = " ".join(f"{r['cpu_outside_ms']:.3f}" for r in res)
            print(
                f"{n} streams: {med['tok_s']:.1f} tok/s, {med['steps']} steps; outside llama_decode "
                f"per step: "
                f"wall {med['wall_outside_ms']:.3f} ms, engine-thread CPU {med['cpu_outside_ms']:.3f} ms "
                f"(CPU per round: {per_round})"
            )
            if prof is not None:
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.profile)
                print(out.getvalue())
    finally:
        backend.close()


if __name__ == "__main__":
    main()
