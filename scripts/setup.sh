#!/usr/bin/env bash
# Idempotent environment setup shared by start.sh and test.sh.
#   scripts/setup.sh        the server (venv + package)
#   scripts/setup.sh test   also the test dependencies
# A stamp file records what was installed for which pyproject.toml, so a second run costs
# nothing. The first install compiles llama.cpp (llama-cpp-python ships as source only; about
# 5-10 minutes on 2 cores); pip caches the built wheel for later installs.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "kodkod needs Python 3.11 or newer ($PY is $("$PY" --version 2>&1))" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
want="$(sha256sum pyproject.toml | cut -c1-16)-${extra:-base}"
stamp=.venv/.kodkod-installed
if [ -f "$stamp" ] && grep -qx -- "$want" "$stamp" 2>/dev/null; then
    exit 0
fi
# Build llama.cpp for the CPU it runs on; never download prebuilt binaries.
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
target="."
[ "$extra" = "test" ] && target=".[test]"
echo "installing kodkod${extra:+ with $extra extras} (the first time compiles llama.cpp: ~5-10 min)..."
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$target"
# A 'test' install includes the base one.
{ echo "$want"; [ "$extra" = "test" ] && echo "$(sha256sum pyproject.toml | cut -c1-16)-base"; } > "$stamp"
