"""Soak: a real server under a mixed, partly hostile load for a while; does it stay whole?

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--clients 8] [--seed 0]

Starts its own server (default model, OpenAI and Kobold APIs, a small random LoRA adapter in
its lora_dir) and runs `--clients` tasks for `--minutes`, each picking, at random, one of:
streamed and non-streamed completions, chats and Kobold generations; streams dropped after a
few chunks; bad requests (NaN, out-of-range token ids, huge stop lists, NUL bytes, garbage and
deeply nested bodies, ...); and admin swaps (model unload + load, LoRA load/unload, template
and sampler-preset switches; one at a time).

Prints requests served, responses by kind (status and error type/code), every unexpected 5xx
(501 and 503 "no model loaded" are expected) with its route and body, server crashes (the
server is restarted and the run goes on), the server's RSS (VmRSS) after warm-up and at the
end, the host KV tier's bytes (/health engine.host_cache_bytes) and the RSS growth beyond the
configured host-tier budget. Exit code 1 if anything unexpected (5xx, crash) was seen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.server import DEFAULT_GGUF, DEFAULT_MODEL, KodkodServer, wait_idle  # noqa: E402

EXPECTED_5XX = {501: {"not_implemented"}, 503: {"model_not_loaded", "model_unloaded"}}
LORA_NAME = "soak"
RSS_SAMPLE_S = 15.0
TOPICS = ["the sea", "a dragon", "robots", "winter", "a small cat", "the moon", "trains"]


def bad_bodies() -> list[tuple[str, bytes]]:
    """(path, raw body) of hostile requests; every one deserves a 4xx, none a 5xx."""
    j = lambda v: json.dumps(v, allow_nan=True).encode()  # noqa: E731
    p = "/v1/completions"
    return [
        (p, j({"prompt": "hi", "temperature": float("nan"), "max_tokens": 4})),
        (p, j({"prompt": "hi", "top_p": float("inf"), "max_tokens": 4})),
        (p, j({"prompt": [-1, 5, 7], "max_tokens": 4})),
        (p, j({"prompt": [2**31 - 1], "max_tokens": 4})),
        (p, j({"prompt": [10**12], "max_tokens": 4})),
        (p, j({"prompt": "hi", "logit_bias": {"99999999": 5}, "max_tokens": 4})),
        (p, j({"prompt": "hi", "banned_tokens": [-5, 10**9], "max_tokens": 4})),
        (p, j({"prompt": "hi", "stop": ["x" * 50] * 5000, "max_tokens": 4})),
        (p, j({"prompt": "hi", "stop": ["a" * 100_000], "max_tokens": 4})),
        (p, j({"prompt": "a\x00b" * 1000, "max_tokens": 4})),
        (p, j({"prompt": "hi", "logprobs": 10**6, "max_tokens": 4})),
        (p, j({"prompt": "hi", "n": 10**6, "max_tokens": 4})),
        (p, j({"prompt": "hi", "max_tokens": -1})),
        (p, j({"prompt": "hi", "max_tokens": 2**64})),
        (p, j({"prompt": "word " * 50_000, "max_tokens": 4})),
        (p, j({"prompt": "hi", "json_schema": {"type": "nonsense"}, "max_tokens": 4})),
        (p, j({"prompt": "hi", "grammar_string": "root ::= (", "max_tokens": 4})),
        (p, j({"prompt": "hi", "regex_pattern": "(((", "max_tokens": 4})),
        (p, b"[" * 100_000 + b"]" * 100_000),
        (p, b'{"prompt": "hi", "max_tokens": NaN}'),
        (p, b"\xff\xfe not json"),
        ("/v1/chat/completions", j({"messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 4})),
        ("/v1/chat/completions", j({"messages": "nope"})),
        (
            "/v1/chat/completions",
            j(
                {
                    "messages": [{"role": "user", "content": "hi"}],
                    "top_logprobs": 10**6,
                    "logprobs": True,
                    "max_tokens": 4,
                }
            ),
        ),
        ("/v1/token/decode", j({"tokens": [-1, 2**40]})),
        ("/v1/token/encode", j({"text": "\x00" * 100_000})),
        ("/api/v1/generate", j({"prompt": "hi", "max_length": 4, "temperature": float("-inf")})),
        ("/api/extra/tokencount", j({"prompt": [1, 2, 3]})),
    ]


@dataclass(slots=True)
class Tally:
    served: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    rss_series: list[tuple[int, int]] = field(default_factory=list)  # (VmRSS, RssAnon) KiB

    def record(self, path: str, body: bytes, status: int, payload: bytes) -> None:
        self.served += 1
        code = etype = ""
        try:
            err = json.loads(payload).get("error") or {}
            code, etype = str(err.get("code", "")), str(err.get("type", ""))
        except (ValueError, AttributeError):
            pass
        self.kinds[f"{status} {etype or '-'} {code or '-'}".strip()] += 1
        if status >= 500 and code not in EXPECTED_5XX.get(status, set()):
            self.unexpected.append(f"{status} {path} <- {body[:200]!r}: {payload[:300]!r}")


@dataclass(slots=True)
class Soak:
    srv: KodkodServer
    tally: Tally
    rng: random.Random
    admin_lock: asyncio.Lock
    has_lora: bool
    lora_loaded: bool = False

    async def post(
        self, path: str, body: bytes, *, admin: bool = False, drop_after: int | None = None
    ) -> None:
        headers = {**self.srv.headers(admin), "Content-Type": "application/json"}
        try:
            async with (
                httpx.AsyncClient(base_url=self.srv.base_url, timeout=120.0) as c,
                c.stream("POST", path, content=body, headers=headers) as r,
            ):
                chunks, seen = [], 0
                async for chunk in r.aiter_bytes():
                    chunks.append(chunk)
                    seen += 1
                    if drop_after is not None and seen >= drop_after:
                        break  # closing the connection mid-stream
                payload = b"".join(chunks)
            self.tally.record(path, body, r.status_code, payload)
            for line in payload.split(b"\n"):
                if line.startswith(b'data: {"error"') and drop_after is None and b"unloaded" not in line:
                    self.tally.unexpected.append(f"stream error {path} <- {body[:200]!r}: {line[:300]!r}")
        except httpx.HTTPError as exc:
            if self.srv.proc.poll() is not None:
                return  # the watcher records the crash
            self.tally.kinds[f"client error {type(exc).__name__}"] += 1

    def generation(self, stream: bool) -> tuple[str, bytes]:
        topic = self.rng.choice(TOPICS)
        n = self.rng.choice([4, 16, 48])
        kind = self.rng.choice(["completion", "chat", "kobold"])
        if kind == "chat":
            body: dict[str, Any] = {"messages": [{"role": "user", "content": f"Tell me about {topic}."}]}
            path = "/v1/chat/completions"
        elif kind == "kobold":
            body = {"prompt": f"A story about {topic}:", "max_length": n}
            path = "/api/extra/generate/stream" if stream else "/api/v1/generate"
        else:
            body, path = {"prompt": f"A story about {topic}:"}, "/v1/completions"
        body.update(max_tokens=n, stream=stream, temperature=self.rng.choice([0, 0.7, 1.2]))
        return path, json.dumps(body).encode()

    async def admin_swap(self) -> None:
        if self.admin_lock.locked():
            return
        async with self.admin_lock:
            action = self.rng.choice(["model", "lora", "template", "preset"])
            j = lambda v: json.dumps(v).encode()  # noqa: E731
            if action == "model":
                await self.post("/v1/model/unload", b"{}", admin=True)
                await self.post("/v1/model/load", j({"model_name": DEFAULT_MODEL}), admin=True)
                self.lora_loaded = False
            elif action == "lora" and self.has_lora:
                if self.lora_loaded:
                    await self.post("/v1/lora/unload", b"{}", admin=True)
                else:
                    await self.post(
                        "/v1/lora/load", j({"loras": [{"name": LORA_NAME, "scaling": 0.5}]}), admin=True
                    )
                self.lora_loaded = not self.lora_loaded
            elif action == "template":
                await self.post(
                    "/v1/template/switch",
                    j({"prompt_template_name": self.rng.choice(["chatml", "alpaca"])}),
                    admin=True,
                )
            else:
                await self.post(
                    "/v1/sampling/override/switch",
                    j({"preset": self.rng.choice(["safe_defaults", "sample_preset"])}),
                    admin=True,
                )

    async def client(self, deadline: float, bad: list[tuple[str, bytes]]) -> None:
        while time.monotonic() < deadline:
            roll = self.rng.random()
            if roll < 0.30:
                await self.post(*self.generation(stream=True))
            elif roll < 0.55:
                await self.post(*self.generation(stream=False))
            elif roll < 0.70:
                path, body = self.generation(stream=True)
                await self.post(path, body, drop_after=self.rng.choice([1, 2, 5]))
            elif roll < 0.97:
                await self.post(*self.rng.choice(bad))
            else:
                await self.admin_swap()


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    """A memory field of /proc/<pid>/status in KiB (VmRSS, RssAnon, RssFile); 0 if gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    return 0


