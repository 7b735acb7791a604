"""The encoder alone (no server): inputs/s of all-MiniLM-L6-v2 by weight type, lanes and threads.

    .venv/bin/python benchmarks/encoder_weights.py [--types f16 f32 q8_0 bf16] [--lanes 2]
        [--threads 1] [--pack 63] [--pair 96] [--rounds 5] [--inputs 256]

Converts `models/all-MiniLM-L6-v2` (the Hugging Face folder) to GGUF with the server's own
converter (f16 and f32; Q8_0 and BF16 quantised from the f32 file with llama.cpp's quantize
API) into a temporary directory, loads each with `LlamaEncoder` (`--lanes` contexts of
`--threads` threads on the one model), packs the benchmark's sentences into calls as the server does (at
most `--pack` tokens, or two inputs of at most `--pair`; at most 64 inputs), runs the packs on all lanes at
once, and prints the best of `--rounds` rounds per type, and its ratio to the first type,
measured in the same run (types interleaved round by round).

To try another build of llama.cpp (e.g. one made with `-DGGML_BLAS=ON
-DGGML_BLAS_VENDOR=OpenBLAS`), point `LLAMA_CPP_LIB_PATH` at its `llama_cpp/lib` directory:
llama-cpp-python loads its libraries from there. Use a larger `--pack` then (BLAS only takes
products of at least 32 rows), and compare with a run of the default build.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import llama_cpp as L  # noqa: E402
from embeddings import EMBED_MODEL, sentences  # noqa: E402

import kodkod.backends.llamacpp.encoder as encoder_module  # noqa: E402
from kodkod.backends.llamacpp.encoder import (  # noqa: E402
    BATCH_SEQUENCES,
    PACK_TOKENS,
    PAIR_TOKENS,
    LlamaEncoder,
)
from kodkod.backends.llamacpp.quantize import quantize_model  # noqa: E402
from kodkod.models.embedding_inputs import plan_batches  # noqa: E402
from kodkod.models.hf_encoder import convert_folder  # noqa: E402
from tests.server import MODELS  # noqa: E402

QUANTISED = {"q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0, "bf16": L.LLAMA_FTYPE_MOSTLY_BF16}


def gguf_of(kind: str, tmp: Path) -> Path:
    out = tmp / f"{kind}.gguf"
    if out.exists():
        return out
    if kind in ("f16", "f32"):
        convert_folder(MODELS / EMBED_MODEL, out, f16=kind == "f16")
    else:
        status = quantize_model(gguf_of("f32", tmp), out, QUANTISED[kind], 2)
        if status != 0:
            raise SystemExit(f"llama.cpp could not write {kind} (status {status})")
    return out


def packs_of(token_lists: list[list[int]], pack: int, pair: int = 0) -> list[list[list[int]]]:
    """The inputs cut into calls as the server cuts them (`plan_batches`)."""
    plan = plan_batches([len(t) for t in token_lists], pack, BATCH_SEQUENCES, pair)
    return [token_lists[r.start : r.stop] for r in plan]


def one_round(enc: LlamaEncoder, packs: list[list[list[int]]], lanes: int) -> float:
    def work(lane: int) -> None:
        for p in packs[lane::lanes]:
            enc.embed(p, lane)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(lanes)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--types", nargs="+", default=["f16", "f32", "q8_0", "bf16"], choices=["f16", "f32", *QUANTISED]
    )
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pack", type=int, default=PACK_TOKENS)
    ap.add_argument("--pair", type=int, default=PAIR_TOKENS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--inputs", type=int, default=256)
    args = ap.parse_args()
    # the context's micro-batch must hold a whole pack
    encoder_module.MIN_BATCH_TOKENS = max(encoder_module.MIN_BATCH_TOKENS, args.pack, args.pair)
    texts = sentences(args.inputs)
    with tempfile.TemporaryDirectory(prefix="kodkod-encoder-") as tmp_dir:
        tmp = Path(tmp_dir)
        encoders = {
            k: LlamaEncoder.load(gguf_of(k, tmp), k, n_threads=args.threads, lanes=args.lanes)
            for k in args.types
        }
        try:
            first = encoders[args.types[0]]
            packs = packs_of([first.tokenize(t) for t in texts], args.pack, args.pair)
            best = dict.fromkeys(args.types, float("inf"))
            for enc in encoders.values():
                one_round(enc, packs, args.lanes)  # warm-up
            for _ in range(args.rounds):
                for kind, enc in encoders.items():
                    best[kind] = min(best[kind], one_round(enc, packs, args.lanes))
        finally:
            for enc in encoders.values():
                enc.close()
    tokens = sum(len(x) for p in packs for x in p)
    print(
        f"{args.inputs} inputs ({tokens} tokens) in {len(packs)} calls; lanes {args.lanes} × "
        f"{args.threads} threads; best of {args.rounds} rounds"
    )
    base = args.inputs / best[args.types[0]]
    for kind in args.types:
        rate = args.inputs / best[kind]
        print(f"{kind:<6}{rate:>10.1f} inputs/s{rate / base:>8.2f}×")


if __name__ == "__main__":
    main()
