"""Speculative decoding: speed-ups measured against the same target without speculation, in one run.

    .venv/bin/python benchmarks/speculative.py [--rounds 3] [--tokens 256] [--clients 8]

The pair: target = SmolLM2-135M-Instruct in F32 (derived from the Q4_1 original with
`kodkod models derive … --type f32`, created here if missing), draft = the Q4_1 original (same
vocabulary). Two kodkod servers run side by side (idle servers cost nothing): `plain` serves
the target alone, `draft` serves it with the draft model. Greedy requests; rounds interleave
the modes, and every ratio is taken within a round, then the median over rounds is printed:

1. single stream, a long story prompt: draft model vs none (decode tok/s from the engine's own
   per-request timing: completion tokens after the first / completion time);
2. single stream, a copy/edit prompt: n-gram drafting (`speculative_ngram: true`) vs none;
3. N concurrent streams (different prompts): aggregate tok/s (all tokens / wall time) on the
   draft server vs the plain one — the adaptive policy must back off, not slow things down.

Acceptance rate and mean draft length k (drafted tokens per drafting sequence-step) come from
the servers' /health counters, and so do the draft server's measured costs per load (a plain
decode step, one more verified row, one draft call — the policy's own figures) with the
acceptance at which drafting one token starts to pay (break-even) and the best k at the
acceptance seen so far. Timings on this shared 2-core machine are noisy: compare the
ratios, not absolute numbers, and run it when the machine is quiet (`uptime`).
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
sys.path.insert(0, str(REPO / "src"))

from kodkod.backends.llamacpp.quantize import quantize_model  # noqa: E402
from kodkod.models.derive import derive  # noqa: E402
from kodkod.models.manager import available_threads  # noqa: E402
from tests.server import DEFAULT_MODEL, MODELS, KodkodServer  # noqa: E402

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
STORY = CHAT.format("Write a long story about a dragon who learns to paint.")
PARAGRAPH = (
    "The lighthouse keeper climbed the narrow stairs every evening at dusk. He trimmed the "
    "wick, polished the great lens until it shone, and wrote the weather in a leather book: "
    "wind from the north, a light rain, three ships passing to the east. In winter the storms "
    "came early and the waves broke over the rocks below, but the light never failed. When "
    "the keeper grew old, his daughter took the keys, and she climbed the same stairs, "
    "trimmed the same wick and wrote in the same book, in a smaller and neater hand."
)
COPY = CHAT.format(
    "Rewrite the following text exactly, but change the word 'keeper' to 'guardian':\n\n" + PARAGRAPH
)
TOPICS = [
    "the sea",
    "a dragon",
    "robots",
    "a lighthouse",
    "winter",
    "a city at night",
    "a small cat",
    "the moon",
    "a forest",
    "an old clock",
    "trains",
    "a garden",
]


def completion(client: httpx.Client, prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    r = client.post("/v1/completions", json=body)
    r.raise_for_status()
    return dict(r.json())


def decode_rate(resp: dict[str, Any]) -> float:
    u = resp["usage"]
    return (u["completion_tokens"] - 1) / u["completion_time"]


def health(client: httpx.Client) -> dict[str, Any]:
    return dict(client.get("/health").json()["engine"])


def spec_counters(before: dict[str, Any], after: dict[str, Any]) -> tuple[int, int, int]:
    keys = ("drafted_tokens", "accepted_draft_tokens", "draft_steps")
    return tuple(after[k] - before[k] for k in keys)  # type: ignore[return-value]


async def many_streams(server: KodkodServer, clients: int, tokens: int) -> tuple[float, int]:
    prompts = [
        CHAT.format(f"Tell me everything about {TOPICS[i % len(TOPICS)]}, in detail.") for i in range(clients)
    ]
    async with server.async_client(timeout=900) as c:

        async def one(p: str) -> int:
            r = await c.post(
                "/v1/completions",
                json={"prompt": p, "max_tokens": tokens, "temperature": 0, "ban_eos_token": True},
            )
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
    return sum(counts) / wall, sum(counts)


def cost_lines(h: dict[str, Any]) -> list[str]:
    """The draft server's measured step costs per load (from /health) and their break-even."""
    out = []
    for c in h.get("speculation_costs", []):
        be = c["breakeven_acceptance"]
        out.append(
            f"    {c['num_seqs']} seq/step: plain step {c['plain_step_ms']:.2f} ms, "
            f"+{c['verified_row_ms']:.2f} ms "
            f"per verified row, draft call {c['draft_call_ms']:.2f} ms (draft/plain "
            f"{c['draft_call_ms'] / max(c['plain_step_ms'], 1e-9):.2f}); break-even acceptance for k=1: "
            f"{'never' if be is None else f'{be:.2f}'}; at acceptance {c['acceptance']:.2f} the best k is "
            f"{c['best_k']} for {c['best_speedup']:.2f}x"
        )
    return out


