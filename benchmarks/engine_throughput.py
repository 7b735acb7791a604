"""Engine throughput through the HTTP server vs a raw llama.cpp loop, measured in one run.

    .venv/bin/python benchmarks/engine_throughput.py [--tokens 256] [--clients 8]

1. Raw baseline (no server): a minimal low-level llama.cpp decode loop with argmax sampling on
   the same model, threads and context settings — 1 sequence, and N sequences in one batch.
2. The kodkod server (a subprocess) over HTTP with streaming clients (httpx):
   - single stream: decode tok/s between the first and last token;
   - N concurrent streams: aggregate tok/s over the window in which all N are decoding;
   - p50 / p99 inter-token latency per stream under N clients;
   - time to first token of a request sharing a 1,500-token prefix with an earlier one;
   - per-step engine overhead outside llama_decode (from the engine's own counters).
Prints every ratio against the raw loop measured in the same run. Timings are noisy on a shared
2-core machine: compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from kodkod.models.manager import available_threads  # noqa: E402
from tests.server import DEFAULT_GGUF, KodkodServer  # noqa: E402

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
TOPICS = ["the sea", "a dragon", "robots", "a lighthouse", "winter", "a city at night",
          "a small cat", "the moon", "a forest", "an old clock", "trains", "a garden"]


# -- raw baseline ---------------------------------------------------------------------------

def _quiet_log(level: int, text: bytes, user_data: object) -> None:
    return None


try:
    import llama_cpp as _L

    _QUIET = _L.llama_log_callback(_quiet_log)  # kept alive for the process (C holds it)
except ImportError:  # pragma: no cover
    _QUIET = None

def raw_loop(n_seq: int, n_tokens: int, threads: int) -> float:
    """Aggregate decode tok/s of a bare llama.cpp loop (argmax), n_seq sequences per batch."""
    import llama_cpp as L
    import numpy as np

    L.llama_backend_init()
    L.llama_log_set(_QUIET, None)
    model = L.llama_model_load_from_file(str(DEFAULT_GGUF).encode(), L.llama_model_default_params())
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 8192, 2048, 512, 64
    cp.n_threads = cp.n_threads_batch = threads
    cp.kv_unified, cp.swa_full, cp.flash_attn_type = True, True, 1
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(2048, 0, 1)
    rows = ctypes.c_float * n_vocab
    last = []
    for s in range(n_seq):
        text = CHAT.format(f"Write a long story about {TOPICS[s % len(TOPICS)]}.").encode()
        arr = (L.llama_token * 512)()
        n = L.llama_tokenize(vocab, text, len(text), arr, 512, False, True)
        batch.n_tokens = n
        for i in range(n):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = arr[i], i, 1
            batch.seq_id[i][0], batch.logits[i] = s, i == n - 1
        assert L.llama_decode(ctx, batch) == 0
        logits = np.frombuffer(rows.from_address(ctypes.addressof(L.llama_get_logits_ith(ctx, n - 1).contents)), np.float32)
        last.append((int(logits.argmax()), n))
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        batch.n_tokens = n_seq
        for s, (tok, pos) in enumerate(last):
            batch.token[s], batch.pos[s], batch.n_seq_id[s] = tok, pos, 1
            batch.seq_id[s][0], batch.logits[s] = s, 1
        assert L.llama_decode(ctx, batch) == 0
        for s in range(n_seq):
            ptr = L.llama_get_logits_ith(ctx, s)
            tok = int(np.frombuffer(rows.from_address(ctypes.addressof(ptr.contents)), np.float32).argmax())
            last[s] = (tok, last[s][1] + 1)
    rate = n_seq * n_tokens / (time.perf_counter() - t0)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return rate


# -- HTTP clients ---------------------------------------------------------------------------

async def stream_completion(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> list[tuple[float, int]]:
    """(receive time, tokens in event) for each streamed text event."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ban_eos_token": True,
            "stream": True, "logprobs": 0}
    out: list[tuple[float, int]] = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            ev = json.loads(line[6:])
            choice = ev["choices"][0] if ev.get("choices") else None
            if choice and choice.get("text"):
                out.append((now, 1))
    return out


