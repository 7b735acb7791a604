#!/usr/bin/env bash
# Set up everything on first run (venv, package, default model, config.yml), check that the
# llama.cpp build decodes on this CPU, then serve the default model on 127.0.0.1:5000. Extra
# arguments are server flags (e.g. ./start.sh --port 5001). Several replicas behind HAProxy:
# scripts/cluster.sh (docs/scaling.md).
set -euo pipefail
cd "$(dirname "$0")"
./scripts/prepare.sh "$@"
exec .venv/bin/kodkod "$@"
