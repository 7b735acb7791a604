"""The llama-server build helper keys its cache on kodkod's recorded llama.cpp build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks.llama_server import SERVER_FLAGS, BuildSpec, binary_path, spec_from_record

RECORDED = "-DGGML_NATIVE=ON -DGGML_RPC=ON '-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8'"


def _spec(**changes: str) -> BuildSpec:
    fields = {"llama_cpp_python": "0.3.36", "cmake_args": RECORDED, "machine": "x86_64", "cpu": "EPYC abc"}
    return BuildSpec(**(fields | changes))


def test_key_follows_flags_version_and_cpu() -> None:
    base = _spec()
    assert base.key() == _spec().key() and len(base.key()) == 16
    others = [
        _spec(cmake_args=RECORDED + " -DGGML_BLAS=ON"),
        _spec(llama_cpp_python="0.3.37"),
        _spec(cpu="EPYC def"),
        _spec(machine="aarch64"),
    ]
    assert len({base.key(), *(s.key() for s in others)}) == 5


def test_cmake_flags_are_the_recorded_ones_split_like_a_shell() -> None:
    flags = _spec().cmake_flags()
    assert flags[:3] == ["-DGGML_NATIVE=ON", "-DGGML_RPC=ON", "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8"]
    assert flags[3:] == list(SERVER_FLAGS)


def test_spec_from_the_venv_record_and_cache_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "kodkod-llama-build.json"
    record.write_text(
        json.dumps({"llama_cpp_python": "0.3.36", "cmake_args": RECORDED, "machine": "x86_64",
                    "cpu": "EPYC abc", "key": "wheelkey", "built_at": "now"}),
        encoding="utf-8",
    )  # fmt: skip
    spec = spec_from_record(record)
    assert spec == _spec()
    monkeypatch.setenv("KODKOD_CACHE_DIR", str(tmp_path / "cache"))
    assert binary_path(spec) == tmp_path / "cache" / "llama-server" / spec.key() / "llama-server"
    assert spec_from_record(tmp_path / "missing.json") is None
    record.write_text("{not json", encoding="utf-8")
    assert spec_from_record(record) is None
