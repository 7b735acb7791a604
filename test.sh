#!/usr/bin/env bash
# Set up everything (venv, package with test extras, default and test models) and run all tests.
# Exit code: the import contracts' check's if it fails, else the test suite's. Extra arguments go
# to pytest (e.g. ./test.sh -k engine -x).
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh test
. .venv/bin/activate
.venv/bin/kodkod models fetch --gemma
# One-way dependencies between packages (pyproject.toml [tool.importlinter]): a broken contract
# fails the run before any test.
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" lint-imports --no-cache
exec python -m pytest -q "$@"
