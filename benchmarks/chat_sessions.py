"""Multi-user chat sessions: kodkod vs llama.cpp's llama-server on the same seeded workload.

    .venv/bin/python benchmarks/chat_sessions.py [--rounds 3] [--seed 0] [--servers kodkod,llama-server]

The workload (benchmarks/chat_workload.py): 8 users, each a 6-turn chat under one shared system
prompt, histories growing to ~1,500 tokens, the next turn sent when the previous reply has ended,
three users idle for a few seconds before some turns, plus one user who regenerates every reply
twice. Every reply is 128 tokens (greedy, EOS ignored) and goes back into that user's history as
a chat client would send it.

Both servers get the same model, chat template (the one in the GGUF), threads, flash attention,
batch sizes and KV cells: kodkod `max_seq_len` = context per user and `cache_size` = that times
the number of users; llama-server `-np <users>` and `-c` the same total (so each slot holds the
same context per user). llama-server is built once from the llama.cpp that llama-cpp-python
vendors, with kodkod's recorded build flags (benchmarks/llama_server.py; the first run builds it,
several minutes). Rounds are interleaved (kodkod, llama-server, then llama-server, kodkod, ...),
each on a freshly started server. Clients stream OpenAI chat completions over HTTP (httpx).

Printed per server: total generated tokens/s over a round's wall time, time to first token
p50/p99, inter-token p50/p99 (gaps between streamed content events), prompt tokens sent vs
computed (not found in a cache), per turn; kodkod's engine counters (steps, time in decode,
preemptions, host-tier saves/restores); each server's CPU seconds per thread over the round
(the decode threads against the HTTP side) and the client's; and the kodkod / llama-server
ratios (median over rounds). A round takes ~1-2 minutes per server on 2 cores.

`--kv-layout per_slot` gives kodkod one KV stream per slot, as llama-server has (same cells per
user). `--step-log DIR` runs kodkod with its per-step debug log on and prints where the step time
went by step kind (`--kv-debug`: also the attention range per step; benchmarks/step_log.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from benchmarks.chat_workload import Session, Workload, make_workload, messages_for  # noqa: E402
from benchmarks.llama_server import LlamaServer  # noqa: E402
from benchmarks.step_log import cpu_table, step_log_env, summarize_step_log, thread_cpu  # noqa: E402

from kodkod.models.manager import available_threads  # noqa: E402
from tests.server import DEFAULT_GGUF, KodkodServer  # noqa: E402

SERVERS = ("kodkod", "llama-server")


@dataclass(slots=True)
class RequestRecord:
    user_id: int
    turn: int
    attempt: int
    sent_s: float
    event_s: list[float] = field(default_factory=list)  # arrival of each content event
    text: str = ""
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server did not compute

    @property
    def ttft_s(self) -> float:
        return self.event_s[0] - self.sent_s


@dataclass(slots=True)
class RoundResult:
    server: str
    wall_s: float
    records: list[RequestRecord]
    counters: dict[str, float]
    cpu: str = ""  # the server's CPU time per thread over the round, and the client's

    @property
    def tokens_per_s(self) -> float:
        return sum(r.completion_tokens for r in self.records) / self.wall_s

    def ttfts(self) -> list[float]:
        return sorted(r.ttft_s for r in self.records if r.event_s)

    def gaps(self) -> list[float]:
        return sorted(b - a for r in self.records for a, b in zip(r.event_s, r.event_s[1:], strict=False))


@dataclass(frozen=True, slots=True)
class Endpoint:
    base_url: str
    headers: dict[str, str]
    counters: Callable[[], dict[str, float]]
    pid: int


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))] if values else float("nan")


async def stream_chat(client: httpx.AsyncClient, body: dict[str, object], rec: RequestRecord) -> None:
    """POST one streamed chat completion; fills `rec` with event times, text and usage."""
    parts: list[str] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:500]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    rec.event_s.append(now)
                    parts.append(content)
            usage = chunk.get("usage")
            if usage:
                rec.completion_tokens = int(usage.get("completion_tokens", 0))
                rec.prompt_tokens = int(usage.get("prompt_tokens", 0))
                details = usage.get("prompt_tokens_details") or {}
                rec.cached_tokens = int(details.get("cached_tokens", 0))
            timings = chunk.get("timings")  # llama-server: cache_n reused, prompt_n computed
            if timings and "cache_n" in timings:
                rec.cached_tokens = int(timings["cache_n"])
                rec.prompt_tokens = int(timings["cache_n"]) + int(timings.get("prompt_n", 0))
    rec.text = "".join(parts)


async def run_session(
    client: httpx.AsyncClient, workload: Workload, session: Session, records: list[RequestRecord]
) -> None:
    replies: list[str] = []
    for k, turn in enumerate(session.turns):
        if turn.idle_before_s:
            await asyncio.sleep(turn.idle_before_s)  # the user thinks; the server may do other work
        body = {
            "messages": messages_for(workload, session, k, replies),
            "max_tokens": workload.reply_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for attempt in range(1 + turn.regenerations):
            rec = RequestRecord(session.user_id, k, attempt, time.perf_counter())
            await stream_chat(client, body, rec)
            records.append(rec)
        replies.append(rec.text)


async def run_round(name: str, endpoint: Endpoint, workload: Workload) -> RoundResult:
    # a fresh connection per request: llama-server (cpp-httplib) closes kept-alive connections
    # after a streamed reply or 5 idle seconds, and a reused one then fails before any answer
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=endpoint.base_url, headers=endpoint.headers, timeout=900, limits=limits
    ) as client:
        warm = RequestRecord(-1, 0, 0, time.perf_counter())
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
        await stream_chat(client, body, warm)
        before = endpoint.counters()
        records: list[RequestRecord] = []
        cpu0, client0 = thread_cpu(endpoint.pid), time.process_time()
        t0 = time.perf_counter()
        await asyncio.gather(*(run_session(client, workload, s, records) for s in workload.sessions))
        wall_s = time.perf_counter() - t0
        cpu1, client_s = thread_cpu(endpoint.pid), time.process_time() - client0
        after = endpoint.counters()
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    cpu = f"{cpu_table(endpoint.pid, cpu0, cpu1, wall_s)}; benchmark client {client_s:.1f} s"
    return RoundResult(name, wall_s, records, delta, cpu)


def kodkod_counters(server: KodkodServer) -> Callable[[], dict[str, float]]:
    keys = (
        "steps", "decode_steps", "prefill_steps", "preemptions", "generated_tokens",
        "prompt_tokens_computed", "decode_time_s", "step_time_s", "host_cache_restores",
        "kv_compactions",
    )  # fmt: skip

    def read() -> dict[str, float]:
        engine = httpx.get(f"{server.base_url}/health", timeout=30).json().get("engine") or {}
        return {k: float(engine.get(k, 0)) for k in keys}

    return read


def llama_counters(server: LlamaServer) -> Callable[[], dict[str, float]]:
    def read() -> dict[str, float]:
        text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                if name.endswith("_total"):
                    out[name.removeprefix("llamacpp:")] = float(value)
        return out

    return read


@contextmanager
def serve(name: str, tmp: Path, args: argparse.Namespace, n_slots: int) -> Iterator[Endpoint]:
    total = args.ctx_per_user * n_slots
    if name == "kodkod":
        cfg = {
            "model": {
                "max_seq_len": args.ctx_per_user,
                "cache_size": total,
                "max_batch_size": max(n_slots, 8),
                "n_threads": args.threads,
                "kv_layout": args.kv_layout,
            },
            "memory": {"sysmem_kv_cache": args.host_cache_mb},
        }
        workdir = tmp / f"kodkod-{time.time_ns()}"
        saved = dict(os.environ)
        if args.step_log is not None:  # the engine logs every step into the server's log
            os.environ.update(step_log_env(workdir / "site", args.kv_debug, os.environ.get("PYTHONPATH", "")))
        try:
            server = KodkodServer.start(workdir, cfg)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        try:
            yield Endpoint(server.base_url, server.headers(), kodkod_counters(server), server.proc.pid)
        finally:
            server.stop()
            if args.step_log is not None:
                args.step_log.mkdir(parents=True, exist_ok=True)
                kept = args.step_log / f"kodkod-{time.strftime('%H%M%S')}.log"
                shutil.copy(server.log_path, kept)
                print(f"  kodkod step log ({kept}):\n{summarize_step_log(server.log())}", flush=True)
    else:
        llama = LlamaServer.start(
            DEFAULT_GGUF, n_parallel=n_slots, ctx_total=total, threads=args.threads, log_dir=tmp
        )
        try:
            yield Endpoint(llama.base_url, {}, llama_counters(llama), llama.proc.pid)
        finally:
            llama.stop()


def describe_round(res: RoundResult) -> str:
    ttft, gaps = res.ttfts(), res.gaps()
    prompt = sum(r.prompt_tokens for r in res.records)
    computed = prompt - sum(r.cached_tokens for r in res.records)
    return (
        f"{res.server:12s} {res.tokens_per_s:7.1f} tok/s  wall {res.wall_s:6.1f} s  "
        f"TTFT p50 {pct(ttft, 0.5) * 1000:6.0f} p99 {pct(ttft, 0.99) * 1000:6.0f} ms  "
        f"ITL p50 {pct(gaps, 0.5) * 1000:5.1f} p99 {pct(gaps, 0.99) * 1000:6.1f} ms  "
        f"prompt {prompt} computed {computed}"
    )


def per_turn_table(res: RoundResult, num_turns: int) -> str:
    """Per turn: mean prompt tokens sent and computed (not found in a cache) and the median
    TTFT of first sends; regenerations (the same request again) in a line of their own."""
    rows = []
    for k in range(num_turns):
        recs = [r for r in res.records if r.turn == k and r.attempt == 0]
        prompt = statistics.mean(r.prompt_tokens for r in recs)
        computed = statistics.mean(r.prompt_tokens - r.cached_tokens for r in recs)
        ttft = statistics.median(r.ttft_s for r in recs if r.event_s)
        rows.append(
            f"turn {k + 1}: prompt {prompt:6.0f} computed {computed:6.0f} TTFT p50 {ttft * 1000:6.0f} ms"
        )
    again = [r for r in res.records if r.attempt > 0]
    if again:
        computed = statistics.mean(r.prompt_tokens - r.cached_tokens for r in again)
        ttft = statistics.median(r.ttft_s for r in again if r.event_s)
        rows.append(f"regenerations ({len(again)}): computed {computed:6.0f} TTFT p50 {ttft * 1000:6.0f} ms")
    return "\n".join(f"    {row}" for row in rows)


def summarize(results: list[RoundResult], workload: Workload) -> None:
    med = statistics.median
    by_server = {name: [r for r in results if r.server == name] for name in SERVERS}
    figures: dict[str, dict[str, float]] = {}
    for name, rounds in by_server.items():
        if not rounds:
            continue
        figures[name] = {
            "tok_s": med(r.tokens_per_s for r in rounds),
            "ttft_p50": med(pct(r.ttfts(), 0.5) for r in rounds),
            "ttft_p99": med(pct(r.ttfts(), 0.99) for r in rounds),
            "itl_p50": med(pct(r.gaps(), 0.5) for r in rounds),
            "itl_p99": med(pct(r.gaps(), 0.99) for r in rounds),
        }
        f = figures[name]
        print(
            f"{name:12s} {f['tok_s']:7.1f} tok/s | TTFT p50 {f['ttft_p50'] * 1000:6.0f} ms p99 "
            f"{f['ttft_p99'] * 1000:6.0f} ms | inter-token p50 {f['itl_p50'] * 1000:5.1f} ms p99 "
            f"{f['itl_p99'] * 1000:6.1f} ms   (median of {len(rounds)} rounds)"
        )
        print(
            f"  per turn (last round, mean over users' first sends):\n"
            f"{per_turn_table(rounds[-1], len(workload.sessions[0].turns))}"
        )
        c = rounds[-1].counters
        if name == "kodkod":
            steps = max(1.0, c.get("steps", 0))
            print(
                f"  engine (last round): {c.get('steps', 0):.0f} steps ({c.get('prefill_steps', 0):.0f} with "
                f"prefill), {c.get('decode_time_s', 0):.1f} s in llama_decode of "
                f"{c.get('step_time_s', 0):.1f} s in steps "
                f"({1000 * c.get('decode_time_s', 0) / steps:.1f} ms "
                f"per step), prompt tokens computed {c.get('prompt_tokens_computed', 0):.0f}, preemptions "
                f"{c.get('preemptions', 0):.0f}, host tier restores {c.get('host_cache_restores', 0):.0f}"
            )
        elif c:
            print(
                f"  llama-server (last round): prompt tokens computed {c.get('prompt_tokens_total', 0):.0f}, "
                f"{c.get('n_decode_total', 0):.0f} llama_decode calls, prompt "
                f"{c.get('prompt_seconds_total', 0):.1f} s + generation "
                f"{c.get('tokens_predicted_seconds_total', 0):.1f} s"
            )
    if len(figures) == 2:
        k, ll = figures["kodkod"], figures["llama-server"]
        pairs = list(zip(by_server["kodkod"], by_server["llama-server"], strict=False))
        tput = med(a.tokens_per_s / b.tokens_per_s for a, b in pairs)
        p99 = med(pct(a.ttfts(), 0.99) / pct(b.ttfts(), 0.99) for a, b in pairs)
        print(
            f"kodkod / llama-server: throughput {tput:.2f}x (goal >= 1.5), TTFT p50 "
            f"{k['ttft_p50'] / ll['ttft_p50']:.2f}x, TTFT p99 {p99:.2f}x (goal <= 0.5), inter-token p50 "
            f"{k['itl_p50'] / ll['itl_p50']:.2f}x p99 {k['itl_p99'] / ll['itl_p99']:.2f}x "
            f"(throughput and TTFT p99: median of per-round ratios)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--servers", default=",".join(SERVERS), help="comma-separated subset of kodkod,llama-server"
    )
    ap.add_argument("--ctx-per-user", type=int, default=2048, help="context per user (KV cells per slot)")
    ap.add_argument("--host-cache-mb", type=int, default=1024, help="kodkod memory.sysmem_kv_cache")
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads of both (0: every core)")
    ap.add_argument(
        "--kv-layout", choices=("unified", "per_slot"), default="unified", help="kodkod's model.kv_layout"
    )
    ap.add_argument("--users", type=int, default=8, help="chatting users (plus one regenerating user)")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--reply-tokens", type=int, default=128)
    ap.add_argument("--json", type=Path, help="write every request record here")
    ap.add_argument(
        "--step-log", type=Path, metavar="DIR",
        help="kodkod logs every engine step; keep its logs in DIR and print where the step time went",
    )  # fmt: skip
    ap.add_argument(
        "--kv-debug", action="store_true",
        help="with --step-log: also llama.cpp's KV debug lines (attention range per ubatch; slower steps)",
    )  # fmt: skip
    args = ap.parse_args()
    args.threads = args.threads or available_threads()
    names = [n for n in args.servers.split(",") if n]
    if unknown := set(names) - set(SERVERS):
        ap.error(f"unknown servers {sorted(unknown)}")
    workload = make_workload(
        args.seed, num_users=args.users, num_turns=args.turns, reply_tokens=args.reply_tokens
    )
    n_slots = len(workload.sessions)
    print(
        f"model {DEFAULT_GGUF.name}, {args.threads} threads, {n_slots} users ({workload.num_requests} "
        f"requests of {workload.reply_tokens} tokens), {args.ctx_per_user} cells per user, "
        f"{args.ctx_per_user * n_slots} in all, kodkod kv_layout {args.kv_layout}, "
        f"{args.rounds} rounds, seed {args.seed}"
    )
    results: list[RoundResult] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        for rnd in range(args.rounds):
            for name in names if rnd % 2 == 0 else reversed(names):
                with serve(name, Path(tmp_name), args, n_slots) as endpoint:
                    res = asyncio.run(run_round(name, endpoint, workload))
                    results.append(res)
                    print(f"round {rnd + 1} {describe_round(res)}\n  {res.cpu}", flush=True)
    summarize(results, workload)
    if args.json:
        dump = [{"server": r.server, "wall_s": r.wall_s, "counters": r.counters,
                 "records": [asdict(x) for x in r.records]} for r in results]  # fmt: skip
        args.json.write_text(json.dumps(dump), encoding="utf-8")


if __name__ == "__main__":
    main()
