"""Load time and memory of the default model for each cache mode, through the real server.

    .venv/bin/python benchmarks/load_cache_modes.py [--repeats 3] [--max-seq-len N] [--n-threads N]

Starts a kodkod server with no model, loads and unloads once to warm up (first-load imports and
allocations are not the cache's), then for each cache mode loads the default model through
`/v1/model/load` (timing the SSE stream from request to the `finished` event), generates a few
tokens, reads the server's VmRSS from /proc, unloads, and reads VmRSS again. Prints a Markdown
table: median load time, RSS with the model loaded, what the load added to the baseline, and
what was left after unloading. Numbers depend on the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.server import DEFAULT_MODEL, KodkodServer  # noqa: E402

MODES = ("FP16", "Q8", "Q6", "Q4", "8,4")


def vmrss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line")


def load(server: KodkodServer, body: dict[str, object]) -> float:
    t0 = time.perf_counter()
    with server.client(admin=True, timeout=600) as c, c.stream("POST", "/v1/model/load", json=body) as r:
        r.raise_for_status()
        last = None
        for line in r.iter_lines():
            if line.startswith("data:"):
                last = json.loads(line[5:])
    elapsed = time.perf_counter() - t0
    if not last or last.get("status") != "finished":
        raise RuntimeError(f"load did not finish: {last}")
    return elapsed


def unload(server: KodkodServer) -> None:
    with server.client(admin=True) as c:
        c.post("/v1/model/unload")
    time.sleep(0.2)


def run(repeats: int, max_seq_len: int | None, n_threads: int | None) -> list[dict[str, object]]:
    config: dict[str, object] = {"model": {"n_threads": n_threads} if n_threads else {}}
    with tempfile.TemporaryDirectory(prefix="kodkod-bench-") as tmp:
        server = KodkodServer.start(Path(tmp), config, model=None)
        try:
            pid = server.proc.pid
            base_body: dict[str, object] = {"model_name": DEFAULT_MODEL}
            if max_seq_len:
                base_body["max_seq_len"] = max_seq_len
            load(server, base_body)  # warm-up
            unload(server)
            rows = []
            for mode in MODES:
                times, loaded, added, left = [], [], [], []
                types: object = None
                for _ in range(repeats):
                    before = vmrss_mb(pid)
                    times.append(load(server, {**base_body, "cache_mode": mode}))
                    with server.client() as c:
                        c.post(
                            "/v1/completions", json={"prompt": "Hello", "max_tokens": 4}
                        ).raise_for_status()
                        p = c.get("/v1/model").json()["parameters"]
                    types = f"{p['cache_types'][0]}/{p['cache_types'][1]}"
                    after_load = vmrss_mb(pid)
                    unload(server)
                    loaded.append(after_load)
                    added.append(after_load - before)
                    left.append(vmrss_mb(pid) - before)
                rows.append(
                    {
                        "mode": mode,
                        "types": types,
                        "ctx": p["cache_size"],
                        "load_s": statistics.median(times),
                        "rss": statistics.median(loaded),
                        "added": statistics.median(added),
                        "left": statistics.median(left),
                    }
                )
        finally:
            server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seq-len", type=int, default=None, help="default: the model's own")
    parser.add_argument("--n-threads", type=int, default=None)
    args = parser.parse_args()
    rows = run(args.repeats, args.max_seq_len, args.n_threads)
    print(
        f"{DEFAULT_MODEL}, cache of {rows[0]['ctx']} tokens, median of {args.repeats} loads, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| cache_mode | llama.cpp K/V | load time (s) | RSS loaded (MB) | added by load (MB) "
        "| left after unload (MB) |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['types']} | {r['load_s']:.2f} | {r['rss']:.0f} "
            f"| {r['added']:.0f} | {r['left']:.1f} |"
        )


if __name__ == "__main__":
    main()