def health_engine(srv: KodkodServer) -> dict[str, Any]:
    return dict(httpx.get(f"{srv.base_url}/health", timeout=30).json().get("engine") or {})


def make_lora(root: Path) -> bool:
    try:
        from tests.lora_fixtures import make_adapter, write_gguf_adapter
    except ImportError:
        return False
    write_gguf_adapter(
        root / "loras" / f"{LORA_NAME}.gguf", make_adapter(DEFAULT_GGUF, seed=7, strength=0.05)
    )
    return True


async def watch(soak: Soak, root: Path, config: dict[str, Any], deadline: float) -> None:
    """Restart the server if it died (recording the crash with its log tail)."""
    restarts = 0
    next_sample = time.monotonic() + RSS_SAMPLE_S
    while time.monotonic() < deadline:
        if time.monotonic() >= next_sample:
            pid = soak.srv.proc.pid
            soak.tally.rss_series.append((rss_kib(pid), rss_kib(pid, "RssAnon")))
            next_sample += RSS_SAMPLE_S
        if soak.srv.proc.poll() is not None:
            soak.tally.crashes.append(f"exit {soak.srv.proc.returncode}:\n{soak.srv.log()[-2500:]}")
            restarts += 1
            soak.srv = await asyncio.to_thread(KodkodServer.start, root / f"restart{restarts}", config)
            soak.lora_loaded = False
        await asyncio.sleep(0.5)


