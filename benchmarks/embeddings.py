"""Embedding throughput against sentence-transformers, and what embedding work costs a chat stream.

    .venv/bin/python benchmarks/embeddings.py [--rounds 7] [--threads N] [--embedding-nice N]

Starts a real server (default chat model plus `all-MiniLM-L6-v2`, both with `--threads`
llama.cpp threads, default: every CPU this process may use) and measures, in the same run:

1. inputs/s of `POST /v1/embeddings` (official `openai` client with its default: base64, decoded
   by the client) for batches of 1, 16 and 256 short sentences;
   beside it, labelled "server alone", the same requests with plain httpx (base64 answer read,
   not decoded): the server's own rate without the client library's parsing;
2. the same batches through sentence-transformers (PyTorch, CPU, the same number of threads)
   on the same Hugging Face weights, in a child process of its own, its rounds interleaved with
   ours; each side's best of `--rounds` (on a shared machine the best round is the one least
   disturbed by other work). Each side runs with its OpenMP defaults: PyTorch's threads in
   their own process, and no `OMP_WAIT_POLICY` handed to the server (PASSIVE makes llama.cpp's
   threads sleep at every operation's barrier: a third of the embedding throughput and most of
   a chat stream's speed, docs/measurements.md);
3. a chat stream's tokens/s (greedy, 128 tokens, `ignore_eos`) alone, then while another
   client sends batches of 16 sentences back to back (base64 answers, the `openai` client's
   default: JSON floats would mostly measure this process parsing them under the GIL that the
   stream's reader needs too). `--embedding-nice` sets `embeddings.embedding_nice` (default:
   the server's).

Prints one table; the ratio columns are kodkod / sentence-transformers (the goal is judged on the
first, the `openai` client's): best round against best round, and beside it the median of the
ratios taken within each round (this shared machine's speed drifts by ±20 % within a minute;
both sides of one round ran back to back, so that ratio is the steadier of the two).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

import httpx  # noqa: E402
import openai  # noqa: E402

from kodkod.models.manager import available_threads  # noqa: E402
from tests.server import MODELS, KodkodServer  # noqa: E402

EMBED_MODEL = "all-MiniLM-L6-v2"
SUBJECTS = [
    "The cat",
    "A student",
    "My neighbour",
    "The old ship",
    "A robot",
    "The river",
    "Our team",
    "A bird",
]
VERBS = ["watches", "builds", "finds", "paints", "follows", "remembers", "carries", "opens"]
OBJECTS = ["the door", "a small house", "the morning sun", "an old map", "the garden", "a red kite"]


def sentences(n: int) -> list[str]:
    return [f"{SUBJECTS[i % 8]} {VERBS[(i // 8) % 8]} {OBJECTS[(i // 64) % 6]} on day {i}." for i in range(n)]


class TorchChild:
    """sentence-transformers in a child process (`--torch-child`): `encode(n)` embeds the first
    `n` benchmark sentences there and returns once it is done."""

    def __init__(self, threads: int) -> None:
        cmd = [sys.executable, __file__, "--torch-child", "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read("ready")

    def _read(self, expected: str) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != expected:
            raise RuntimeError(f"the PyTorch child said {line!r}, not {expected!r}")

    def encode(self, n: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        self._read("done")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def torch_child(threads: int) -> None:
    """The child's loop: one number of sentences per stdin line, `done` when embedded."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    ref = SentenceTransformer(str(MODELS / EMBED_MODEL), device="cpu")
    texts = sentences(256)
    print("ready", flush=True)
    for line in sys.stdin:
        part = texts[: int(line)]
        ref.encode(part, batch_size=len(part))
        print("done", flush=True)


