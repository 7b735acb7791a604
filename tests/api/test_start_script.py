"""./start.sh from a fresh clone: it creates config.yml and the keys, prints the keys, and
serves the default model; the printed api key works; a UTF-8 string round-trips through the
tokenizer. SIGTERM stops the server cleanly.

The clone borrows this checkout's .venv and models/ (symlinks), so the test exercises the
script's own steps (idempotent setup, model fetch check, config creation, key banner, serving)
without rebuilding llama.cpp; CI's run of ./test.sh on a clean clone covers the full build.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.server import REPO, free_port


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    stamp = REPO / ".venv" / ".kodkod-installed"
    if not stamp.is_file() or "-base" not in stamp.read_text():
        # without the stamp, start.sh in the clone would re-install (re-point) the shared venv
        pytest.fail("run ./test.sh (or scripts/setup.sh test) first: .venv has no install stamp")
    target = tmp_path_factory.mktemp("clone") / "kodkod"
    subprocess.run(["git", "clone", "-q", str(REPO), str(target)], check=True)
    (target / ".venv").symlink_to(REPO / ".venv", target_is_directory=True)
    (target / "models").symlink_to(REPO / "models", target_is_directory=True)
    return target


def test_start_sh_serves_with_the_printed_key(clone: Path) -> None:
    assert not (clone / "config.yml").exists() and not (clone / "api_tokens.yml").exists()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TABBY_", "KODKOD_"))}
    # one llama.cpp thread: the test process shares the machine's cores
    proc = subprocess.Popen(
        ["./start.sh", "--port", str(port), "--n-threads", "1"], cwd=clone, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lines: list[str] = []
    key = None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line:
                if proc.poll() is not None:
                    break
                continue
            lines.append(line)
            m = re.search(r"API key:\s+([0-9a-f]{32})", line)
            if m:
                key = m.group(1)
            if "Uvicorn running" in line or "Application startup complete" in line:
                break
        assert key, "".join(lines)
        assert (clone / "config.yml").is_file()
        assert (clone / "api_tokens.yml").stat().st_mode & 0o777 == 0o600
        base = f"http://127.0.0.1:{port}"
        h = {"Authorization": f"Bearer {key}"}
        r = httpx.get(f"{base}/v1/model", headers=h, timeout=30)
        assert r.status_code == 200 and r.json()["id"] == "SmolLM2-135M-Instruct"
        text = "Grüße aus Zürich 🇨🇭 — 東京 🍣"
        ids = httpx.post(f"{base}/v1/token/encode", headers=h, json={"text": text}, timeout=30).json()["tokens"]
        back = httpx.post(f"{base}/v1/token/decode", headers=h, json={"tokens": ids}, timeout=30).json()["text"]
        assert back == text
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert "Traceback" not in out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_second_start_reuses_config_and_keys(clone: Path) -> None:
    """Idempotent: existing config.yml and api_tokens.yml are kept as they are."""
    config = (clone / "config.yml").read_text()
    tokens = (clone / "api_tokens.yml").read_text()
    port = free_port()
    proc = subprocess.Popen(["./start.sh", "--port", str(port), "--n-threads", "1"], cwd=clone,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            pytest.fail("second start did not serve")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=60)
    assert (clone / "config.yml").read_text() == config
    assert (clone / "api_tokens.yml").read_text() == tokens