async def run(soak: Soak, root: Path, config: dict[str, Any], minutes: float, clients: int) -> None:
    deadline = time.monotonic() + minutes * 60
    bad = bad_bodies()
    await asyncio.gather(
        watch(soak, root, config, deadline), *(soak.client(deadline, bad) for _ in range(clients))
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--host-cache-mb", type=int, default=1024, help="memory.sysmem_kv_cache of the server")
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        has_lora = make_lora(root / "srv")
        config = {
            "network": {"api_servers": ["OAI", "Kobold"]},
            "model": {"max_seq_len": 2048},
            "lora": {"lora_dir": str(root / "srv" / "loras")},
            "memory": {"sysmem_kv_cache": ns.host_cache_mb},
        }
        srv = KodkodServer.start(root / "srv", config)
        try:
            with srv.client() as c:  # warm-up, so start RSS includes the loaded model's working set
                c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8})
            pid0, rss0, host0 = (
                srv.proc.pid,
                rss_kib(srv.proc.pid),
                health_engine(srv).get("host_cache_bytes", 0),
            )
            anon0 = rss_kib(pid0, "RssAnon")
            soak = Soak(srv, Tally(), random.Random(ns.seed), asyncio.Lock(), has_lora)
            t0 = time.monotonic()
            asyncio.run(run(soak, root, config, ns.minutes, ns.clients))
            elapsed = time.monotonic() - t0
            srv = soak.srv
            if srv.proc.poll() is None:
                wait_idle(srv, timeout_s=60)
                with srv.client() as c:
                    ok = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8}).status_code
                stats = health_engine(srv)
                rss1, anon1 = rss_kib(srv.proc.pid), rss_kib(srv.proc.pid, "RssAnon")
            else:
                ok, stats, rss1, anon1 = 0, {}, 0, 0
            print_report(
                soak.tally, elapsed, ns, (pid0, rss0, anon0, host0), (srv.proc.pid, rss1, anon1, stats), ok
            )
            return 1 if soak.tally.unexpected or soak.tally.crashes or ok != 200 else 0
        finally:
            srv.stop()


def print_report(
    t: Tally,
    elapsed: float,
    ns: argparse.Namespace,
    start: tuple[int, int, int, int],
    end: tuple[int, int, int, dict[str, Any]],
    ok: int,
) -> None:
    pid0, rss0, anon0, host0 = start
    pid1, rss1, anon1, stats = end
    host1 = int(stats.get("host_cache_bytes", 0))
    budget_kib = ns.host_cache_mb * 1024
    print(f"soak: {elapsed / 60:.1f} min, {ns.clients} clients, seed {ns.seed}")
    print(f"requests served: {t.served} ({t.served / elapsed:.1f}/s)")
    print("responses by kind (status type code):")
    for kind, n in sorted(t.kinds.items()):
        print(f"  {n:6d}  {kind}")
    print(f"unexpected 5xx / stream errors: {len(t.unexpected)}")
    for line in t.unexpected[:30]:
        print(f"  {line}")
    print(f"server crashes: {len(t.crashes)}")
    for crash in t.crashes:
        print("  " + crash.replace("\n", "\n  "))
    same = " (a restarted process: not comparable)" if pid1 != pid0 else ""
    print(
        f"server RSS: start {rss0 / 1024:.1f} MiB, end {rss1 / 1024:.1f} MiB{same}; "
        f"RssAnon (heap, KV buffers): start {anon0 / 1024:.1f} MiB, end {anon1 / 1024:.1f} MiB"
    )
    series = ", ".join(f"{v / 1024:.0f}/{a / 1024:.0f}" for v, a in t.rss_series)
    print(
        f"RSS every {RSS_SAMPLE_S:.0f} s (VmRSS/RssAnon MiB; growth after the first samples is the "
        f"leak signal, early growth is the KV pool's pages being touched): {series}"
    )
    print(
        f"host KV tier: start {host0 / 2**20:.1f} MiB, end {host1 / 2**20:.1f} MiB "
        f"(budget {ns.host_cache_mb} MiB, {stats.get('host_cache_entries', '?')} entries)"
    )
    growth_kib = rss1 - rss0 - (host1 - host0) // 1024
    print(
        f"RSS growth not explained by the host KV tier: {growth_kib / 1024:.1f} MiB; "
        f"beyond the host-tier budget: {max(0, rss1 - rss0 - budget_kib) / 1024:.1f} MiB"
    )
    print(
        f"engine at the end: running {stats.get('running')}, waiting {stats.get('waiting')}, "
        f"free KV cells {stats.get('free_kv_cells')}/{stats.get('kv_capacity')}; "
        f"a normal completion afterwards: {ok}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
