"""Start-up problems end with one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server import MODELS, free_port

pytestmark = pytest.mark.model


def run_kodkod(
    cwd: Path, config: str | None, tokens: str | None, *args: str
) -> subprocess.CompletedProcess[str]:
    if config is not None:
        (cwd / "config.yml").write_text(config, encoding="utf-8")
    if tokens is not None:
        (cwd / "api_tokens.yml").write_text(tokens, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TABBY_", "KODKOD_"))}
    return subprocess.run(
        [sys.executable, "-m", "kodkod", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]


GOOD_TOKENS = "api_key: 0123456789abcdef0123456789abcdef\nadmin_key: fedcba9876543210fedcba9876543210\n"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "models").symlink_to(MODELS, target_is_directory=True)
    return tmp_path


@pytest.mark.parametrize(
    ("config", "expect"),
    [
        ("model:\n  model_dir: models\n  max_seq_len: [oops\n", "invalid YAML"),
        ("network:\n  port: not-a-port\nmodel:\n  model_dir: models\n", "network.port"),
        ("model:\n  model_dir: no/such/dir\n", "model_dir"),
        ("- just\n- a list\n", "config.yml"),
    ],
    ids=["broken-yaml", "wrong-type", "missing-model-dir", "not-a-mapping"],
)
def test_bad_config_is_one_clear_line(workdir: Path, config: str, expect: str) -> None:
    proc = run_kodkod(workdir, config, GOOD_TOKENS)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert expect in lines[0]


@pytest.mark.parametrize(
    "tokens",
    ["api_key: [unclosed\n", "api_key: abc\n", "admin_key: abc\napi_key: 5\n"],
    ids=["broken-yaml", "missing-admin-key", "wrong-type"],
)
def test_bad_api_tokens_is_one_clear_line(workdir: Path, tokens: str) -> None:
    proc = run_kodkod(workdir, "model:\n  model_dir: models\n", tokens)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert "api_tokens.yml" in lines[0]


def test_unknown_startup_model_exits_clearly(workdir: Path) -> None:
    proc = run_kodkod(workdir, "model:\n  model_dir: models\n  model_name: NoSuchModel\n", GOOD_TOKENS)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert any("NoSuchModel" in ln for ln in error_lines(proc)), proc.stderr


def test_unknown_key_is_only_a_warning(workdir: Path) -> None:
    """An unknown key does not stop the server: it starts, then we stop it."""
    port = free_port()
    (workdir / "config.yml").write_text(
        f"network:\n  port: {port}\n  colour: blue\nmodel:\n  model_dir: models\n", encoding="utf-8"
    )
    (workdir / "api_tokens.yml").write_text(GOOD_TOKENS, encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kodkod"],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        import time

        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("server did not start")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "network.colour" in out
