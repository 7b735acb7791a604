#!/usr/bin/env bash
# Set up everything (venv, package with test extras, default and test models) and run all tests.
# Lint and format (ruff), type checks (mypy) and the import contracts (lint-imports) run first and fail
# the run; then the exit code is the test suite's. Extra arguments go to pytest (e.g. ./test.sh -k engine -x).
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh test
. .venv/bin/activate
.venv/bin/kodkod models fetch --gemma
.venv/bin/kodkod models fetch --embedding
ruff check src tests benchmarks
ruff format --check src tests benchmarks
mypy src
# One-way dependencies between packages (pyproject.toml [tool.importlinter]): a broken contract
# fails the run before any test.
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" lint-imports --no-cache
exec python -m pytest -q "$@"
