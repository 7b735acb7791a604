"""Many concurrent short streams: kodkod vs llama.cpp's llama-server, side by side.

Used by `benchmarks/engine_throughput.py --llama-server` (also runnable alone):

    .venv/bin/python benchmarks/concurrency_vs_llama.py [--clients 32] [--tokens 64] [--rounds 3]

N clients send a short chat-formatted prompt each at the same moment (/v1/completions, greedy,
EOS ignored, streamed) to a freshly started server; the servers get the same model, threads,
flash attention, batch sizes and KV cells (kodkod `cache_size` = llama-server `-c` =
N x cells per client, llama-server `-np N`, kodkod `max_batch_size` N; with `--kv-layout
per_slot` kodkod too gives each of its N slots its own KV stream of those cells, as
llama-server does). Rounds alternate which
server goes first. Printed per server: throughput (generated tokens over the time from sending
to the last token), time to first token p50 / p99 / max; and kodkod / llama-server ratios
(medians of per-round figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from benchmarks.llama_server import LlamaServer  # noqa: E402

from kodkod.models.manager import available_threads  # noqa: E402
from tests.server import DEFAULT_GGUF, KodkodServer  # noqa: E402

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
SUBJECTS = (
    "the sea",
    "a dragon",
    "robots",
    "a lighthouse",
    "winter",
    "a city at night",
    "a small cat",
    "the moon",
)


@dataclass(frozen=True, slots=True)
class StreamTimes:
    sent_s: float
    first_s: float
    last_s: float
    tokens: int


@dataclass(frozen=True, slots=True)
class ConcurrencyRun:
    server: str
    tokens_per_s: float
    ttft_s: list[float]  # sorted

    def ttft(self, q: float) -> float:
        return self.ttft_s[min(len(self.ttft_s) - 1, int(q * (len(self.ttft_s) - 1) + 0.5))]


async def _one_stream(
    client: httpx.AsyncClient, prompt: str, tokens: int, start: asyncio.Event
) -> StreamTimes:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    await start.wait()
    sent = time.perf_counter()
    first = last = 0.0
    count = 0
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any(c.get("text") for c in chunk.get("choices") or ()):
                last = time.perf_counter()
                first = first or last
                count += 1
            usage = chunk.get("usage")
            if usage and usage.get("completion_tokens"):
                count = int(usage["completion_tokens"])
    return StreamTimes(sent, first, last, count)


async def measure(
    base_url: str, headers: dict[str, str], name: str, clients: int, tokens: int
) -> ConcurrencyRun:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)  # see chat_sessions
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=900, limits=limits) as client:
        warm = asyncio.Event()
        warm.set()
        await _one_stream(client, CHAT.format("Warm up."), 4, warm)
        start = asyncio.Event()
        prompts = [
            CHAT.format(f"Write a story about {SUBJECTS[i % len(SUBJECTS)]}, part {i}.")
            for i in range(clients)
        ]
        tasks = [asyncio.create_task(_one_stream(client, p, tokens, start)) for p in prompts]
        await asyncio.sleep(0)  # every task runs up to start.wait(), so all send together
        start.set()
        times = await asyncio.gather(*tasks)
    t0 = min(t.sent_s for t in times)
    t1 = max(t.last_s for t in times)
    return ConcurrencyRun(
        name, sum(t.tokens for t in times) / (t1 - t0), sorted(t.first_s - t.sent_s for t in times)
    )


@contextmanager
def _serve(
    name: str, tmp: Path, clients: int, cells_per_client: int, threads: int, kv_layout: str
) -> Iterator[tuple[str, dict[str, str]]]:
    total = clients * cells_per_client
    if name == "kodkod":
        cfg = {
            "model": {
                "max_batch_size": clients,
                "max_seq_len": cells_per_client,
                "cache_size": total,
                "n_threads": threads,
                "kv_layout": kv_layout,
            }
        }
        server = KodkodServer.start(tmp / f"kodkod-{time.time_ns()}", cfg)
        try:
            yield server.base_url, server.headers()
        finally:
            server.stop()
    else:
        llama = LlamaServer.start(
            DEFAULT_GGUF, n_parallel=clients, ctx_total=total, threads=threads, log_dir=tmp
        )
        try:
            yield llama.base_url, {}
        finally:
            llama.stop()


def compare_with_llama_server(
    clients: int, tokens: int, rounds: int, threads: int, kv_layout: str = "unified"
) -> None:
    """Run and print the side-by-side comparison (the `--llama-server` part of engine_throughput)."""
    cells = 256 * -(-(tokens + 64) // 256)  # prompt + reply per client, rounded up to 256
    print(
        f"kodkod vs llama-server: {clients} concurrent streams of {tokens} tokens, {threads} threads, "
        f"{cells} KV cells per client ({clients * cells} in all), kodkod kv_layout {kv_layout}, "
        f"{rounds} rounds interleaved"
    )
    runs: list[ConcurrencyRun] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(rounds):
            order = ("kodkod", "llama-server") if rnd % 2 == 0 else ("llama-server", "kodkod")
            for name in order:
                with _serve(name, Path(tmp), clients, cells, threads, kv_layout) as (url, headers):
                    run = asyncio.run(measure(url, headers, name, clients, tokens))
                runs.append(run)
                print(
                    f"  round {rnd + 1} {name:12s} {run.tokens_per_s:7.1f} tok/s  TTFT p50 "
                    f"{run.ttft(0.5) * 1000:6.0f} p99 {run.ttft(0.99) * 1000:6.0f} "
                    f"max {run.ttft_s[-1] * 1000:6.0f} ms",
                    flush=True,
                )
    med = statistics.median
    mine = [r for r in runs if r.server == "kodkod"]
    theirs = [r for r in runs if r.server == "llama-server"]
    for name, rs in (("kodkod", mine), ("llama-server", theirs)):
        print(
            f"{name:12s} {clients} streams {med(r.tokens_per_s for r in rs):7.1f} tok/s  TTFT p50 "
            f"{med(r.ttft(0.5) for r in rs) * 1000:6.0f} ms "
            f"p99 {med(r.ttft(0.99) for r in rs) * 1000:6.0f} ms "
            f"(median of {len(rs)} rounds)"
        )
    pairs = list(zip(mine, theirs, strict=True))
    print(
        f"kodkod / llama-server at {clients} streams: throughput "
        f"{med(a.tokens_per_s / b.tokens_per_s for a, b in pairs):.2f}x (goal >= 1.0), TTFT p50 "
        f"{med(a.ttft(0.5) / b.ttft(0.5) for a, b in pairs):.2f}x, TTFT p99 "
        f"{med(a.ttft(0.99) / b.ttft(0.99) for a, b in pairs):.2f}x (goal <= 1.0)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads of both (0: every core)")
    ap.add_argument(
        "--kv-layout", choices=("unified", "per_slot"), default="unified", help="kodkod's model.kv_layout"
    )
    args = ap.parse_args()
    compare_with_llama_server(
        args.clients, args.tokens, args.rounds, args.threads or available_threads(), args.kv_layout
    )


if __name__ == "__main__":
    main()
