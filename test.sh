#!/usr/bin/env bash
# Set up everything (venv, package with test extras, default and test models) and run all tests.
# Exit code is the test suite's. Extra arguments go to pytest (e.g. ./test.sh -k engine -x).
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh test
. .venv/bin/activate
.venv/bin/kodkod models fetch --gemma
exec python -m pytest -q "$@"
