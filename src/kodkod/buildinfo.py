"""The llama.cpp build record: which flags, for which CPU, the installed library was built with.

`scripts/setup.sh` builds llama-cpp-python into kodkod's own wheel cache and copies the build's
record next to the virtual environment (`<venv>/kodkod-llama-build.json`). `kodkod build-info`
prints it with llama.cpp's own report of the CPU features it was compiled with.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

RECORD_NAME = "kodkod-llama-build.json"


@dataclass(frozen=True, slots=True)
class BuildRecord:
    llama_cpp_python: str
    cmake_args: str
    machine: str
    cpu: str
    key: str  # the wheel cache key (version + flags + CPU)
    built_at: str


def record_path(prefix: Path | None = None) -> Path:
    return (prefix or Path(sys.prefix)) / RECORD_NAME


def read_record(prefix: Path | None = None) -> BuildRecord | None:
    """The record of the installed build, or None when llama-cpp-python was installed otherwise."""
    try:
        raw = json.loads(record_path(prefix).read_text(encoding="utf-8"))
        return BuildRecord(**{k: str(raw[k]) for k in BuildRecord.__slots__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe(record: BuildRecord | None) -> str:
    if record is None:
        return f"llama-cpp-python was not installed by scripts/setup.sh (no build record in {record_path()})"
    return (
        f"llama-cpp-python {record.llama_cpp_python}, built {record.built_at} for "
        f"{record.machine} ({record.cpu}) with CMAKE_ARGS: {record.cmake_args} "
        f"[wheel cache key {record.key}]"
    )