def best_rates(
    fns: list[Callable[[], object]], n_inputs: int, rounds: int
) -> tuple[list[float], list[list[float]]]:
    """inputs/s of each of `fns`, rounds interleaved (a, b, c, b, c, a, c, a, b, ...: each
    round starts with the next one, so no side always runs right after the same other) so that
    a change in the machine's load hits all alike: the best round of each, after one warm-up
    call each, and every round's rates (`[round][fn]`, for ratios taken within a round)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for i in range(len(fns)):
            k = (r + i) % len(fns)
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    per_round = [[n_inputs / t[r] for t in times] for r in range(rounds)]
    return [n_inputs / min(t) for t in times], per_round


def stream_rate(server: KodkodServer, tokens: int) -> float:
    async def run() -> float:
        async with openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0) as c:
            stream = await c.completions.create(
                model="x",
                prompt="Once upon a time, in a lighthouse by the sea,",
                max_tokens=tokens,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            stamps = []
            n = 0
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    n += 1
                    stamps.append(time.perf_counter())
            return (n - 1) / (stamps[-1] - stamps[0])

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=available_threads())
    ap.add_argument("--stream-tokens", type=int, default=128)
    ap.add_argument("--embedding-nice", type=int, default=None)
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_child:
        torch_child(args.threads)
        return

    # the server inherits this environment: llama.cpp's OpenMP threads with their defaults
    policy = os.environ.pop("OMP_WAIT_POLICY", None)
    if policy is not None:
        print(f"(OMP_WAIT_POLICY={policy} removed from the server's environment)")
    ref = TorchChild(args.threads)
    texts = sentences(256)
    rows: list[tuple[str, float, float, float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="kodkod-bench-") as tmp:
        config: dict[str, Any] = {"network": {"disable_auth": True}, "model": {"n_threads": args.threads}}
        if args.embedding_nice is not None:
            config["embeddings"] = {"embedding_nice": args.embedding_nice}
        server = KodkodServer.start(
            Path(tmp),
            config,
            args=["--embedding-model-name", EMBED_MODEL],
            wait_s=300,
        )
        try:
            client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
            raw = httpx.Client(base_url=server.base_url, timeout=300)
            for batch in (1, 16, 256):
                part = texts[:batch]

                def over_httpx(p: list[str] = part) -> None:
                    r = raw.post("/v1/embeddings", json={"input": p, "encoding_format": "base64"})
                    r.raise_for_status()

                (ours, bare, theirs), per_round = best_rates(
                    [
                        lambda p=part: client.embeddings.create(model="x", input=p),
                        over_httpx,
                        lambda n=batch: ref.encode(n),
                    ],
                    batch,
                    args.rounds,
                )
                ratio_in_round = statistics.median(r[0] / r[2] for r in per_round)
                bare_in_round = statistics.median(r[1] / r[2] for r in per_round)
                rows.append((f"batch {batch}", ours, bare, theirs, ratio_in_round, bare_in_round))
            raw.close()

            alone = statistics.median(stream_rate(server, args.stream_tokens) for _ in range(3))
            stop = threading.Event()
            sent = [0]

            def load() -> None:
                with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0) as c:
                    while not stop.is_set():
                        c.embeddings.create(model="x", input=texts[:16])
                        sent[0] += 16

            worker = threading.Thread(target=load)
            worker.start()
            try:
                busy = statistics.median(stream_rate(server, args.stream_tokens) for _ in range(3))
            finally:
                stop.set()
                worker.join()
        finally:
            server.stop()
            ref.close()

    nice = "server default" if args.embedding_nice is None else args.embedding_nice
    print(f"threads: {args.threads} (llama.cpp chat and embedding; torch); embedding_nice: {nice}")
    head = ("", "kodkod inputs/s", "sentence-transformers", "ratio", "in-round", "server alone", "ratio")
    print(f"{head[0]:<12}{head[1]:>18}{head[2]:>24}{head[3]:>8}{head[4]:>10}{head[5]:>15}{head[6]:>8}")
    for name, ours, bare, theirs, in_round, bare_in_round in rows:
        cells = (
            f"{ours:>18.1f}{theirs:>24.1f}{ours / theirs:>8.2f}{in_round:>10.2f}"
            f"{bare:>15.1f}{bare / theirs:>8.2f}  (in-round {bare_in_round:.2f})"
        )
        print(f"{name:<12}{cells}")
    print("(kodkod: the official openai client, as users run it; server alone: httpx, base64 answer read")
    print(" but not decoded, the server's own rate without the client library's parsing; ratio: best")
    print(" round / best round; in-round: the median over rounds of the ratio within each round, where")
    print(" both sides ran back to back under the same load)")
    drop = 100.0 * (1.0 - busy / alone)
    print(f"chat stream alone: {alone:.1f} tok/s; with embedding load: {busy:.1f} tok/s ({drop:.0f}% slower)")
    print(f"(embedding inputs served during the loaded streams: {sent[0]})")


if __name__ == "__main__":
    main()
