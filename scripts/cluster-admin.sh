#!/usr/bin/env bash
# Apply an admin change to every replica of a scripts/cluster.sh cluster (docs/scaling.md).
#
#   scripts/cluster-admin.sh [--workdir DIR] load MODEL   load MODEL on each replica in turn
#   scripts/cluster-admin.sh [--workdir DIR] load --body JSON   the same with a full load request
#   scripts/cluster-admin.sh [--workdir DIR] status       the model each replica serves
#
# Admin calls that change models act on the one replica that receives them, so through HAProxy
# they would reach a single, arbitrary replica; this script calls each replica directly, one
# after the other (the others keep serving meanwhile). DIR is the cluster's directory (the
# repository by default): the replica list is DIR/.cluster/replicas, the admin key is read from
# DIR/api_tokens.yml and handed to curl on its standard input, never on a command line.
# Exits non-zero, naming the replica, when a load fails there; replicas after it are not touched.
set -euo pipefail

workdir="$(cd "$(dirname "$0")/.." && pwd)"
usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}
die() {
    echo "cluster-admin.sh: error: $*" >&2
    exit 2
}
if [ "${1:-}" = "--workdir" ]; then
    [ $# -ge 2 ] || die "--workdir needs a value"
    workdir="$2"
    shift 2
fi
[ $# -ge 1 ] || usage 2
command="$1"
shift
list="$workdir/.cluster/replicas"
[ -r "$list" ] || die "no replica list at $list (is scripts/cluster.sh running with --workdir $workdir?)"
mapfile -t replicas <"$list"
keys="$workdir/api_tokens.yml"
admin_key="$(sed -n "s/^admin_key:[[:space:]]*[\"']\{0,1\}\([0-9A-Za-z_-]*\).*/\1/p" "$keys" 2>/dev/null || true)"

call() { # method url [body]: the response body; curl fails on an HTTP error
    local args=(-sS --fail-with-body -N -m 900 -H @- -X "$1" "$2")
    [ $# -ge 3 ] && args+=(-H "Content-Type: application/json" --data-binary "$3")
    printf 'Authorization: Bearer %s\n' "$admin_key" | curl "${args[@]}"
}

case "$command" in
load)
    [ $# -ge 1 ] || die "load needs a model name (or --body JSON)"
    if [ "$1" = "--body" ]; then
        [ $# -ge 2 ] || die "--body needs a JSON object"
        body="$2"
    else
        [[ "$1" =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]] || die "not a model name: '$1'"
        body="{\"model_name\": \"$1\"}"
    fi
    for url in "${replicas[@]}"; do
        echo "cluster-admin.sh: loading on $url"
        if ! out="$(call POST "$url/v1/model/load" "$body" 2>&1)"; then
            echo "cluster-admin.sh: error: the load failed on $url: $out" >&2
            exit 1
        fi
        if grep -q '^data: {"error"' <<<"$out"; then
            echo "cluster-admin.sh: error: the load failed on $url: $(grep '^data: {"error"' <<<"$out")" >&2
            exit 1
        fi
    done
    echo "cluster-admin.sh: loaded on ${#replicas[@]} replicas"
    ;;
status)
    for url in "${replicas[@]}"; do
        printf '%s ' "$url"
        call GET "$url/v1/model" || true
        echo
    done
    ;;
-h | --help) usage 0 ;;
*) die "unknown command '$command' (load or status)" ;;
esac
