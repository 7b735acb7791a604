#!/usr/bin/env bash
# Set up everything on first run (venv, package, default model, config.yml), check that the
# llama.cpp build decodes on this CPU, then serve the default model on 127.0.0.1:5000. Extra
# arguments are server flags (e.g. ./start.sh --port 5001).
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
[ -f config.yml ] || cp config_sample.yml config.yml
.venv/bin/kodkod models fetch
.venv/bin/kodkod check "$@"
exec .venv/bin/kodkod "$@"
