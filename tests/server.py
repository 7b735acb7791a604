"""Run a real kodkod server process for end-to-end tests.

`KodkodServer.start(...)` makes a private working directory (config.yml, api_tokens.yml with
known keys, templates/ and sampler_overrides/ copied from the repo, models/ linked to the repo's
models/), starts `python -m kodkod` on a free loopback port, and waits for /health. `stop()`
terminates it (SIGINT, then SIGKILL after a grace period) and returns its exit code. Use one
server per test module: loading a model takes a moment.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = MODELS / DEFAULT_MODEL / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_MODEL = "gemma-3-270m"
API_KEY = "0123456789abcdef0123456789abcdef"
ADMIN_KEY = "fedcba9876543210fedcba9876543210"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class KodkodServer:
    workdir: Path
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    api_key: str = API_KEY
    admin_key: str = ADMIN_KEY
    extra_args: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self, admin: bool = False) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key if admin else self.api_key}"}

    def client(self, admin: bool = False, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers(admin), timeout=timeout)

    def async_client(self, admin: bool = False, timeout: float = 120.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers=self.headers(admin), timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @classmethod
    def start(
        cls,
        tmp: Path,
        config: dict[str, Any] | None = None,
        *,
        model: str | None = DEFAULT_MODEL,
        args: list[str] | None = None,
        wait_s: float = 120.0,
        keys: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> KodkodServer:
        tmp.mkdir(parents=True, exist_ok=True)
        for name in ("templates", "sampler_overrides"):
            if not (tmp / name).exists():
                shutil.copytree(REPO / name, tmp / name)
        if not (tmp / "models").exists():
            (tmp / "models").symlink_to(MODELS, target_is_directory=True)
        port = free_port()
        # One llama.cpp thread: the test client shares the 2 cores, and llama.cpp's spinning
        # worker threads slow down badly when anything else wants a core.
        base: dict[str, Any] = {
            "network": {"host": "127.0.0.1", "port": port},
            "model": {"model_dir": "models", "model_name": model, "n_threads": 1},
        }
        cfg = deep_merge(base, config or {})
        (tmp / "config.yml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
        key_data = keys or {"api_key": API_KEY, "admin_key": ADMIN_KEY}
        tokens = tmp / "api_tokens.yml"
        tokens.write_text(yaml.safe_dump(key_data), encoding="utf-8")
        os.chmod(tokens, 0o600)
        log_path = tmp / "server.log"
        extra_env = env or {}
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for k in list(env):
            if k.startswith(("TABBY_", "KODKOD_")):
                del env[k]
        env.update(extra_env)  # the caller's additions (e.g. a step log's PYTHONPATH)
        proc = subprocess.Popen(
            [sys.executable, "-m", "kodkod", *(args or [])],
            cwd=tmp,
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        server = cls(tmp, port, proc, log_path, extra_args=list(args or []))
        server.wait_ready(wait_s)
        return server

    def wait_ready(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kodkod exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                r = httpx.get(f"{self.base_url}/health", timeout=2.0)
                if r.status_code in (200, 503):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"kodkod did not become ready in {wait_s} s:\n{self.log()[-4000:]}")

    def stop(self, grace_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


def engine_stats(server: KodkodServer) -> dict[str, Any]:
    r = httpx.get(f"{server.base_url}/health", timeout=10.0)
    return dict(r.json().get("engine") or {})


def wait_idle(server: KodkodServer, timeout_s: float = 30.0) -> dict[str, Any]:
    """Poll /health until the engine has no running or waiting request; return its stats."""
    deadline = time.monotonic() + timeout_s
    stats: dict[str, Any] = {}
    while time.monotonic() < deadline:
        stats = engine_stats(server)
        if stats.get("running") == 0 and stats.get("waiting") == 0:
            return stats
        time.sleep(0.1)
    raise AssertionError(f"engine did not go idle: {stats}")
