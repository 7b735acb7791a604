#!/usr/bin/env bash
# Set up everything on first run (venv, package, default model, config.yml), check that the
# llama.cpp build decodes on this CPU, then serve the default model on 127.0.0.1:5000. Extra
# arguments are server flags (e.g. ./start.sh --port 5001).
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
if [ ! -e config.yml ]; then
    # Atomically: write a temp file beside it, flush it, then hard-link it into place (never
    # replaces a config.yml that appeared meanwhile, never leaves a half-written one).
    tmp="$(mktemp ./.config.yml.XXXXXX)"
    cp config_sample.yml "$tmp" && chmod 0644 "$tmp" && sync "$tmp" && { ln "$tmp" config.yml || true; }
    rm -f "$tmp"
fi
# the bundled embedding model is fetched when it is asked for on the command line
fetch_extra=""
case " $* " in
*" --embedding-model-name all-MiniLM-L6-v2 "* | *" --embedding-model-name=all-MiniLM-L6-v2 "*) fetch_extra="--embedding" ;;
esac
.venv/bin/kodkod models fetch $fetch_extra
.venv/bin/kodkod check "$@"
exec .venv/bin/kodkod "$@"
