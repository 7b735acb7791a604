#!/usr/bin/env bash
# Serve N kodkod replicas behind HAProxy on this machine (docs/scaling.md).
#
#   scripts/cluster.sh N [--port P] [--bind ADDR] [--host-name NAME]... [--workdir DIR]
#                        [--kodkod PROGRAM] [--wait-s S] [server flags...]
#
# HAProxy listens on ADDR:P (127.0.0.1:5000 by default) and balances over N kodkod processes on
# 127.0.0.1:P+1 ... P+N, which share one api_tokens.yml and one config.yml (those in DIR, the
# repository by default: the replicas run there). Other arguments are server flags for every
# replica (e.g. --model-name X --n-threads 2). Without --kodkod, the setup ./start.sh does runs
# first (venv, config.yml, default model, the decode check), so a fresh clone works; --kodkod
# names an installed kodkod program to run instead, and skips that setup.
# The replicas admit the Host names clients use to reach HAProxy: every --host-name, or by
# default this machine's host name, localhost and ADDR.
# Prints one line once every replica and HAProxy answer /health; SIGTERM or Ctrl-C stops them all
# (exit status 0).
# A replica that exits is reported and left out (HAProxy routes around it); if HAProxy or every
# replica exits, the rest are stopped and the script exits non-zero.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
STOP_GRACE_S=30

usage() {
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}
die() {
    echo "cluster.sh: error: $*" >&2
    exit 2
}

[ $# -ge 1 ] || usage 2
case "$1" in -h | --help) usage 0 ;; esac
replicas="$1"
shift
[[ "$replicas" =~ ^[0-9]+$ ]] && [ "$replicas" -ge 1 ] && [ "$replicas" -le 64 ] ||
    die "the first argument is the number of replicas (1 to 64), got '$replicas'"

port=5000
bind=127.0.0.1
host_names=()
workdir="$REPO"
kodkod=""
wait_s=600
server_args=()
while [ $# -gt 0 ]; do
    case "$1" in
    --port | --bind | --host-name | --workdir | --kodkod | --wait-s)
        [ $# -ge 2 ] || die "$1 needs a value"
        case "$1" in
        --port) port="$2" ;;
        --bind) bind="$2" ;;
        --host-name) host_names+=("$2") ;;
        --workdir) workdir="$2" ;;
        --kodkod) kodkod="$2" ;;
        --wait-s) wait_s="$2" ;;
        esac
        shift 2
        ;;
    --host | --host=* | --allowed-hosts | --allowed-hosts=* | --port=*)
        die "$1 is set by cluster.sh (use --bind for HAProxy's address, --host-name for the names clients use)"
        ;;
    -h | --help) usage 0 ;;
    *)
        server_args+=("$1")
        shift
        ;;
    esac
