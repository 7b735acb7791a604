"""Running scripts/cluster.sh in tests: HAProxy from the Debian package, blocks of free ports, a
prepared working directory, and the running cluster whose output is read line by line."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.server import ADMIN_KEY, API_KEY, DEFAULT_MODEL, MODELS, REPO, free_port

CLUSTER_SH = REPO / "scripts" / "cluster.sh"
START_DEADLINE_S = 300.0


def ensure_haproxy() -> None:
    """Install HAProxy with apt-get when running as root; skip the test (saying why) otherwise."""
    if shutil.which("haproxy"):
        return
    if os.geteuid() != 0:
        pytest.skip("HAProxy is not installed and the tests do not run as root: apt-get install haproxy")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, env=env)
    subprocess.run(
        ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-qq", "haproxy"],
        check=True,
        capture_output=True,
        env=env,
    )
    assert shutil.which("haproxy"), "apt-get installed haproxy, yet it is not on PATH"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_block(count: int) -> int:
    """A port P with P … P+count-1 all free on loopback."""
    for _ in range(50):
        base = free_port()
        if base + count <= 65536 and all(port_free(base + i) for i in range(count)):
            return base
    raise AssertionError("no block of free ports")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("TABBY_", "KODKOD_"))}


@dataclass
class Cluster:
    """A running scripts/cluster.sh whose output is collected line by line."""

    workdir: Path
    port: int
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    eof: bool = False

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.eof = True
            self.changed.notify_all()

    @property
    def output(self) -> str:
        with self.changed:
            return "".join(self.lines)

    def wait_line(self, pattern: str, deadline_s: float) -> re.Match[str]:
        deadline = time.monotonic() + deadline_s
        with self.changed:
            while True:
                for line in self.lines:
                    if m := re.search(pattern, line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    raise AssertionError(f"no line matching {pattern!r}:\n{''.join(self.lines)}")
                self.changed.wait(min(left, 1.0))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def replica_pid(self, index: int) -> int:
        return int(self.wait_line(rf"replica {index} on 127\.0\.0\.1:\d+, pid (\d+)", 1).group(1))

    def haproxy_pid(self) -> int:
        return int(self.wait_line(r"HAProxy on \S+, pid (\d+)", 1).group(1))


def processes_under(workdir: Path) -> list[str]:
    """Processes running in `workdir` or naming it on their command line (replicas, HAProxy)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if str(workdir) in cmdline or cwd == str(workdir):
            found.append(f"{entry.name}: {cmdline}")
    return found


def prepare_workdir(workdir: Path, *, keys: bool) -> Path:
    """config.yml, templates, models and (with `keys`) a key file; returns the kodkod program."""
    for name in ("templates", "sampler_overrides"):
        shutil.copytree(REPO / name, workdir / name)
    (workdir / "models").symlink_to(MODELS, target_is_directory=True)
    config = {"model": {"model_dir": "models", "model_name": DEFAULT_MODEL, "n_threads": 1}}
    (workdir / "config.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    if keys:
        tokens = workdir / "api_tokens.yml"
        tokens.write_text(yaml.safe_dump({"api_key": API_KEY, "admin_key": ADMIN_KEY}), encoding="utf-8")
        tokens.chmod(0o600)
    # the kodkod under test: this checkout's source with the test's interpreter
    program = workdir / "kodkod"
    program.write_text(f'#!/bin/sh\nexec {sys.executable} -m kodkod "$@"\n', encoding="utf-8")
    program.chmod(0o755)
    return program


@contextmanager
def running_cluster(workdir: Path, replicas: int, *, keys: bool, args: list[str]) -> Iterator[Cluster]:
    """scripts/cluster.sh started as a user would (its own session, like a terminal's job)."""
    ensure_haproxy()
    program = prepare_workdir(workdir, keys=keys)
    port = port_block(replicas + 1)
    command = [str(CLUSTER_SH), str(replicas), "--port", str(port), "--workdir", str(workdir)]
    proc = subprocess.Popen(
        [*command, "--kodkod", str(program), *args],
        cwd=REPO,
        env={**clean_env(), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    c = Cluster(workdir, port, proc)
    try:
        c.wait_line(r"kodkod cluster ready", START_DEADLINE_S)
        yield c
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
