"""Sampler overhead: aggregate tok/s with a heavy sampler set vs greedy, 8 concurrent streams.

Starts a kodkod server with the default model (or uses --url), then runs rounds that alternate
greedy (temperature 0, a numpy argmax) and a heavy set (repetition + frequency + presence
penalties, DRY, XTC, min-p, seeded draw — every stage of it in one llama.cpp chain). Each round
sends `--streams` completions at once with `ignore_eos`, so every request produces exactly
`--tokens` tokens, and measures completion tokens / wall time. Rounds alternate so machine load
drifts hit both sides; the ratio of the medians is printed (target ≥ 0.85).

    .venv/bin/python benchmarks/sampler_overhead.py [--rounds 4] [--tokens 96] [--streams 8]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.server import API_KEY, KodkodServer  # noqa: E402

GREEDY: dict[str, Any] = {"temperature": 0.0}
HEAVY: dict[str, Any] = {
    "temperature": 1.0,
    "seed": 1234,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "frequency_penalty": 0.2,
    "presence_penalty": 0.2,
    "dry_multiplier": 0.8,
    "dry_base": 1.75,
    "dry_allowed_length": 2,
    "xtc_probability": 0.5,
    "xtc_threshold": 0.1,
}
TOPICS = [
    "the sea",
    "a lighthouse",
    "winter",
    "a market",
    "trains",
    "the moon",
    "bread",
    "a library",
    "rain",
    "bees",
    "a violin",
    "mountains",
    "a clock",
    "the desert",
    "owls",
    "a bridge",
]


async def one_round(client: httpx.AsyncClient, sampler: dict[str, Any], streams: int, tokens: int) -> float:
    async def one(i: int) -> int:
        body = {
            "prompt": f"Write a long story about {TOPICS[i % len(TOPICS)]}.\n",
            "max_tokens": tokens,
            "ignore_eos": True,
            **sampler,
        }
        r = await client.post("/v1/completions", json=body)
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    start = time.perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(streams)))
    return sum(done) / (time.perf_counter() - start)


async def run(url: str, rounds: int, streams: int, tokens: int) -> float:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600.0) as client:
        await one_round(client, GREEDY, streams, 8)  # warm up (prefix cache, threads)
        await one_round(client, HEAVY, streams, 8)
        greedy: list[float] = []
        heavy: list[float] = []
        for r in range(rounds):
            order = [(GREEDY, greedy), (HEAVY, heavy)]
            for sampler, out in order if r % 2 == 0 else order[::-1]:
                out.append(await one_round(client, sampler, streams, tokens))
            print(f"round {r + 1}: greedy {greedy[-1]:6.1f} tok/s   heavy {heavy[-1]:6.1f} tok/s", flush=True)
    g, h = statistics.median(greedy), statistics.median(heavy)
    ratio = h / g
    print(
        f"median: greedy {g:.1f} tok/s, heavy sampler set {h:.1f} tok/s ({streams} streams × {tokens} tokens)"
    )
    print(f"sampler overhead ratio (heavy / greedy): {ratio:.2f}x  (target ≥ 0.85x)")
    return ratio


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="an already running kodkod (default model, test API key)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    args = ap.parse_args()
    if args.url:
        asyncio.run(run(args.url, args.rounds, args.streams, args.tokens))
        return 0
    with tempfile.TemporaryDirectory(prefix="kodkod-bench-") as tmp:
        server = KodkodServer.start(Path(tmp))
        try:
            asyncio.run(run(server.base_url, args.rounds, args.streams, args.tokens))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
