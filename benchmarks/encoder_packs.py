"""The encoder alone (no server): inputs/s of all-MiniLM-L6-v2 by the tokens packed into one call.

    .venv/bin/python benchmarks/encoder_packs.py [--packs 96 63+96 63 48 128] [--join 1]
        [--lanes 2] [--threads 1] [--rounds 9] [--inputs 256]

Converts `models/all-MiniLM-L6-v2` to a float16 GGUF with the server's converter, loads it with
`LlamaEncoder` (`--lanes` contexts of `--threads` threads), packs the benchmark's sentences
(`--join` of them joined into one input, for longer inputs) into calls as the server does, once
per `--packs` entry: `P` is at most P tokens per call, `P+Q` also lets a call of one input take
a second when the two hold at most Q tokens (the server's packing is 63+96); at most 64 inputs
per call. Runs every packing on
all lanes at once, round by round, the packing that starts rotating each round. Prints each
packing's best and median inputs/s and the median of its in-round ratio to the first packing,
and how many of its calls reached 64 tokens: from 64 query rows llama.cpp's CPU flash attention
switches to a tiled kernel that multiplies out whole 64 x 64 tiles, masked cells included
(docs/measurements.md, "Issue 18: session 7").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from embeddings import sentences  # noqa: E402
from encoder_weights import gguf_of, one_round, packs_of  # noqa: E402

import kodkod.backends.llamacpp.encoder as encoder_module  # noqa: E402
from kodkod.backends.llamacpp.encoder import LlamaEncoder  # noqa: E402

TILED_FA_ROWS = 64


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packs", nargs="+", default=["96", "63+96", "63", "48", "128"])
    ap.add_argument("--join", type=int, default=1, help="benchmark sentences per input")
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--inputs", type=int, default=256)
    args = ap.parse_args()
    # the context's micro-batch must hold a whole pack
    specs = {p: [int(x) for x in p.split("+")] + [0] for p in dict.fromkeys(args.packs)}
    encoder_module.MIN_BATCH_TOKENS = max(
        encoder_module.MIN_BATCH_TOKENS, *(n for spec in specs.values() for n in spec)
    )
    base = sentences(args.inputs * args.join)
    texts = [" ".join(base[i * args.join : (i + 1) * args.join]) for i in range(args.inputs)]
    sizes = list(specs)
    with tempfile.TemporaryDirectory(prefix="kodkod-encoder-") as tmp_dir:
        enc = LlamaEncoder.load(
            gguf_of("f16", Path(tmp_dir)), "f16", n_threads=args.threads, lanes=args.lanes
        )
        try:
            tokens = [enc.tokenize(t) for t in texts]
            packs = {p: packs_of(tokens, specs[p][0], specs[p][1]) for p in sizes}
            for p in sizes:
                one_round(enc, packs[p], args.lanes)  # warm-up
            rates: dict[str, list[float]] = {p: [] for p in sizes}
            for r in range(args.rounds):
                shift = r % len(sizes)
                for p in sizes[shift:] + sizes[:shift]:
                    rates[p].append(args.inputs / one_round(enc, packs[p], args.lanes))
        finally:
            enc.close()
    n_tokens = sum(len(t) for t in tokens)
    print(
        f"{args.inputs} inputs ({n_tokens} tokens); lanes {args.lanes} × {args.threads} threads; "
        f"{args.rounds} rounds"
    )
    print("  pack   calls  calls>=64   best inputs/s   median   in-round ratio")
    first = sizes[0]
    for p in sizes:
        ratio = statistics.median(a / b for a, b in zip(rates[p], rates[first], strict=True))
        wide = sum(sum(len(x) for x in call) >= TILED_FA_ROWS for call in packs[p])
        print(
            f"{p:>6} {len(packs[p]):>7} {wide:>10} {max(rates[p]):>15.1f} "
            f"{statistics.median(rates[p]):>8.1f} {ratio:>16.3f}"
        )


if __name__ == "__main__":
    main()
