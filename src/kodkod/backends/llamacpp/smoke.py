"""One real decode of a model, meant to run in a child process (`kodkod check` starts it).

    python -m kodkod.backends.llamacpp.smoke MODEL.gguf

Loads the model with a small context, decodes a short prompt and picks the most likely next
token; prints `ok <token id>` and exits 0. A llama.cpp build whose kernels do not suit this CPU
(an illegal instruction, a fault in a matrix kernel) kills this process with a signal instead,
which the parent reports. `KODKOD_SMOKE_CRASH=1` makes the decode step crash on purpose (by
SIGSEGV), so the parent's handling of a crashing build can be tested on any machine.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from kodkod.backends.llamacpp.backend import LlamaCppBackend
from kodkod.core.backend_types import BatchRow, ContextConfig, ModelSource

PROMPT = "The capital of France is"


def run(path: Path) -> int:
    """Decode PROMPT with the model at `path`; return the greedy next token id."""
    config = ContextConfig(cache_size=256, num_slots=1, batch_tokens=64, n_threads=1)
    backend = LlamaCppBackend.load(ModelSource(path, path.stem), lambda _info: config)
    try:
        ids = backend.tokenize(PROMPT, add_bos=True, parse_special=False)
        if os.environ.get("KODKOD_SMOKE_CRASH") == "1":
            os.kill(os.getpid(), signal.SIGSEGV)
        indices = backend.decode([BatchRow(0, ids, 0, 1)])
        return int(backend.logits(indices[0][-1]).argmax())
    finally:
        backend.close()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m kodkod.backends.llamacpp.smoke MODEL.gguf", file=sys.stderr)
        return 2
    token = run(Path(argv[0]))
    print(f"ok {token}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
