"""llama.cpp RPC workers end to end: two `kodkod rpc-worker`s on loopback, the default model
split over this process's CPU and both workers, greedy output token-identical to a local load;
then one worker is killed while 4 streams run: each stream ends with an error event, the server
stays up and healthy, `/health` names the worker that is gone, the engine child process is
reaped, and a reload once the worker is back (same port) generates the same tokens again. The
child is also reaped on unload and on server shutdown (no orphan processes), and a draft for
the split model loads in the server and drafts.

Skipped when the llama.cpp build has no RPC backend (scripts/setup.sh builds with
-DGGML_RPC=ON). One kodkod server for the module; each worker runs one thread.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kodkod.backends.llamacpp.rpc import rpc_available
from tests.server import DEFAULT_MODEL, KodkodServer, free_port

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(
        not rpc_available(), reason="this llama.cpp build has no RPC backend (build it with -DGGML_RPC=ON)"
    ),
]

PROMPT = "The three primary colours are"
MAX_TOKENS = 24


@dataclass
class Worker:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_worker(
    tmp: Path, *, host_args: list[str] | None = None, threads: int = 1, port: int | None = None
) -> Worker:
    """A `kodkod rpc-worker` on `port` (default: a free one), once it accepts connections."""
    port = port or free_port()
    log_path = tmp / f"worker-{port}-{time.monotonic_ns()}.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kodkod",
            "rpc-worker",
            *(host_args or []),
            "--port",
            str(port),
            "--threads",
            str(threads),
        ],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    worker = Worker(port, proc, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rpc-worker exited with {proc.returncode}: {log_path.read_text()}")
        if "listening on" in log_path.read_text(errors="replace"):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return worker
            except OSError:
                pass
        time.sleep(0.1)
    worker.stop()
    raise RuntimeError(f"rpc-worker did not listen on {port}: {log_path.read_text()}")


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Worker]]:
    tmp = tmp_path_factory.mktemp("rpc-workers")
    started = [start_worker(tmp), start_worker(tmp)]
    yield started
    for w in started:
        w.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[KodkodServer]:
    srv = KodkodServer.start(tmp_path_factory.mktemp("kodkod-rpc"))
    yield srv
    srv.stop()


def load(server: KodkodServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    body = {"model_name": DEFAULT_MODEL, **body}
    with (
        server.client(admin=True, timeout=300) as admin,
        admin.stream("POST", "/v1/model/load", json=body) as r,
    ):
        assert r.status_code == 200, r.read()
        return [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]


def greedy_tokens(server: KodkodServer) -> list[str]:
    with server.client(timeout=300) as api:
        r = api.post(
            "/v1/completions",
            json={
                "prompt": PROMPT,
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "logprobs": 1,
                "ignore_eos": True,
            },
        )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    tokens = list(choice["logprobs"]["tokens"])
    assert "".join(tokens) == choice["text"] and len(tokens) == MAX_TOKENS, choice
    return tokens


@pytest.fixture(scope="module")
def local_tokens(server: KodkodServer) -> list[str]:
    """Greedy tokens of the startup (local) load; first used before any RPC load."""
    return greedy_tokens(server)


def test_split_over_two_workers_is_token_identical_to_local(
    server: KodkodServer, workers: list[Worker], local_tokens: list[str]
) -> None:
    local = local_tokens
    endpoints = [w.endpoint for w in workers]
    events = load(server, {"rpc_servers": endpoints, "gpu_split": [1, 1, 1]})
    assert events[-1].get("status") == "finished", events[-3:]
    messages = [e["message"] for e in events if "message" in e]
    assert "rpc_servers: this machine's CPU holds 33% of the layers" in messages, messages
    for endpoint in endpoints:
        assert f"rpc_servers: RPC worker {endpoint} holds 33% of the layers" in messages, messages
    assert greedy_tokens(server) == local
    log = server.log()
    for endpoint in endpoints:  # the workers really hold layers
        assert f"(RPC worker {endpoint}): about" in log


def test_a_draft_for_a_split_model_loads_locally_and_drafts(
    server: KodkodServer, workers: list[Worker], local_tokens: list[str]
) -> None:
    """The draft (the model itself here) loads in the server process; speculative decoding
    verifies through the engine child and keeps greedy output identical."""
    body = {**rpc_body(workers), "draft_model": {"draft_model_name": DEFAULT_MODEL}}
    events = load(server, body)
    assert events[-1].get("status") == "finished", events[-3:]
    assert greedy_tokens(server) == local_tokens
    stats = httpx.get(f"{server.base_url}/health", timeout=10).json()["engine"]
    assert stats["drafted_tokens"] > 0 and stats["accepted_draft_tokens"] > 0, stats


def test_an_unreachable_worker_fails_the_load_not_the_server(
    server: KodkodServer, workers: list[Worker], tmp_path: Path
) -> None:
    gone = f"127.0.0.1:{free_port()}"  # nothing listens there
    events = load(server, {"rpc_servers": [workers[0].endpoint, gone]})
    error = events[-1].get("error") or {}
    assert f"RPC worker {gone} is not reachable" in str(error.get("message")), events[-2:]
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code in (200, 503)
    assert server.proc.poll() is None
    events = load(server, {})  # back to a local load
    assert events[-1].get("status") == "finished", events[-3:]
    assert engine_children(server.proc.pid) == []  # a local load runs in the server process
    assert len(greedy_tokens(server)) == MAX_TOKENS


def test_a_worker_beyond_loopback_warns_that_rpc_has_no_authentication(tmp_path: Path) -> None:
    worker = start_worker(tmp_path, host_args=["--host", "0.0.0.0"])
    try:
        assert "no authentication" in worker.log_path.read_text(errors="replace")
    finally:
        worker.stop()
    assert worker.proc.returncode == 0  # SIGTERM stops it cleanly


def engine_children(server_pid: int) -> list[int]:
    """Pids of the server's live engine child processes (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == server_pid and b"kodkod.backends.rpc_child.child" in cmdline:
            assert state != "Z", f"engine child {entry.name} is a zombie (not reaped)"
            found.append(int(entry.name))
    return found


