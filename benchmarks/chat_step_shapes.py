"""The step shapes of a multi-user chat, raw (llama.cpp alone): one shared pool vs per-sequence streams.

    .venv/bin/python benchmarks/chat_step_shapes.py [--seqs 9] [--context 1000] [--chunk 120]
        [--steps 5] [--rounds 2] [--layouts pool,streams] [--shapes decode,mixed,...]

`--seqs` sequences each hold `--context` tokens of history (one is prefilled, the others get a
copy of its KV through `llama_state_seq_set_data`: cheap, and the cells are their own). Then
each shape is decoded `--steps` times and its median wall time printed; after every step the
cells it added are removed again, so every step sees the same pool. Shapes:

* `decode`: one decode row per sequence (every user's stream advances);
* `rows-1`: the decode rows of all but the last sequence;
* `half`: the decode rows of the first half of the sequences (rounded up; with `decode`,
  `rows-1` and `one`: is one step of N rows dearer than two smaller ones?);
* `one`: the decode row of the first sequence alone;
* `verify-7`, `verify-8`: 7 or 8 tokens of every sequence (a speculative verify step of 6 or 7
  drafted tokens each; with 8 sequences 56 and 64 rows, under and at the tiled kernel's size);
* `prompt`: a `--chunk`-token chat turn of the last sequence alone (a PREFILL step);
* `mixed`: the decode rows of all but the last sequence, then its chat turn (kodkod's MIXED
  step before issue 22's chat-gap change: decode rows first, then prompt chunks);
* `prompt-first`: the same rows with the turn first.

`pool` is kodkod's context (`kv_unified=true`: every query's attention visits every live cell,
other sequences' cells masked), `streams` llama-server's with `-np` (`kv_unified=false`: each
sequence attends over its own stream). Flash attention on, as both servers run it. Compare a
MIXED step with `prompt` + `rows-1` to see what sharing a batch costs.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

import llama_cpp as L  # noqa: E402

from kodkod.models.manager import available_threads  # noqa: E402
from tests.server import DEFAULT_GGUF  # noqa: E402

Row = tuple[int, int, list[int], int]  # sequence, first position, tokens, how many last ones give logits
SHAPE_NAMES = ("decode", "rows-1", "half", "one", "verify-7", "verify-8", "prompt", "mixed", "prompt-first")


def _quiet_log(level: int, text: bytes, user_data: object) -> None:
    return None


def fill(batch: L.llama_batch, rows: list[Row]) -> None:
    i = 0
    for seq, pos, tokens, logits in rows:
        for k, tok in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos + k, 1
            batch.seq_id[i][0], batch.logits[i] = seq, 1 if k >= len(tokens) - logits else 0
            i += 1
    batch.n_tokens = i


def shapes(seqs: int, context: int, chunk: int) -> dict[str, Callable[[], list[Row]]]:
    last, turn = seqs - 1, [600 + i for i in range(chunk)]
    rows = [(s, context, [198], 1) for s in range(seqs - 1)]
    prompt = [(last, context, turn, 1)]
    return {
        "decode": lambda: [*rows, (last, context, [198], 1)],
        "rows-1": lambda: rows,
        "half": lambda: [*rows, (last, context, [198], 1)][: -(-seqs // 2)],
        "one": lambda: [*rows, (last, context, [198], 1)][:1],
        "verify-7": lambda: [(s, context, [198] * 7, 7) for s in range(seqs)],
        "verify-8": lambda: [(s, context, [198] * 8, 8) for s in range(seqs)],
        "prompt": lambda: prompt,
        "mixed": lambda: rows + prompt,
        "prompt-first": lambda: prompt + rows,
    }


def measure(model: object, unified: bool, args: argparse.Namespace, names: list[str]) -> dict[str, float]:
    """Median ms per step of each shape in `names` on a fresh context of the given layout."""
    seqs, context = args.seqs, args.context
    per_seq = 256 * -(-(context + args.chunk + 8) // 256)
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = per_seq * seqs, 2048, 512, seqs
    cp.n_threads = cp.n_threads_batch = args.threads
    cp.kv_unified, cp.swa_full, cp.flash_attn_type = unified, True, 1
    ctx = L.llama_init_from_model(model, cp)
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(2048, 0, 1)
    try:
        history = [(1000 + 13 * i) % 40000 + 500 for i in range(context)]
        for begin in range(0, context, 512):
            fill(batch, [(0, begin, history[begin : begin + 512], 0)])
            assert L.llama_decode(ctx, batch) == 0
        size = L.llama_state_seq_get_size(ctx, 0)
        state = (ctypes.c_uint8 * size)()
        assert L.llama_state_seq_get_data(ctx, state, size, 0) == size
        for s in range(1, seqs):
            assert L.llama_state_seq_set_data(ctx, state, size, s) == size
        out: dict[str, float] = {}
        table = shapes(seqs, context, args.chunk)
        for name in names:
            times = []
            for _ in range(args.steps):
                fill(batch, table[name]())
                t0 = time.perf_counter()
                assert L.llama_decode(ctx, batch) == 0
                times.append(time.perf_counter() - t0)
                for s in range(seqs):  # every step sees the same pool
                    L.llama_memory_seq_rm(mem, s, context, -1)
            out[name] = 1000 * statistics.median(times)
        return out
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", type=int, default=9)
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=120, help="tokens of the chat turn")
    ap.add_argument("--steps", type=int, default=5, help="steps per shape (median)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="0: every available core")
    ap.add_argument("--layouts", default="pool,streams")
    ap.add_argument("--shapes", default=",".join(SHAPE_NAMES))
    args = ap.parse_args()
    args.threads = args.threads or available_threads()
    names = [n for n in args.shapes.split(",") if n]
    if unknown := set(names) - set(SHAPE_NAMES):
        ap.error(f"unknown shapes {sorted(unknown)}")
    layouts = [n for n in args.layouts.split(",") if n]
    L.llama_backend_init()
    quiet = L.llama_log_callback(_quiet_log)
    L.llama_log_set(quiet, None)
    model = L.llama_model_load_from_file(str(DEFAULT_GGUF).encode(), L.llama_model_default_params())
    print(
        f"model {DEFAULT_GGUF.name}, {args.threads} threads, {args.seqs} sequences x {args.context} tokens, "
        f"chat turn {args.chunk} tokens, median of {args.steps} steps, {args.rounds} rounds"
    )
    results: dict[str, list[dict[str, float]]] = {name: [] for name in layouts}
    try:
        for rnd in range(args.rounds):
            for layout in layouts if rnd % 2 == 0 else reversed(layouts):
                res = measure(model, layout == "pool", args, names)
                results[layout].append(res)
                line = ", ".join(f"{k} {v:7.1f}" for k, v in res.items())
                print(f"  round {rnd + 1} {layout:7s}: {line} ms", flush=True)
    finally:
        L.llama_model_free(model)
    for layout, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in names}
        print(f"{layout:7s} (median of rounds): " + ", ".join(f"{k} {v:7.1f} ms" for k, v in med.items()))


if __name__ == "__main__":
    main()
