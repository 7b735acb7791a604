"""scripts/setup.sh's llama.cpp flags: native kernels without AMX on x86-64.

The AMX kernels of the vendored llama.cpp fault on Intel CPUs with AMX. This machine may not
have AMX, so the test asks the compiler what the recorded flags give for an AMX CPU
(-march=sapphirerapids): no AMX macro may be defined, so llama.cpp's AMX code is not compiled.
"""

from __future__ import annotations

import platform
import shlex
import shutil
import subprocess

import pytest

from tests.server import REPO


def _flags() -> dict[str, str]:
    out = subprocess.run(
        [str(REPO / "scripts/setup.sh"), "flags"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_flags_are_native_and_keyed() -> None:
    flags = _flags()
    assert "-DGGML_NATIVE=ON" in shlex.split(flags["CMAKE_ARGS"])
    assert "-DGGML_RPC=ON" in shlex.split(flags["CMAKE_ARGS"])  # rpc_servers, kodkod rpc-worker
    assert len(flags["KEY"]) == 16


def test_user_flags_change_the_wheel_key(monkeypatch: pytest.MonkeyPatch) -> None:
    base = _flags()
    monkeypatch.setenv("KODKOD_CMAKE_ARGS", "-DGGML_BLAS=ON")
    extra = _flags()
    assert "-DGGML_BLAS=ON" in shlex.split(extra["CMAKE_ARGS"])
    assert extra["KEY"] != base["KEY"]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AMX is x86-64 only")
def test_x86_flags_compile_no_amx_kernels_even_for_an_amx_cpu() -> None:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler (the llama.cpp build needs one; this machine has none)")
    args = dict(a.split("=", 1) for a in shlex.split(_flags()["CMAKE_ARGS"]) if "=" in a)
    cflags = shlex.split(args["-DCMAKE_C_FLAGS"])

    def macros(extra: list[str]) -> str:
        return subprocess.run(
            [compiler, *extra, "-march=sapphirerapids", "-dM", "-E", "-"],
            input="",
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    assert "__AMX_INT8__" in macros([])  # the target has AMX: the check below means something
    defined = macros(cflags)
    assert "__AMX_INT8__" not in defined and "__AMX_TILE__" not in defined
    assert "__AVX512F__" in defined  # the rest of the CPU's features stay on
