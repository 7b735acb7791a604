"""llama.cpp RPC workers end to end: two `kodkod rpc-worker`s on loopback, the default model
split over this process's CPU and both workers, greedy output token-identical to a local load.

Skipped when the llama.cpp build has no RPC backend (scripts/setup.sh builds with
-DGGML_RPC=ON). One kodkod server for the module; each worker runs one thread.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
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


def start_worker(tmp: Path, *, host_args: list[str] | None = None, threads: int = 1) -> Worker:
    """A `kodkod rpc-worker` on a free port, once it accepts connections."""
    port = free_port()
    log_path = tmp / f"worker-{port}.log"
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


def test_split_over_two_workers_is_token_identical_to_local(
    server: KodkodServer, workers: list[Worker]
) -> None:
    local = greedy_tokens(server)
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
    assert len(greedy_tokens(server)) == MAX_TOKENS


def test_a_worker_beyond_loopback_warns_that_rpc_has_no_authentication(tmp_path: Path) -> None:
    worker = start_worker(tmp_path, host_args=["--host", "0.0.0.0"])
    try:
        assert "no authentication" in worker.log_path.read_text(errors="replace")
    finally:
        worker.stop()
    assert worker.proc.returncode == 0  # SIGTERM stops it cleanly
