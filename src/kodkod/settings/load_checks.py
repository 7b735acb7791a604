"""The value checks of the load table's `backend` and `rpc_servers` rows (`settings/load_table.py`
runs them before validation on every surface, as `LoadParam.before`).

`check_backend` accepts llama.cpp's names and TabbyAPI's exllamav2/v3 (which load with
llama.cpp; the table's row says so in a note); `check_rpc_servers` takes a list of distinct
"host:port" strings of RPC workers, at most ggml-rpc's own limit.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EXLLAMA_BACKENDS", "LLAMA_BACKENDS", "MAX_RPC_SERVERS", "check_backend", "check_rpc_servers"]

LLAMA_BACKENDS = frozenset({"", "auto", "llamacpp", "llama.cpp", "llama_cpp", "llama-cpp"})
EXLLAMA_BACKENDS = frozenset({"exllamav2", "exllamav3"})


MAX_RPC_SERVERS = 16  # ggml-rpc's own limit (GGML_RPC_MAX_SERVERS)


def check_rpc_servers(value: Any) -> Any:
    """A list of distinct "host:port" strings of RPC workers."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError('expected a list of "host:port" strings')
    if len(value) > MAX_RPC_SERVERS:
        raise ValueError(f"at most {MAX_RPC_SERVERS} RPC servers")
    out = []
    for item in value:
        text = item.strip()
        host, sep, port = text.rpartition(":")
        bad_host = not host or any(c.isspace() or c in "\x00/@" for c in host)
        if not sep or bad_host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f'{item[:80]!r} is not "host:port" (e.g. "192.168.1.20:50052")')
        if text in out:
            raise ValueError(f"{text!r} is listed twice")
        out.append(text)
    return out


def check_backend(value: Any) -> Any:
    """A backend name this server takes (llama.cpp's, or TabbyAPI's exllama ones), lower-cased."""
    if value is None:
        return None
    if not isinstance(value, str) or value.strip().lower() not in LLAMA_BACKENDS | EXLLAMA_BACKENDS:
        raise ValueError(
            f"backend {value!r} is not available: this server runs GGUF models on llama.cpp "
            "(leave backend unset)"
        )
    return value.strip().lower()
