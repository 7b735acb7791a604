"""./start.sh from a fresh clone, as a new user runs it: no .venv, no models, no config.

The clone sets up its own virtual environment (the llama.cpp wheel comes from kodkod's wheel
cache, which ./test.sh filled moments before: same version, flags and CPU), fetches the default
model, creates config.yml and the keys, prints the keys, checks one decode in a child process and
serves. The printed api key works and a completion returns text. SIGTERM stops the server
cleanly; a second start keeps config and keys; a llama.cpp build that crashes in the start-up
check stops start.sh with a clear message and no server.
"""

from __future__ import annotations

import os
import platform
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.scripts.cluster_run import ensure_haproxy, port_block
from tests.server import REPO, free_port

pytestmark = pytest.mark.model

START_DEADLINE_S = 1200.0  # a cold wheel cache means compiling llama.cpp


def _env() -> dict[str, str]:
    keep = ("KODKOD_CMAKE_ARGS", "KODKOD_CACHE_DIR")
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TABBY_", "KODKOD_", "VIRTUAL_ENV")) or k in keep
    }


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("clone") / "kodkod"
    subprocess.run(["git", "clone", "-q", str(REPO), str(target)], check=True)
    assert not (target / ".venv").exists() and not (target / "models").exists()
    return target


class Started:
    """A ./start.sh process whose output is read line by line."""

    def __init__(self, clone: Path, port: int, env: dict[str, str], command: list[str] | None = None) -> None:
        self.port = port
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            command or ["./start.sh", "--port", str(port), "--n-threads", "1"],
            cwd=clone,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def read_until(self, pattern: str, deadline_s: float) -> re.Match[str] | None:
        """Read output until a line matches (the match), or the process ends (None)."""
        deadline = time.monotonic() + deadline_s
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                if self.proc.poll() is not None:
                    return None
                continue
            self.lines.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        raise AssertionError(f"no line matching {pattern!r} in time:\n{self.output}")

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def started(clone: Path) -> Iterator[list[Started]]:
    procs: list[Started] = []
    yield procs
    for p in procs:
        p.kill()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_fresh_clone_start_sh_serves_a_completion(clone: Path, started: list[Started]) -> None:
    assert not (clone / "config.yml").exists() and not (clone / "api_tokens.yml").exists()
    run = Started(clone, free_port(), _env())
    started.append(run)
    m = run.read_until(r"API key:\s+([0-9a-f]{32})", START_DEADLINE_S)
    assert m, run.output
    key = m.group(1)
    assert run.read_until(r"Uvicorn running|Application startup complete", 600), run.output
    out = run.output
    assert "kodkod check: llama.cpp decodes SmolLM2-135M-Instruct" in out, out
    # its own venv (not a link), with the build record of the cached wheel
    venv = clone / ".venv"
    assert venv.is_dir() and not venv.is_symlink()
    assert (venv / "kodkod-llama-build.json").is_file()
    assert (clone / "models" / "SmolLM2-135M-Instruct").is_dir()
    assert (clone / "config.yml").is_file()
    assert (clone / "api_tokens.yml").stat().st_mode & 0o777 == 0o600
    base = f"http://127.0.0.1:{run.port}"
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    h = {"Authorization": f"Bearer {key}"}
    r = httpx.get(f"{base}/v1/model", headers=h, timeout=30)
    assert r.status_code == 200 and r.json()["id"] == "SmolLM2-135M-Instruct"
    r = httpx.post(
        f"{base}/v1/completions",
        headers=h,
        timeout=120,
        json={"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].strip(), r.text
    text = "Grüße aus Zürich 🇨🇭 — 東京 🍣"
    ids = httpx.post(f"{base}/v1/token/encode", headers=h, json={"text": text}, timeout=30).json()["tokens"]
    back = httpx.post(f"{base}/v1/token/decode", headers=h, json={"tokens": ids}, timeout=30).json()["text"]
    assert back == text
    run.proc.send_signal(signal.SIGTERM)
    rest, _ = run.proc.communicate(timeout=60)
    assert run.proc.returncode == 0, out + rest
    assert "Traceback" not in out + rest


def test_second_start_reuses_config_and_keys(clone: Path, started: list[Started]) -> None:
    """Idempotent: existing config.yml and api_tokens.yml are kept; setup and check are skipped."""
    config = (clone / "config.yml").read_text()
    tokens = (clone / "api_tokens.yml").read_text()
    run = Started(clone, free_port(), _env())
    started.append(run)
    assert run.read_until(r"Uvicorn running|Application startup complete", 300), run.output
    assert httpx.get(f"http://127.0.0.1:{run.port}/health", timeout=30).status_code == 200
    assert "(checked before)" in run.output and "installing kodkod" not in run.output
    os.killpg(run.proc.pid, signal.SIGINT)
    run.proc.communicate(timeout=60)
    assert (clone / "config.yml").read_text() == config
    assert (clone / "api_tokens.yml").read_text() == tokens


def test_cluster_sh_in_the_clone_serves_through_haproxy(clone: Path, started: list[Started]) -> None:
    """scripts/cluster.sh without --kodkod: start.sh's setup path, the clone's own kodkod, its
    config.yml and keys; SIGTERM stops HAProxy and the replicas."""
    ensure_haproxy()
    port = port_block(3)
    command = ["scripts/cluster.sh", "2", "--port", str(port), "--n-threads", "1"]
    run = Started(clone, port, _env(), command)
    started.append(run)
    assert run.read_until(r"kodkod cluster ready", 300), run.output
    assert "(checked before)" in run.output, run.output  # the setup ran, and found nothing to do
    key = yaml.safe_load((clone / "api_tokens.yml").read_text())["api_key"]
    r = httpx.get(f"http://127.0.0.1:{port}/v1/model", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200 and r.json()["id"] == "SmolLM2-135M-Instruct", r.text
    assert r.headers["x-kodkod-instance"].endswith((f":{port + 1}", f":{port + 2}"))
    run.proc.send_signal(signal.SIGTERM)
    rest, _ = run.proc.communicate(timeout=90)
    assert run.proc.returncode == 0, run.output + rest
    assert not any(_listening(p) for p in (port, port + 1, port + 2))


def test_a_crashing_build_stops_start_sh_with_a_clear_message(clone: Path, started: list[Started]) -> None:
    """The start-up check's child decode dies by SIGSEGV: start.sh exits non-zero, says what
    happened and how to rebuild, and never starts a server."""
    env = {**_env(), "KODKOD_SMOKE_CRASH": "1"}
    run = Started(clone, free_port(), env)
    started.append(run)
    assert run.read_until(r"Uvicorn running|Application startup complete", 300) is None
    rest, _ = run.proc.communicate(timeout=60)
    out = run.output + rest
    assert run.proc.returncode == 3, out
    assert "llama.cpp crashed (SIGSEGV) running one decode of SmolLM2-135M-Instruct" in out, out
    assert "the server was not started" in out and "To rebuild llama.cpp" in out, out
    assert "CMAKE_ARGS" in out and "Traceback" not in out, out
    assert not _listening(run.port)


def test_build_info_shows_the_recorded_flags(clone: Path) -> None:
    out = subprocess.run(
        [str(clone / ".venv/bin/kodkod"), "build-info"],
        cwd=clone,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "CMAKE_ARGS: -DGGML_NATIVE=ON" in out, out
    assert "llama.cpp system info:" in out, out
    if platform.machine() in ("x86_64", "AMD64"):
        assert "-mno-amx-int8" in out, out
        # llama.cpp's own report: no AMX kernels compiled in
        info = out.split("llama.cpp system info:", 1)[1]
        assert "AMX_INT8 = 1" not in info, info