def decode_rate(events: list[tuple[float, int]]) -> float:
    n = sum(k for _, k in events) - events[0][1]
    return n / (events[-1][0] - events[0][0])


def window_rate(all_events: list[list[tuple[float, int]]]) -> float:
    start = max(ev[0][0] for ev in all_events)
    end = min(ev[-1][0] for ev in all_events)
    n = sum(k for evs in all_events for t, k in evs if start < t <= end)
    return n / (end - start)


async def http_benchmarks(server: KodkodServer, tokens: int, clients: int) -> dict[str, float]:
    res: dict[str, float] = {}
    async with server.async_client(timeout=600) as c:
        await stream_completion(c, CHAT.format("Warm up."), 8)
        single = await stream_completion(c, CHAT.format("Write a long story about a dragon."), tokens)
        res["single"] = decode_rate(single)
        prompts = [CHAT.format(f"Tell me everything about {TOPICS[i % len(TOPICS)]}, in detail.") for i in range(clients)]
        many = await asyncio.gather(*(stream_completion(c, p, tokens) for p in prompts))
        res["many"] = window_rate(many)
        gaps = [b[0] - a[0] for evs in many for a, b in zip(evs, evs[1:])]
        gaps.sort()
        res["itl_p50_ms"] = 1000 * statistics.median(gaps)
        res["itl_p99_ms"] = 1000 * gaps[int(0.99 * (len(gaps) - 1))]
        health = (await c.get("/health")).json()["engine"]
        res["steps"] = health["steps"]
        res["overhead_ms"] = 1000 * (health["step_time_s"] - health["decode_time_s"]) / max(1, health["steps"])
        # prefix reuse: two requests sharing a ~1,500-token prefix
        shared = " ".join(f"Fact {i}: the number {i} is written as {i}." for i in range(150))
        ttft = []
        for question in ("What is fact 7?", "What is fact 99?"):
            body = {"prompt": CHAT.format(shared + "\n" + question), "max_tokens": 4, "temperature": 0, "stream": True}
            t0 = time.perf_counter()
            async with c.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and '"text":"' in line and '"text":""' not in line:
                        ttft.append(time.perf_counter() - t0)
                        break
        enc = (await c.post("/v1/token/encode", json={"text": shared})).json()["length"]
        res["prefix_tokens"] = enc
        res["ttft_first_s"], res["ttft_second_s"] = ttft
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    threads = available_threads()
    print(f"model {DEFAULT_GGUF.name}, {threads} threads, {args.tokens} tokens, {args.clients} clients")
    raw1 = raw_loop(1, args.tokens, threads)
    rawn = raw_loop(args.clients, args.tokens, threads)
    print(f"raw llama.cpp loop:  1 seq {raw1:7.1f} tok/s | {args.clients} seqs {rawn:7.1f} tok/s ({rawn / raw1:.2f}x)")
    with tempfile.TemporaryDirectory() as tmp:
        server = KodkodServer.start(Path(tmp), {"model": {"max_batch_size": max(8, args.clients)}})
        try:
            r = asyncio.run(http_benchmarks(server, args.tokens, args.clients))
        finally:
            server.stop()
    print(f"kodkod single stream {r['single']:7.1f} tok/s  ratio {r['single'] / raw1:.3f} (target >= 0.95)")
    print(f"kodkod {args.clients} streams     {r['many']:7.1f} tok/s  ratio {r['many'] / rawn:.3f} (target >= 0.90)")
    print(f"inter-token latency under {args.clients} clients: p50 {r['itl_p50_ms']:.1f} ms, p99 {r['itl_p99_ms']:.1f} ms")
    print(f"prefix reuse ({r['prefix_tokens']:.0f}-token shared prefix): TTFT {r['ttft_first_s']*1000:.0f} ms -> "
          f"{r['ttft_second_s']*1000:.0f} ms  ratio {r['ttft_second_s'] / r['ttft_first_s']:.3f} (target <= 0.15)")
    print(f"engine overhead outside llama_decode: {r['overhead_ms']:.3f} ms/step over {r['steps']:.0f} steps")


if __name__ == "__main__":
    main()
