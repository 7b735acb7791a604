"""Constrained decoding overhead: json_schema vs unconstrained, same prompt, same run.

    .venv/bin/python benchmarks/constrained_decoding.py            # starts its own server
    .venv/bin/python benchmarks/constrained_decoding.py --url http://127.0.0.1:5000 --key K
    .venv/bin/python benchmarks/constrained_decoding.py --compare-gbnf   # + grammar engines

Scenarios (each repeated `--rounds` times, alternating, medians reported):
1. one request alone: unconstrained vs json_schema, `max_tokens` tokens each (the schema asks
   for long strings so the constrained reply is as long as the free one);
2. a batch of 4 concurrent requests: all free vs 2 constrained + 2 free neighbours vs 4
   constrained (aggregate tokens per second).
Decode speed is the server's own `completion_tokens / completion_time` (usage), so prompt
processing is excluded; the prompt is cached after the first round anyway.

`--compare-gbnf` also times, per token and without the model, how long each grammar engine
takes to constrain one 49k-token logits row for the same schema: llguidance (kodkod's choice)
vs llama.cpp's GBNF sampler fed by llama-cpp-python's JSON-schema→GBNF converter.
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

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 20, "maxLength": 60},
        "paragraphs": {
            "type": "array",
            "items": {"type": "string", "minLength": 150, "maxLength": 400},
            "minItems": 4,
            "maxItems": 4,
        },
    },
    "required": ["title", "paragraphs"],
    "additionalProperties": False,
}
PROMPT = "Write a long story about a lighthouse keeper and a storm, as JSON."


def body(max_tokens: int, constrained: bool) -> dict:
    out: dict = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,  # the free reply may not stop early either
        "temperature": 0.7,
        "seed": 1,
    }
    if constrained:
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}
    return out


async def one(client: httpx.AsyncClient, max_tokens: int, constrained: bool) -> tuple[int, float]:
    r = await client.post("/v1/chat/completions", json=body(max_tokens, constrained))
    r.raise_for_status()
    usage = r.json()["usage"]
    return usage["completion_tokens"], usage["completion_time"]


async def batch(client: httpx.AsyncClient, max_tokens: int, kinds: list[bool]) -> float:
    """Aggregate decode tok/s of concurrent requests (total tokens / longest completion time)."""
    results = await asyncio.gather(*(one(client, max_tokens, k) for k in kinds))
    return sum(n for n, _ in results) / max(t for _, t in results)


async def run(url: str, key: str, rounds: int, max_tokens: int) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        await one(client, 8, False)  # warm up: prompt cached, grammar compiled
        await one(client, 8, True)
        single: dict[bool, list[float]] = {False: [], True: []}
        mixes = {"4 free": [False] * 4, "2 json + 2 free": [True, True, False, False], "4 json": [True] * 4}
        batched: dict[str, list[float]] = {name: [] for name in mixes}
        for _ in range(rounds):
            for constrained in (False, True):
                n, t = await one(client, max_tokens, constrained)
                single[constrained].append(n / t)
            for name, kinds in mixes.items():
                batched[name].append(await batch(client, max_tokens, kinds))
    free, js = statistics.median(single[False]), statistics.median(single[True])
    print(f"single request, {max_tokens} tokens, median of {rounds}:")
    print(f"  unconstrained  {free:7.1f} tok/s")
    print(f"  json_schema    {js:7.1f} tok/s   ratio {js / free:.3f}x")
    base = statistics.median(batched["4 free"])
    print("batch of 4 concurrent requests (aggregate decode tok/s):")
    for name in mixes:
        value = statistics.median(batched[name])
        print(f"  {name:16s} {value:7.1f} tok/s   ratio {value / base:.3f}x")


def compare_engines(gguf: Path) -> None:
    """Per-token cost of masking one logits row: llguidance vs llama.cpp GBNF."""
    import llama_cpp as L
    import numpy as np
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    from kodkod.backends.llamacpp.grammar import LlgCompiler
    from kodkod.backends.llamacpp.model import LlamaModel
    from kodkod.core.constraints import GrammarKind, GrammarSpec

    model = LlamaModel.load(gguf, "bench", vocab_only=True)
    try:
        compiler = LlgCompiler(model)
        t0 = time.perf_counter()
        tokenizer = compiler.tokenizer
        build_s = time.perf_counter() - t0
        story = {
            "title": "The keeper of the northern light",
            "paragraphs": ["The storm came in from the west, " * 6] * 4,
        }
        text = json.dumps(story, separators=(",", ":"))
        ids = tokenizer.tokenize_str(text)
        n = model.n_vocab
        row = np.zeros(n, dtype=np.float32)

        t0 = time.perf_counter()
        constraint = compiler.compile(GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA))).new()
        compile_llg = time.perf_counter() - t0
        t0 = time.perf_counter()
        for t in ids:
            row[:] = 0.0
            constraint.process(row, [])
            assert np.isfinite(row[t])
            constraint.accept(t)
        llg_us = (time.perf_counter() - t0) / len(ids) * 1e6

        t0 = time.perf_counter()
        gbnf = json_schema_to_gbnf(json.dumps(SCHEMA))
        sampler = L.llama_sampler_init_grammar(model.vocab, gbnf.encode(), b"root")
        compile_gbnf = time.perf_counter() - t0
        data = (L.llama_token_data * n)()
        arr = L.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
        # llama.cpp's converter allows optional spaces; feed it the text it would produce too.
        gb_text = json.dumps(story)
        gb_ids = model.tokenize(gb_text, add_bos=False, parse_special=False)
        t0 = time.perf_counter()
        for t in gb_ids:
            for i in range(n):  # a fresh candidate array, as a sampler chain would build
                data[i].id = i
                data[i].logit = 0.0
            arr.size = n
            arr.selected = -1
            L.llama_sampler_apply(sampler, ctypes.byref(arr))
            L.llama_sampler_accept(sampler, t)
        gbnf_total = (time.perf_counter() - t0) / len(gb_ids) * 1e6
        t0 = time.perf_counter()
        for _ in gb_ids:
            for i in range(n):
                data[i].id = i
                data[i].logit = 0.0
        fill_us = (time.perf_counter() - t0) / len(gb_ids) * 1e6
        L.llama_sampler_free(sampler)
    finally:
        model.close()
    print(f"grammar engines, same schema, per generated token ({len(ids)} tokens):")
    print(f"  llguidance tokenizer build (once per model): {build_s * 1e3:.0f} ms")
    print(f"  llguidance   compile {compile_llg * 1e3:6.1f} ms   mask+apply {llg_us:8.1f} us/token")
    print(
        f"  llama.cpp    compile {compile_gbnf * 1e3:6.1f} ms   apply      "
        f"{gbnf_total - fill_us:8.1f} us/token (excluding {fill_us:.0f} us of Python array fill)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running kodkod (default: start one)")
    ap.add_argument("--port", type=int, help="shorthand for --url http://127.0.0.1:PORT")
    ap.add_argument("--key", default=None, help="API key (default: the test server's)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--compare-gbnf", action="store_true")
    args = ap.parse_args()
    from tests.server import API_KEY, DEFAULT_GGUF, KodkodServer

    url = args.url or (f"http://127.0.0.1:{args.port}" if args.port else None)
    server = None
    if url is None:
        server = KodkodServer.start(
            Path(tempfile.mkdtemp(prefix="kodkod-bench-")), {"model": {"max_batch_size": 4}}
        )
        url = server.base_url
    try:
        asyncio.run(run(url, args.key or API_KEY, args.rounds, args.max_tokens))
    finally:
        if server is not None:
            server.stop()
    if args.compare_gbnf:
        compare_engines(DEFAULT_GGUF)


if __name__ == "__main__":
    main()
