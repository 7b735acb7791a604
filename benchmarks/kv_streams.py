"""One shared KV pool vs per-sequence KV streams for a batch of long chats (raw llama.cpp).

    .venv/bin/python benchmarks/kv_streams.py [--seqs 8] [--context 1000] [--steps 64] [--rounds 3]

kodkod creates its context with `kv_unified=True`: all sequences share one pool of cells, and
every decode step's attention spans the pool's occupied range (other sequences' cells are
masked, not skipped). With `kv_unified=False` llama.cpp keeps one KV stream per sequence, and
each sequence attends over its own cells only. This measures a decode step of `--seqs`
sequences that each hold `--context` tokens (a multi-turn chat's history) both ways, in
alternating rounds on the same model and threads, with flash attention on and off. Plain
argmax decoding; prints ms per step and the ratio.

`--range CELLS` adds a third layout: the one pool with its highest occupied cell at CELLS (a
filler sequence is prefilled up to there, one cell past it is kept and the filler removed), so
every query's attention visits CELLS cells while the same tokens are live — what holes left
by evicted prefixes do to a busy pool (benchmarks/chat_sessions.py --kv-debug prints the
range a chat run reaches).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

import llama_cpp as L  # noqa: E402

from kodkod.models.manager import available_threads  # noqa: E402
from tests.server import DEFAULT_GGUF  # noqa: E402


def _quiet_log(level: int, text: bytes, user_data: object) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Setup:
    unified: bool
    flash: bool
    attention_range: int = 0  # one pool: pin the highest occupied cell here (0: packed)

    @property
    def name(self) -> str:
        kv = "one pool" if self.unified else "per-seq streams"
        if self.attention_range:
            kv += f", range {self.attention_range}"
        return f"{kv}, flash attention {'on' if self.flash else 'off'}"


def _prefill(ctx: object, batch: L.llama_batch, seq: int, ids: list[int], start: int = 0) -> None:
    """Prefill `ids` into `seq` from position `start`, in chunks of 512."""
    for begin in range(0, len(ids), 512):
        chunk = ids[begin : begin + 512]
        batch.n_tokens = len(chunk)
        for i, tok in enumerate(chunk):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, start + begin + i, 1
            batch.seq_id[i][0], batch.logits[i] = seq, 0
        assert L.llama_decode(ctx, batch) == 0


def step_ms(model: object, setup: Setup, seqs: int, context: int, steps: int, threads: int) -> float:
    """Mean ms per decode step of `seqs` sequences that each hold `context` tokens."""
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    per_seq = 256 * -(-(context + steps + 8) // 256)
    n_ctx = max(per_seq * seqs, 256 * -(-(setup.attention_range + seqs * (steps + 8)) // 256))
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, 2048, 512
    cp.n_seq_max = seqs + (2 if setup.attention_range else 0)
    cp.n_threads = cp.n_threads_batch = threads
    cp.kv_unified, cp.swa_full, cp.flash_attn_type = setup.unified, True, 1 if setup.flash else 0
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(2048, 0, 1)
    try:
        for s in range(seqs):  # each sequence its own text
            _prefill(
                ctx, batch, s, [(1000 + 37 * s + 13 * i) % (n_vocab - 1000) + 500 for i in range(context)]
            )
        filler = setup.attention_range - seqs * context - 1
        if filler > 0:  # cells up to the range, one kept at its end, the rest freed again
            _prefill(ctx, batch, seqs, [600 + i % 5000 for i in range(filler)])
            _prefill(ctx, batch, seqs + 1, [700], start=filler)
            assert L.llama_memory_seq_rm(L.llama_get_memory(ctx), seqs, -1, -1)
        rows = ctypes.c_float * n_vocab
        last = [0] * seqs
        t0 = time.perf_counter()
        for step in range(steps):
            batch.n_tokens = seqs
            for s in range(seqs):
                batch.token[s], batch.pos[s], batch.n_seq_id[s] = last[s] or 198, context + step, 1
                batch.seq_id[s][0], batch.logits[s] = s, 1
            assert L.llama_decode(ctx, batch) == 0
            for s in range(seqs):
                row = rows.from_address(ctypes.addressof(L.llama_get_logits_ith(ctx, s).contents))
                last[s] = max(range(0, n_vocab, 97), key=row.__getitem__)  # cheap, CPU-light pick
        return 1000 * (time.perf_counter() - t0) / steps
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="0: every available core")
    ap.add_argument("--flash", choices=("on", "off", "both"), default="both", help="flash attention")
    ap.add_argument("--range", type=int, default=0, help="also one pool with this attention range (cells)")
    args = ap.parse_args()
    threads = args.threads or available_threads()
    L.llama_backend_init()
    quiet = L.llama_log_callback(_quiet_log)
    L.llama_log_set(quiet, None)
    model = L.llama_model_load_from_file(str(DEFAULT_GGUF).encode(), L.llama_model_default_params())
    flashes = {"on": (True,), "off": (False,), "both": (True, False)}[args.flash]
    setups = [Setup(u, f) for f in flashes for u in (True, False)]
    if args.range:
        setups += [Setup(True, f, args.range) for f in flashes]
    print(
        f"model {DEFAULT_GGUF.name}, {threads} threads, {args.seqs} sequences x {args.context} tokens, "
        f"{args.steps} decode steps, {args.rounds} rounds"
    )
    times: dict[Setup, list[float]] = {s: [] for s in setups}
    try:
        for rnd in range(args.rounds):
            for setup in setups if rnd % 2 == 0 else reversed(setups):
                times[setup].append(step_ms(model, setup, args.seqs, args.context, args.steps, threads))
                print(f"  round {rnd + 1} {setup.name:42s} {times[setup][-1]:7.1f} ms/step", flush=True)
    finally:
        L.llama_model_free(model)
    for flash in flashes:
        pool, streams = times[Setup(True, flash)], times[Setup(False, flash)]
        if args.range:
            wide = times[Setup(True, flash, args.range)]
            slower = statistics.median(a / b for a, b in zip(wide, pool, strict=True))
            print(
                f"flash attention {'on ' if flash else 'off'}: one pool with range {args.range} "
                f"{statistics.median(wide):7.1f} ms/step -> {slower:.2f}x the packed pool's time"
            )
        ratios = [a / b for a, b in zip(pool, streams, strict=True)]
        print(
            f"flash attention {'on ' if flash else 'off'}: one pool {statistics.median(pool):7.1f} ms/step, "
            f"per-seq streams {statistics.median(streams):7.1f} ms/step -> streams "
            f"{statistics.median(ratios):.2f}x faster (median of per-round ratios)"
        )


if __name__ == "__main__":
    main()