def fmt(spec: tuple[int, int, int]) -> str:
    drafted, accepted, steps = spec
    if not drafted:
        return "no drafts"
    return f"acceptance {accepted / drafted:.3f}, k {drafted / max(1, steps):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    target = derive(MODELS, DEFAULT_MODEL, "f32", quantize=quantize_model)
    threads = available_threads()
    print(
        f"target {target.name} (F32), draft {DEFAULT_MODEL} (Q4_1), {threads} threads, "
        f"{args.tokens} tokens, {args.clients} clients, {args.rounds} rounds"
    )
    base = {
        "model": {
            "model_name": target.name,
            "n_threads": threads,
            "max_seq_len": 4096,
            "max_batch_size": max(8, args.clients),
        }
    }
    with_draft = {**base, "draft_model": {"draft_model_name": DEFAULT_MODEL, "draft_model_dir": "models"}}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = KodkodServer.start(Path(tmp) / "plain", base, model=target.name)
        draft = KodkodServer.start(Path(tmp) / "draft", with_draft, model=target.name)
        try:
            with plain.client(timeout=900) as pc, draft.client(timeout=900) as dc:
                for c in (pc, dc):  # warm up (page cache, first allocations)
                    completion(c, STORY, 16)
                for _ in range(args.rounds):
                    row: dict[str, Any] = {}
                    row["story_plain"] = decode_rate(completion(pc, STORY, args.tokens, ban_eos_token=True))
                    h0 = health(dc)
                    row["story_draft"] = decode_rate(completion(dc, STORY, args.tokens, ban_eos_token=True))
                    row["story_spec"] = spec_counters(h0, health(dc))
                    copy_plain = completion(pc, COPY, args.tokens)
                    h0 = health(pc)
                    copy_ngram = completion(pc, COPY, args.tokens, speculative_ngram=True)
                    row["copy_spec"] = spec_counters(h0, health(pc))
                    row["copy_same"] = copy_plain["choices"][0]["text"] == copy_ngram["choices"][0]["text"]
                    row["copy_plain"], row["copy_ngram"] = decode_rate(copy_plain), decode_rate(copy_ngram)
                    row["copy_tokens"] = copy_ngram["usage"]["completion_tokens"]
                    row["many_plain"], _ = asyncio.run(many_streams(plain, args.clients, args.tokens))
                    h0 = health(dc)
                    row["many_draft"], _ = asyncio.run(many_streams(draft, args.clients, args.tokens))
                    row["many_spec"] = spec_counters(h0, health(dc))
                    rows.append(row)
                    row["costs"] = cost_lines(health(dc))
                    print(
                        f"  round: story {row['story_draft'] / row['story_plain']:.2f}x "
                        f"({fmt(row['story_spec'])}), copy {row['copy_ngram'] / row['copy_plain']:.2f}x "
                        f"({fmt(row['copy_spec'])}), {args.clients} streams "
                        f"{row['many_draft'] / row['many_plain']:.2f}x ({fmt(row['many_spec'])})",
                        flush=True,
                    )
                    print("\n".join(row["costs"]), flush=True)
        finally:
            plain.stop()
            draft.stop()
    med = statistics.median

    def total(key: str) -> tuple[int, int, int]:
        return tuple(sum(r[key][i] for r in rows) for i in range(3))  # type: ignore[return-value]

    story = med(r["story_draft"] / r["story_plain"] for r in rows)
    copy = med(r["copy_ngram"] / r["copy_plain"] for r in rows)
    many = med(r["many_draft"] / r["many_plain"] for r in rows)
    print(
        f"story, draft model:   {med(r['story_plain'] for r in rows):6.1f} -> "
        f"{med(r['story_draft'] for r in rows):6.1f} tok/s  ratio {story:.2f} (target >= 1.4); "
        f"{fmt(total('story_spec'))}"
    )
    print(
        f"copy/edit, n-gram:    {med(r['copy_plain'] for r in rows):6.1f} -> "
        f"{med(r['copy_ngram'] for r in rows):6.1f} tok/s  ratio {copy:.2f} (target >= 1.8); "
        f"{fmt(total('copy_spec'))}; {rows[0]['copy_tokens']} tokens, "
        f"output identical: {all(r['copy_same'] for r in rows)}"
    )
    print(
        f"{args.clients} streams, draft model: {med(r['many_plain'] for r in rows):6.1f} -> "
        f"{med(r['many_draft'] for r in rows):6.1f} tok/s aggregate  ratio {many:.2f} "
        f"(target >= 0.95); {fmt(total('many_spec'))}"
    )


if __name__ == "__main__":
    main()
