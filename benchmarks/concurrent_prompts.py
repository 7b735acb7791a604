"""Many requests at once: batch-invariant steps (each prompt alone) vs mixed steps, in one run.

    .venv/bin/python benchmarks/concurrent_prompts.py [--clients 32] [--tokens 64] [--rounds 3]
        [--chunk-sizes 2048,512] [--threads 1]

kodkod servers run side by side on the same model and threads, one with
`model.batch_invariant: true` (each prompt prefilled alone, decode-only steps: the old
behaviour) and, for each `--chunk-sizes` value (the step's token budget), one with the default
(several prompts per step beside the decode rows). Each round sends a burst of `--clients`
streamed greedy requests with short, distinct prompts to each server in turn (each server goes
first in turn, and only one server works at a time), and measures per server:

- throughput: generated tokens / (last token - burst sent), and the rate while every stream
  is decoding (`window`, as `engine_throughput.py` measures its N streams);
- time to first token per request: p50, p99 and worst;
- the engine's prefill steps for the burst (from /health);
- the server process's CPU seconds for the burst (user + system, from /proc): tokens per
  CPU second is a throughput figure that other load on the machine disturbs less.

Prints medians over rounds and the ratios of each mixed server to the invariant one. Timings
are noisy on a shared 2-core machine: compare the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from engine_throughput import TOPICS, stream_completion, window_rate  # noqa: E402

from kodkod.models.manager import available_threads  # noqa: E402
from tests.server import KodkodServer, engine_stats  # noqa: E402

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def overlap(streams: list[list[tuple[float, int]]]) -> bool:
    """Every stream was decoding at some moment together (else there is no window)."""
    return max(ev[0][0] for ev in streams) < min(ev[-1][0] for ev in streams)


async def burst(server: KodkodServer, clients: int, tokens: int, salt: int) -> dict[str, float]:
    """`clients` concurrent streams with distinct prompts; throughput and TTFT figures."""
    prompts = [
        CHAT.format(f"{salt}-{i}. Tell me everything about {TOPICS[i % len(TOPICS)]}, in detail.")
        for i in range(clients)
    ]
    before = engine_stats(server)
    cpu0 = cpu_seconds(server.proc.pid)
    t0 = time.perf_counter()
    streams = await asyncio.gather(
        *(stream_completion(server.port, server.api_key, p, tokens) for p in prompts)
    )
    cpu_s = cpu_seconds(server.proc.pid) - cpu0
    after = engine_stats(server)
    ttft = [events[0][0] - t0 for events in streams]
    total = sum(len(events) for events in streams)
    end = max(events[-1][0] for events in streams)
    return {
        "total_rate": total / (end - t0),
        "cpu_rate": total / cpu_s,
        "window_rate": window_rate(streams) if overlap(streams) else 0.0,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": percentile(ttft, 0.99),
        "ttft_max_s": max(ttft),
        "prefill_steps": after["prefill_steps"] - before["prefill_steps"],
        "steps": after["steps"] - before["steps"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--chunk-sizes",
        default="2048",
        help="model.chunk_size of the mixed servers, comma-separated (one server each; the "
        "invariant server uses the first)",
    )
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0: every available core)")
    args = ap.parse_args()
    threads = args.threads or available_threads()
    chunks = [int(x) for x in args.chunk_sizes.split(",")]
    modes = {"invariant": (True, chunks[0])} | {f"mixed@{c}": (False, c) for c in chunks}
    print(f"{args.clients} clients x {args.tokens} tokens, {threads} threads, {args.rounds} rounds")
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        servers: dict[str, KodkodServer] = {}
        try:
            for i, (mode, (invariant, chunk)) in enumerate(modes.items()):
                servers[mode] = KodkodServer.start(
                    Path(tmp) / str(i),
                    {
                        "model": {
                            "max_batch_size": max(8, args.clients),
                            "n_threads": threads,
                            "chunk_size": chunk,
                            "batch_invariant": invariant,
                        }
                    },
                )
            for server in servers.values():  # warm up
                asyncio.run(burst(server, 2, 8, -1))
            for r in range(args.rounds):
                order = list(modes)
                order = order[r % len(order) :] + order[: r % len(order)]  # each goes first in turn
                for mode in order:
                    res = asyncio.run(burst(servers[mode], args.clients, args.tokens, r))
                    results[mode].append(res)
                    print(
                        f"round {r + 1} {mode:11s} {res['total_rate']:6.1f} tok/s (window "
                        f"{res['window_rate']:6.1f}), TTFT p50 {res['ttft_p50_s']:.2f} s "
                        f"p99 {res['ttft_p99_s']:.2f} s max {res['ttft_max_s']:.2f} s, "
                        f"{res['prefill_steps']:.0f} prefill of {res['steps']:.0f} steps, "
                        f"{res['cpu_rate']:.1f} tok per CPU s",
                        flush=True,
                    )
        finally:
            for server in servers.values():
                server.stop()
    med = {m: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for m, rs in results.items()}
    for mode, m in med.items():
        print(
            f"{mode:11s} median: {m['total_rate']:6.1f} tok/s (window {m['window_rate']:6.1f}), "
            f"TTFT p50 {m['ttft_p50_s']:.2f} s p99 {m['ttft_p99_s']:.2f} s max {m['ttft_max_s']:.2f} s, "
            f"{m['cpu_rate']:.1f} tok per CPU s"
        )
    inv = med["invariant"]
    for mode in modes:
        if mode == "invariant":
            continue
        mix = med[mode]
        per_round = [
            a["total_rate"] / b["total_rate"]
            for a, b in zip(results[mode], results["invariant"], strict=True)
        ]
        window = mix["window_rate"] / inv["window_rate"] if inv["window_rate"] else float("nan")
        print(
            f"{mode} / invariant: throughput {mix['total_rate'] / inv['total_rate']:.2f}x "
            f"(per round {' '.join(f'{x:.2f}' for x in per_round)}), window {window:.2f}x, "
            f"TTFT p50 {mix['ttft_p50_s'] / inv['ttft_p50_s']:.2f}x, "
            f"p99 {mix['ttft_p99_s'] / inv['ttft_p99_s']:.2f}x, tokens per CPU s "
            f"{mix['cpu_rate'] / inv['cpu_rate']:.2f}x"
        )


if __name__ == "__main__":
    main()
