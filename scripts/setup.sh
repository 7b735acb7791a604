#!/usr/bin/env bash
# Idempotent environment setup shared by start.sh and test.sh.
#   scripts/setup.sh        the server (venv + package)
#   scripts/setup.sh test   also the test dependencies
#   scripts/setup.sh flags  print the llama.cpp CMake arguments and the wheel cache key, nothing else
# A stamp file records what was installed for which pyproject.toml and which llama.cpp build, so
# a second run costs nothing.
#
# llama-cpp-python ships as source only: its llama.cpp is compiled here, for this CPU
# (-march=native), with AMX turned off on x86-64 (the vendored AMX kernels fault on some Intel
# CPUs; see docs/build.md). The wheel goes into kodkod's own cache outside the clone,
# ~/.cache/kodkod/wheels/<key>/, keyed by the llama-cpp-python version, the exact CMake flags and
# the CPU, so a fresh clone on the same machine reuses it and a wheel built with other flags or
# for another CPU is never picked up (pip's own wheel cache ignores CMAKE_ARGS, so it is bypassed).
# KODKOD_CMAKE_ARGS adds flags (e.g. -DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS, -DGGML_VULKAN=ON).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "kodkod needs Python 3.11 or newer ($PY is $("$PY" --version 2>&1))" >&2
    exit 1
fi

llama_version="$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml)"
[ -n "$llama_version" ] || { echo "setup: no llama-cpp-python pin in pyproject.toml" >&2; exit 1; }
machine="$(uname -m)"
cflags=""
case "$machine" in
    x86_64|amd64|i?86) cflags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;;
esac
cmake_args="-DGGML_NATIVE=ON -DGGML_RPC=ON"
# quoted: scikit-build-core splits CMAKE_ARGS like a shell
[ -n "$cflags" ] && cmake_args="$cmake_args '-DCMAKE_C_FLAGS=$cflags' '-DCMAKE_CXX_FLAGS=$cflags'"
[ -n "${KODKOD_CMAKE_ARGS:-}" ] && cmake_args="$cmake_args ${KODKOD_CMAKE_ARGS}"
cpu_model="$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo 2>/dev/null | head -n1)"
cpu_flags="$(sed -n 's/^\(flags\|Features\)[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo 2>/dev/null | head -n1)"
cpu_id="${cpu_model:-$machine} $(printf '%s' "$cpu_flags" | sha256sum | cut -c1-12)"
build_key="$(printf '%s\n%s\n%s\n%s\n' "$llama_version" "$cmake_args" "$machine" "$cpu_id" | sha256sum | cut -c1-16)"
if [ "$extra" = "flags" ]; then
    printf 'CMAKE_ARGS=%s\nKEY=%s\n' "$cmake_args" "$build_key"
    exit 0
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
want="$(sha256sum pyproject.toml | cut -c1-16)-$build_key-${extra:-base}"
stamp=.venv/.kodkod-installed
if [ -f "$stamp" ] && grep -qx -- "$want" "$stamp" 2>/dev/null; then
    exit 0
fi

cache_root="${KODKOD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kodkod}"
wheel_dir="$cache_root/wheels/$build_key"
mkdir -p "$cache_root/wheels"
chmod 700 "$cache_root" "$cache_root/wheels" 2>/dev/null || true
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama.cpp (llama-cpp-python $llama_version) for this CPU: ~5-10 min the first time"
    echo "  CMAKE_ARGS: $cmake_args"
    tmp_dir="$(mktemp -d "$cache_root/wheels/.build-XXXXXX")"
    trap 'rm -rf "$tmp_dir"' EXIT
    export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
    CMAKE_ARGS="$cmake_args" .venv/bin/python -m pip wheel -q --disable-pip-version-check \
        --no-cache-dir --no-deps --no-binary llama-cpp-python \
        -w "$tmp_dir" "llama-cpp-python==$llama_version"
    .venv/bin/python - "$tmp_dir/build.json" "$llama_version" "$cmake_args" "$machine" "$cpu_id" "$build_key" <<'EOF'
import json, sys, time
path, version, cmake_args, machine, cpu, key = sys.argv[1:]
record = {"llama_cpp_python": version, "cmake_args": cmake_args, "machine": machine,
          "cpu": cpu, "key": key, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
with open(path, "w") as f:
    json.dump(record, f, indent=1)
EOF
    rm -rf "$wheel_dir"
    mv "$tmp_dir" "$wheel_dir"
    trap - EXIT
fi
# The wheel first (so pip never builds llama-cpp-python itself), then the package.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --force-reinstall \
    "$wheel_dir"/llama_cpp_python-*.whl
cp "$wheel_dir/build.json" .venv/kodkod-llama-build.json
target="."
[ "$extra" = "test" ] && target=".[test]"
echo "installing kodkod${extra:+ with $extra extras}..."
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$target"
# A 'test' install includes the base one.
if [ "$extra" = "test" ]; then
    printf '%s\n%s\n' "$want" "$(sha256sum pyproject.toml | cut -c1-16)-$build_key-base" > "$stamp"
else
    printf '%s\n' "$want" > "$stamp"
fi
