"""`kodkod check`: one decode of the model about to be served, in a child process.

`./start.sh` runs it before serving. A llama.cpp build that does not suit this CPU kills the
child with a signal; the check then says so plainly, with the build record and how to rebuild,
and exits non-zero, so no half-started server is left behind. A passing check is remembered
(per build, model file and size) in the virtual environment, so later starts skip it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kodkod.buildinfo import BuildRecord, describe, read_record

PASSED_NAME = ".kodkod-check-passed"
CHILD_MODULE = "kodkod.backends.llamacpp.smoke"


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    message: str


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _fingerprint(gguf: Path, record: BuildRecord | None) -> str:
    st = gguf.stat()
    return f"{record.key if record else 'unrecorded'}|{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}"


def _passed_file() -> Path:
    return Path(sys.prefix) / PASSED_NAME


def already_passed(gguf: Path, record: BuildRecord | None) -> bool:
    try:
        return _fingerprint(gguf, record) in _passed_file().read_text(encoding="utf-8").splitlines()
    except OSError:
        return False


def _remember(gguf: Path, record: BuildRecord | None) -> None:
    path = _passed_file()
    try:
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join([*lines[-20:], _fingerprint(gguf, record)]) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # only an optimisation: the next start checks again


def rebuild_hint(record: BuildRecord | None) -> str:
    cache = "~/.cache/kodkod/wheels/" + (record.key if record else "<key>")
    return (
        f"To rebuild llama.cpp: rm -rf {cache} .venv/.kodkod-installed, then run ./start.sh again; "
        "to change the flags, set KODKOD_CMAKE_ARGS (e.g. KODKOD_CMAKE_ARGS='-DGGML_NATIVE=OFF' "
        "for a portable build without CPU-specific kernels). See docs/build.md."
    )


def run_check(gguf: Path, timeout_s: float = 600.0) -> CheckResult:
    """Decode once with `gguf` in a child process and report what happened."""
    record = read_record()
    cmd = [sys.executable, "-m", CHILD_MODULE, str(gguf)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return CheckResult(
            False,
            f"one decode of {gguf.name} did not finish in {timeout_s:.0f} s "
            f"in a child process. Build: {describe(record)}. {rebuild_hint(record)}",
        )
    if proc.returncode == 0 and proc.stdout.startswith("ok "):
        return CheckResult(True, f"llama.cpp decodes {gguf.name} on this CPU ({proc.stdout.strip()})")
    tail = " | ".join((proc.stderr.strip().splitlines() or ["(no output)"])[-3:])
    if proc.returncode < 0:
        what = f"llama.cpp crashed ({_signal_name(proc.returncode)}) running one decode of {gguf.name}"
    else:
        what = f"one decode of {gguf.name} failed (exit code {proc.returncode}: {tail})"
    cpu = record.cpu if record else "this CPU"
    return CheckResult(
        False,
        f"{what} in a child process on {cpu}; the server was not started. "
        f"Build: {describe(record)}. {rebuild_hint(record)}",
    )


def check(gguf: Path, *, force: bool = False) -> CheckResult:
    """run_check, skipped when this build already decoded this model file."""
    record = read_record()
    crash_test = os.environ.get("KODKOD_SMOKE_CRASH") == "1"
    if not force and not crash_test and already_passed(gguf, record):
        return CheckResult(True, f"llama.cpp decodes {gguf.name} on this CPU (checked before)")
    result = run_check(gguf)
    if result.ok and not crash_test:
        _remember(gguf, record)
    return result
