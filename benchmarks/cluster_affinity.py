"""What session affinity and the HAProxy hop cost or save, on a running scripts/cluster.sh cluster.

    scripts/cluster.sh 2 --workdir /tmp/c ...        # in another terminal
    .venv/bin/python benchmarks/cluster_affinity.py --workdir /tmp/c [--port 5000] [--conversations 6]

1. The hop: median latency of `GET /health` straight to a replica and through HAProxy.
2. Affinity: `--conversations` two-turn chats with a long shared-nothing system prompt, run one at
   a time, once with an `X-Session-Id` per conversation and once without. For the second turns it
   reports the prompt tokens the replicas computed (the sum of their `/health`
   `prompt_tokens_computed` deltas; a continuation that lands where its prefix is cached computes
   only its new tokens) and the median time to the first streamed token.
Only requests of this script should run meanwhile: the counters are per replica, not per request.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

TOPICS = ["lighthouses", "glaciers", "violins", "beekeeping", "comets", "bridges", "tea", "owls"]


@dataclass(frozen=True, slots=True)
class TurnStats:
    computed_tokens: int
    first_token_s: list[float]


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def hop(url: str, replica: str, rounds: int) -> tuple[float, float]:
    def timed(base: str) -> list[float]:
        out = []
        with httpx.Client(base_url=base, timeout=30) as c:
            for _ in range(rounds):
                t0 = time.perf_counter()
                c.get("/health").raise_for_status()
                out.append(time.perf_counter() - t0)
        return out

    return median_ms(timed(replica)), median_ms(timed(url))


def computed(replicas: list[str]) -> int:
    return sum(
        int(httpx.get(f"{r}/health", timeout=30).json()["engine"]["prompt_tokens_computed"]) for r in replicas
    )


def first_token_s(client: httpx.Client, body: dict[str, object], headers: dict[str, str]) -> float:
    t0 = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, headers=headers) as r:
        r.raise_for_status()
        elapsed = None
        for line in r.iter_lines():
            if elapsed is None and '"content":"' in line and '"content":""' not in line:
                elapsed = time.perf_counter() - t0
    return elapsed if elapsed is not None else time.perf_counter() - t0


def conversations(url: str, replicas: list[str], key: str, count: int, sticky: bool, tag: str) -> TurnStats:
    auth = {"Authorization": f"Bearer {key}"}
    total = 0
    firsts = []
    with httpx.Client(base_url=url, timeout=300) as client:
        for i in range(count):
            topic = TOPICS[i % len(TOPICS)]
            system = f"[{tag} {i}] You are an expert on {topic}. " + " ".join(
                f"Fact {n}: {topic} are remarkable in way number {n}." for n in range(60)
            )
            headers = {**auth, **({"X-Session-Id": f"{tag}-{i}"} if sticky else {})}
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Tell me about {topic}."},
            ]
            first = client.post(
                "/v1/chat/completions",
                json={"messages": messages, "max_tokens": 24, "temperature": 0},
                headers=headers,
            )
            first.raise_for_status()
            reply = first.json()["choices"][0]["message"]["content"]
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
            before = computed(replicas)
            body = {"messages": messages, "max_tokens": 8, "temperature": 0}
            firsts.append(first_token_s(client, body, headers))
            total += computed(replicas) - before
    return TurnStats(total, firsts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, required=True, help="the cluster's --workdir")
    parser.add_argument("--port", type=int, default=5000, help="HAProxy's port")
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=200, help="requests per hop measurement")
    args = parser.parse_args()
    replicas = (args.workdir / ".cluster" / "replicas").read_text().split()
    key = str(yaml.safe_load((args.workdir / "api_tokens.yml").read_text())["api_key"]).split()[0]
    url = f"http://127.0.0.1:{args.port}"
    direct_ms, proxied_ms = hop(url, replicas[0], args.rounds)
    print(f"GET /health median: {direct_ms:.2f} ms direct, {proxied_ms:.2f} ms through HAProxy")
    tag = f"run{time.time_ns()}"  # fresh prompts: nothing cached from an earlier run
    for sticky in (True, False):
        stats = conversations(url, replicas, key, args.conversations, sticky, f"{tag}-{sticky}")
        label = "with X-Session-Id" if sticky else "without affinity"
        print(
            f"second turns {label}: {stats.computed_tokens} prompt tokens computed over "
            f"{args.conversations} conversations, first token after "
            f"{median_ms(stats.first_token_s):.0f} ms (median)"
        )


if __name__ == "__main__":
    main()
