"""What the RPC hop costs: tokens/s of the default model loaded locally vs split over 2 workers.

    .venv/bin/python benchmarks/rpc.py [--tokens 128] [--runs 3] [--threads 1]

Starts two `kodkod rpc-worker`s on loopback ports and one kodkod server (all with `--threads`
llama.cpp threads), then for each placement — local CPU only, and the layers split in equal
shares over the local CPU and both workers (`rpc_servers`) — runs `--runs` greedy requests of
`--tokens` tokens one at a time and prints the best generation speed (completion tokens over
the request's wall time, short prompt). Loopback has no network latency or bandwidth limit, so
this is the protocol's own cost (serialising each graph split and its activations through
sockets); a real network adds its round-trip time per split per token.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from kodkod.backends.llamacpp.rpc import rpc_available  # noqa: E402
from tests.backends.test_rpc import load, start_worker  # noqa: E402
from tests.server import KodkodServer  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper."


def best_tokens_per_s(server: KodkodServer, tokens: int, runs: int) -> float:
    best = 0.0
    with server.client(timeout=600) as api:
        for _ in range(runs):
            t0 = time.perf_counter()
            r = api.post(
                "/v1/completions",
                json={"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True},
            )
            elapsed_s = time.perf_counter() - t0
            r.raise_for_status()
            best = max(best, r.json()["usage"]["completion_tokens"] / elapsed_s)
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ns = ap.parse_args()
    if not rpc_available():
        print("this llama.cpp build has no RPC backend (scripts/setup.sh builds it with -DGGML_RPC=ON)")
        return 1
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        workers = [start_worker(tmp, threads=ns.threads), start_worker(tmp, threads=ns.threads)]
        server = KodkodServer.start(tmp / "server", {"model": {"n_threads": ns.threads}})
        try:
            local = best_tokens_per_s(server, ns.tokens, ns.runs)
            events = load(server, {"rpc_servers": [w.endpoint for w in workers]})
            if events[-1].get("status") != "finished":
                print(f"the RPC load failed: {events[-1]}")
                return 1
            split = best_tokens_per_s(server, ns.tokens, ns.runs)
        finally:
            server.stop()
            for w in workers:
                w.stop()
    print(f"threads per process: {ns.threads}, {ns.tokens} tokens, best of {ns.runs}")
    print(f"local CPU only:                    {local:8.1f} tokens/s")
    print(f"local CPU + 2 loopback RPC workers: {split:8.1f} tokens/s ({split / local:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