def wait_for(what: str, check: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Stream:
    """One streaming completion read on its own thread: its SSE payloads, in order."""

    server: KodkodServer
    events: list[dict[str, Any]]
    first_token: threading.Event
    thread: threading.Thread | None = None

    def run(self) -> None:
        body = {"prompt": PROMPT, "max_tokens": 4000, "temperature": 0, "ignore_eos": True, "stream": True}
        with (
            self.server.client(timeout=300) as api,
            api.stream("POST", "/v1/completions", json=body) as r,
        ):
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                self.events.append({"done": True} if data == "[DONE]" else json.loads(data))
                if any(c.get("text") for c in self.events[-1].get("choices", [])):
                    self.first_token.set()
        self.first_token.set()  # ended without a token: the assertions below say so

    def start(self) -> Stream:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self


def rpc_body(workers: list[Worker]) -> dict[str, Any]:
    return {"rpc_servers": [w.endpoint for w in workers], "gpu_split": [1, 1, 1]}


def test_a_worker_that_vanishes_ends_the_streams_not_the_server(
    server: KodkodServer, workers: list[Worker], local_tokens: list[str], tmp_path: Path
) -> None:
    events = load(server, rpc_body(workers))
    assert events[-1].get("status") == "finished", events[-3:]
    [child] = engine_children(server.proc.pid)  # the RPC-backed model runs in its own process

    # features the child does not support are a clear 400, not a failure of the model
    with server.client(timeout=120) as api:
        r = api.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "loras": [{"name": "x"}]})
    assert r.status_code == 400, r.text
    assert "LoRA" in r.text

    streams = [Stream(server, [], threading.Event()).start() for _ in range(4)]
    for s in streams:
        assert s.first_token.wait(180), "a stream produced no token"
    victim, survivor = workers[1], workers[0]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    for s in streams:
        assert s.thread is not None
        s.thread.join(120)
        assert not s.thread.is_alive(), "a stream did not end after its worker vanished"
        assert any(c.get("text") for e in s.events for c in e.get("choices", [])), s.events[:2]
        error = s.events[-1].get("error")
        assert error is not None, s.events[-2:]  # the stream ends with an error event
        assert f"RPC worker {victim.endpoint} no longer accepts connections" in error["message"], error

    # the HTTP server survives; /health answers 200 and names the worker that is gone
    assert server.proc.poll() is None

    def healthy_after_unload() -> dict[str, Any] | None:
        r = httpx.get(f"{server.base_url}/health", timeout=10)
        body = r.json()
        return body if r.status_code == 200 and "unloaded" in body else None

    health = wait_for("/health to report the unloaded model", healthy_after_unload)
    assert health["status"] == "healthy", health
    assert health["unloaded"]["model"] == DEFAULT_MODEL
    assert f"RPC worker {victim.endpoint} no longer accepts connections" in health["unloaded"]["reason"]
    assert survivor.endpoint not in health["unloaded"]["reason"]
    assert not os.path.exists(f"/proc/{child}") or engine_children(server.proc.pid) == []
    with server.client(timeout=30) as api:
        r = api.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 503, r.text
    assert victim.endpoint in r.text

    # the worker comes back on the same port; a reload generates the same tokens again
    workers[1] = start_worker(tmp_path, port=victim.port)
    events = load(server, rpc_body(workers))
    assert events[-1].get("status") == "finished", events[-3:]
    assert greedy_tokens(server) == local_tokens
    health = httpx.get(f"{server.base_url}/health", timeout=10).json()
    assert health["status"] == "healthy" and "unloaded" not in health, health

    # unload reaps the child
    [child] = engine_children(server.proc.pid)
    with server.client(admin=True, timeout=120) as admin:
        assert admin.post("/v1/model/unload").status_code == 200
    wait_for("the engine child to be reaped after unload", lambda: not engine_children(server.proc.pid))
    assert not os.path.exists(f"/proc/{child}")

    # so does server shutdown
    events = load(server, rpc_body(workers))
    assert events[-1].get("status") == "finished", events[-3:]
    [child] = engine_children(server.proc.pid)
    assert server.stop() == 0
    assert not os.path.exists(f"/proc/{child}"), "the engine child outlived the server"
