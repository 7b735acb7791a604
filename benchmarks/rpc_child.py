"""What the engine child process costs: decode steps in-process vs through `ChildBackend`.

    .venv/bin/python benchmarks/rpc_child.py [--tokens 128] [--runs 3] [--streams 1 4]

An RPC-backed model runs in an engine child process (`backends/rpc_child/`): every decode
and KV operation is a round trip over a Unix socket, and the logits rows the batch asked for
are copied into shared memory. This isolates that hop from the RPC workers' own cost: it loads
the default model on the local CPU twice in this process's view — once in-process
(`LlamaCppBackend`), once in a child (`ChildBackend` with no workers: the same child, only
without RPC devices) — and times greedy generation of `--tokens` tokens per stream, with
`--streams` sequences decoded in one batch per step, sampling in this process as the engine
does. Runs alternate between the two backends; the best of `--runs` is reported, with the
added time per decode step. It also times the bare round trip (a KV removal of an empty range,
median of 2000 calls), the floor of what each forwarded call costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from kodkod.backends.llamacpp.backend import LlamaCppBackend  # noqa: E402
from kodkod.backends.rpc_child.backend import ChildBackend  # noqa: E402
from kodkod.core.backend_types import BatchRow, ContextConfig, ModelInfo, ModelSource  # noqa: E402
from kodkod.core.types import SamplingParams  # noqa: E402
from tests.server import DEFAULT_GGUF  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper."


def run(backend: LlamaCppBackend | ChildBackend, streams: int, tokens: int) -> float:
    """Seconds per decode step of `streams` sequences over `tokens` steps (prefill excluded)."""
    backend.kv_clear()
    prompt = backend.tokenize(PROMPT, add_bos=True, parse_special=False)
    samplers = [backend.new_sampler(SamplingParams(temperature=0.0), prompt) for _ in range(streams)]
    idx = backend.decode([BatchRow(s, prompt, 0, 1) for s in range(streams)])
    pos = len(prompt)
    t0 = time.perf_counter()
    for _ in range(tokens):
        next_ids = [smp.sample(ix[0]) for smp, ix in zip(samplers, idx, strict=True)]
        idx = backend.decode([BatchRow(s, [t], pos, 1) for s, t in enumerate(next_ids)])
        pos += 1
    elapsed_s = time.perf_counter() - t0
    for smp in samplers:
        smp.close()
    return elapsed_s / tokens


def round_trip_s(backend: LlamaCppBackend | ChildBackend, calls: int = 2000) -> float:
    """Median seconds of one call that does (almost) nothing: removing positions past the end."""
    backend.kv_clear()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        backend.kv_remove(0, 0, -1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    ns = ap.parse_args()

    def config(_info: ModelInfo) -> ContextConfig:
        return ContextConfig(
            cache_size=4096, num_slots=max(ns.streams), batch_tokens=512, n_threads=ns.threads
        )

    local = LlamaCppBackend.load(ModelSource(DEFAULT_GGUF, "local"), config)
    child = ChildBackend.load(ModelSource(DEFAULT_GGUF, "child"), config)
    try:
        print(f"threads: {ns.threads}, {ns.tokens} steps, best of {ns.runs} (alternating)")
        rt_local, rt_child = round_trip_s(local), round_trip_s(child)
        print(f"bare call: in-process {rt_local * 1e6:.1f} us, child {rt_child * 1e6:.1f} us (median)")
        for streams in ns.streams:
            best = {"in-process": float("inf"), "child": float("inf")}
            for _ in range(ns.runs):
                best["in-process"] = min(best["in-process"], run(local, streams, ns.tokens))
                best["child"] = min(best["child"], run(child, streams, ns.tokens))
            a, b = best["in-process"], best["child"]
            print(
                f"{streams} stream(s): in-process {streams / a:7.1f} tokens/s, child "
                f"{streams / b:7.1f} tokens/s ({a / b:.2f}x), +{(b - a) * 1e3:.3f} ms per step"
            )
    finally:
        child.close()
        local.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
