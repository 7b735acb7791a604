"""`kodkod rpc-worker`: lend this machine's CPU and memory to a kodkod server's model.

It runs llama.cpp's RPC server (ggml-rpc, from the same llama.cpp build as the server, through
the library's `ggml_backend_rpc_start_server`) until it is stopped with SIGINT or SIGTERM. A
server whose model config lists this worker in `rpc_servers` places part of the model's layers
here and computes them here.

The RPC protocol has no authentication and no encryption: whoever reaches the port can run
graphs and read what the worker holds. So the worker listens on loopback unless `--host` names
another address, and then it says so loudly. `--mem MB` caps the memory the worker process may
allocate (RLIMIT_DATA): llama.cpp's RPC server of this version has no memory option of its own
and reports the machine's free memory to its clients.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import resource
import signal
import socket
import sys
import threading

DEFAULT_PORT = 50052
NO_AUTH_WARNING = (
    "WARNING: the llama.cpp RPC protocol has no authentication or encryption: anyone who can "
    "reach {endpoint} can use this worker and read the model data it holds. Listen only on a "
    "private network that untrusted hosts cannot reach."
)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kodkod rpc-worker", description="serve this machine's CPU to a kodkod server (llama.cpp RPC)"
    )
    parser.add_argument(
        "--host",
        default=None,
        help="address to listen on (default 127.0.0.1; any other address is reachable "
        "without authentication)",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: every CPU)")
    parser.add_argument(
        "--mem", type=int, default=None, metavar="MB", help="most memory the worker may allocate"
    )
    ns = parser.parse_args(argv)
    if not 0 < ns.port < 65536:
        parser.error(f"--port {ns.port} is not a TCP port")
    if ns.threads is not None and ns.threads < 1:
        parser.error("--threads must be at least 1")
    if ns.mem is not None and ns.mem < 1:
        parser.error("--mem must be at least 1 (MB)")
    return ns


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


def run(argv: list[str]) -> int:
    ns = parse_args(argv)
    host = ns.host if ns.host is not None else "127.0.0.1"
    endpoint = f"[{host}]:{ns.port}" if ":" in host and not host.startswith("[") else f"{host}:{ns.port}"
    if not is_loopback(host):
        print(NO_AUTH_WARNING.format(endpoint=endpoint), file=sys.stderr, flush=True)
    if not _port_free(host, ns.port):
        print(
            f"kodkod rpc-worker: error: cannot listen on {endpoint} (busy or not an address here)",
            file=sys.stderr,
        )
        return 2
    if ns.mem is not None:
        limit = ns.mem * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    from kodkod.backends.llamacpp.rpc import RpcUnavailableError, rpc_available, start_server

    if not rpc_available():
        print(
            "kodkod rpc-worker: error: this llama.cpp build has no RPC backend; rebuild it with "
            "scripts/setup.sh (it builds with -DGGML_RPC=ON)",
            file=sys.stderr,
        )
        return 2
    threads = ns.threads or len(os.sched_getaffinity(0))
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    failed: list[str] = []

    def serve() -> None:
        try:
            start_server(endpoint, threads)
        except RpcUnavailableError as exc:
            failed.append(str(exc))
        failed.append("the RPC server stopped")  # start_server returns only when it could not listen
        stopped.set()

    print(f"kodkod rpc-worker: listening on {endpoint} with {threads} threads", flush=True)
    threading.Thread(target=serve, name="rpc-server", daemon=True).start()
    stopped.wait()
    if failed:
        print(f"kodkod rpc-worker: error: {failed[0]}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1 if failed else 0)  # the server thread never returns: do not wait for it