done
[[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ $((port + replicas)) -le 65535 ] ||
    die "--port must leave room for $replicas replica ports after it (got '$port')"
[[ "$wait_s" =~ ^[0-9]+$ ]] || die "--wait-s takes whole seconds, got '$wait_s'"

if ! command -v haproxy >/dev/null; then
    echo "cluster.sh: HAProxy is not installed. On Debian/Ubuntu: sudo apt-get install haproxy" >&2
    echo "            (Fedora: sudo dnf install haproxy; macOS: brew install haproxy)" >&2
    exit 3
fi
command -v curl >/dev/null || die "curl is needed for the health checks (apt-get install curl)"

if [ ${#host_names[@]} -eq 0 ]; then
    host_names=("$(uname -n)" localhost)
    case "$bind" in 0.0.0.0 | :: | "*" | 127.* | localhost) ;; *) host_names+=("$bind") ;; esac
fi

if [ -z "$kodkod" ]; then
    "$REPO/scripts/prepare.sh" "${server_args[@]}"
    kodkod="$REPO/.venv/bin/kodkod"
fi
mkdir -p "$workdir"
cd "$workdir"

# A busy port would make kodkod move to the next one, which is another replica's.
for ((p = port; p <= port + replicas; p++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        die "port $p is already in use on 127.0.0.1 (choose another --port)"
    fi
done

state_dir="$workdir/.cluster"
log_dir="$state_dir/logs"
# owner only: a replica that creates api_tokens.yml prints the new keys into its log
(umask 077 && mkdir -p "$log_dir")
chmod 700 "$state_dir" "$log_dir"
config="$state_dir/haproxy.cfg"
{
    cat "$REPO/deploy/haproxy.cfg"
    for ((i = 1; i <= replicas; i++)); do
        echo "    server r$i 127.0.0.1:$((port + i))"
    done
} >"$config"
for ((i = 1; i <= replicas; i++)); do echo "http://127.0.0.1:$((port + i))"; done >"$state_dir/replicas"
export CLUSTER_BIND="$bind" CLUSTER_PORT="$port" CLUSTER_BUFSIZE="${CLUSTER_BUFSIZE:-65536}"
haproxy -q -c -f "$config" || die "HAProxy refused $config"

pids=()   # replicas first, HAProxy last once started
labels=()
logs=()
ticker="" # the pid of the `sleep` the main loop waits on

stop_all() {
    set +e # a process that is already gone must not end the clean-up half way
    trap '' INT TERM
    local pid deadline alive
    [ -n "$ticker" ] && kill "$ticker" 2>/dev/null
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    deadline=$((SECONDS + STOP_GRACE_S))
    while :; do
        alive=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        [ ${#alive[@]} -eq 0 ] && break
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "cluster.sh: still running after ${STOP_GRACE_S} s, killing: ${alive[*]}" >&2
            kill -KILL "${alive[@]}" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    wait 2>/dev/null || true
}
trap 'stop_all' EXIT
trap 'exit 0' INT TERM # a requested stop: the EXIT trap stops everything

for ((i = 1; i <= replicas; i++)); do
    p=$((port + i))
    "$kodkod" "${server_args[@]}" --host 127.0.0.1 --port "$p" --allowed-hosts "${host_names[@]}" \
        >"$log_dir/replica-$i.log" 2>&1 &
    pids+=($!)
    labels+=("replica $i (127.0.0.1:$p)")
    logs+=("$log_dir/replica-$i.log")
    echo "cluster.sh: replica $i on 127.0.0.1:$p, pid $!, log $log_dir/replica-$i.log"
done

healthy() { # url: does GET url/health answer 200?
    curl -s -o /dev/null -m 2 -w '%{http_code}' -H 'Host: localhost' "$1/health" 2>/dev/null | grep -qx 200
}
check_alive() {
    local k
    for k in "${!pids[@]}"; do
        kill -0 "${pids[$k]}" 2>/dev/null && continue
        echo "cluster.sh: error: ${labels[$k]} exited during start-up; the end of its log:" >&2
        tail -n 20 "${logs[$k]}" >&2
        exit 1
    done
}

deadline=$((SECONDS + wait_s))
for ((i = 1; i <= replicas; i++)); do
    until healthy "http://127.0.0.1:$((port + i))"; do
        check_alive
        [ "$SECONDS" -lt "$deadline" ] || { echo "cluster.sh: error: replica $i not healthy in $wait_s s" >&2; exit 1; }
        sleep 0.5
    done
done

haproxy -db -f "$config" >"$log_dir/haproxy.log" 2>&1 &
pids+=($!)
labels+=("HAProxy ($bind:$port)")
logs+=("$log_dir/haproxy.log")
echo "cluster.sh: HAProxy on $bind:$port, pid $!, log $log_dir/haproxy.log"
case "$bind" in 0.0.0.0 | "*") probe=127.0.0.1 ;; ::) probe="[::1]" ;; *:*) probe="[$bind]" ;; *) probe="$bind" ;; esac
until healthy "http://$probe:$port"; do
    check_alive
    [ "$SECONDS" -lt "$deadline" ] || { echo "cluster.sh: error: HAProxy not answering in $wait_s s" >&2; exit 1; }
    sleep 0.2
done

echo "kodkod cluster ready: http://$probe:$port balances $replicas replicas on 127.0.0.1:$((port + 1))-$((port + replicas)) (keys in $workdir/api_tokens.yml, logs in $log_dir)"

# Supervise: report replicas that exit; stop everything if HAProxy or every replica is gone.
# Ctrl-C reaches the whole job at once, and the replicas may be gone before this shell runs its
# INT trap: a replica or HAProxy that exited with status 0 was asked to stop, so when all of
# them went that way this is a stop, not a failure.
gone=()
failed=0
while :; do
    sleep 1 &
    ticker=$!
    wait "$ticker" || true
    ticker=""
    running=0
    for ((k = 0; k < replicas; k++)); do
        if kill -0 "${pids[$k]}" 2>/dev/null; then
            running=$((running + 1))
        elif [ -z "${gone[$k]:-}" ]; then
            gone[$k]=1
            status=0
            wait "${pids[$k]}" 2>/dev/null || status=$?
            [ "$status" -eq 0 ] || failed=1
            echo "cluster.sh: ${labels[$k]} exited (status $status); HAProxy sends its traffic to the others" >&2
        fi
    done
    if ! kill -0 "${pids[$replicas]}" 2>/dev/null; then
        status=0
        wait "${pids[$replicas]}" 2>/dev/null || status=$?
        if [ "$status" -eq 0 ] && [ "$failed" -eq 0 ]; then
            echo "cluster.sh: HAProxy stopped (status 0); stopping the replicas" >&2
            exit 0
        fi
        echo "cluster.sh: error: HAProxy exited (status $status); stopping the replicas. The end of its log:" >&2
        tail -n 20 "$log_dir/haproxy.log" >&2
        exit 1
    fi
    if [ "$running" -eq 0 ]; then
        if [ "$failed" -eq 0 ]; then
            echo "cluster.sh: every replica has stopped (status 0); stopping HAProxy" >&2
            exit 0
        fi
        echo "cluster.sh: error: every replica has exited; stopping HAProxy" >&2
        exit 1
    fi
done
