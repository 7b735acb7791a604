#!/usr/bin/env bash
# Everything ./start.sh does before it serves, shared with scripts/cluster.sh: set up the venv and
# package (scripts/setup.sh), create config.yml from config_sample.yml if there is none, fetch the
# default model, and check that the llama.cpp build decodes on this CPU. Arguments are server
# flags (the check loads the model they select).
set -euo pipefail
cd "$(dirname "$0")/.."
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
