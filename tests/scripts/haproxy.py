"""Test helpers for scripts/cluster.sh: HAProxy from the Debian package, blocks of free ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

from tests.server import free_port


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
