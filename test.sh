#!/usr/bin/env bash
# Set up everything (venv, package with test extras, default and test models) and run all tests.
# Lint (ruff) and type checks (mypy) run first and fail the run; then the exit code is the test
# suite's. Extra arguments go to pytest (e.g. ./test.sh -k engine -x).
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh test
. .venv/bin/activate
.venv/bin/kodkod models fetch --gemma
ruff check src tests benchmarks
mypy src
exec python -m pytest -q "$@"
