"""How often does a greedy request's output depend on its batch neighbours? Measured, not assumed.

    .venv/bin/python benchmarks/batch_invariance.py [--prompts 16] [--tokens 96] [--clients 8]
        [--batch-invariant on|off]

Each prompt is generated greedily (1) alone on a fresh server, one request at a time, and (2) in
a burst of `--clients` concurrent requests on another fresh server. Prompts start with different
words, so no request reuses another's cached prefix and each prompt is prefilled the same way in
both runs; the only difference is who shares the decode batches. Prints how many outputs differ
and, for those, the token index of the first divergence.

llama.cpp's CPU kernels are not batch-invariant in general (engine-notes.md): the same row can
round differently in a batch of 1 and of 8. This script is how we state the size of that effect.
Both servers run with `model.batch_invariant` as given (on by default: each prompt prefilled
alone, what the promise rests on; off: prompts are prefilled together and beside decode rows).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from kodkod.models.manager import available_threads  # noqa: E402
from tests.server import KodkodServer  # noqa: E402

WORDS = [
    "Seas",
    "Dragons",
    "Robots",
    "Lighthouses",
    "Winter",
    "Cities",
    "Cats",
    "Moonlight",
    "Rivers",
    "Mountains",
    "Libraries",
    "Bicycles",
    "Volcanoes",
    "Gardens",
    "Clocks",
    "Storms",
    "Deserts",
    "Bridges",
    "Owls",
    "Trains",
    "Islands",
    "Castles",
    "Bees",
    "Comets",
]


def body(word: str, tokens: int) -> dict:
    return {
        "prompt": f"{word} are the subject of this essay. ",
        "max_tokens": tokens,
        "temperature": 0,
        "ban_eos_token": True,
        "logprobs": 1,
    }


async def run_all(server: KodkodServer, bodies: list[dict], concurrent: int) -> list[list[str]]:
    out: list[list[str]] = [[] for _ in bodies]
    sem = asyncio.Semaphore(concurrent)
    async with server.async_client(timeout=900) as c:

        async def one(i: int, b: dict) -> None:
            async with sem:
                r = await c.post("/v1/completions", json=b)
                r.raise_for_status()
                out[i] = r.json()["choices"][0]["logprobs"]["tokens"]

        await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--batch-invariant", choices=("on", "off"), default="on", help="model.batch_invariant")
    args = ap.parse_args()
    model = {"n_threads": available_threads(), "batch_invariant": args.batch_invariant == "on"}
    bodies = [body(w, args.tokens) for w in WORDS[: args.prompts]]
    results = []
    for concurrent in (1, args.clients):
        with tempfile.TemporaryDirectory() as tmp:
            server = KodkodServer.start(Path(tmp), {"model": model})
            try:
                results.append(asyncio.run(run_all(server, bodies, concurrent)))
            finally:
                server.stop()
    alone, batched = results
    diverged = []
    for i, (a, b) in enumerate(zip(alone, batched, strict=True)):
        if a != b:
            first = next(
                (k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
            )
            diverged.append((WORDS[i], first))
    print(
        f"{len(bodies)} greedy prompts x {args.tokens} tokens, alone vs {args.clients} concurrent "
        f"(batch_invariant {args.batch_invariant}):"
    )
    print(f"  identical: {len(bodies) - len(diverged)}/{len(bodies)}")
    for word, first in diverged:
        print(f"  '{word}': first divergence at output token {first}")


if __name__ == "__main__":
    main()
