"""llama.cpp's RPC backend (ggml-rpc) through the ggml backend registry, with ctypes.

llama-cpp-python 0.3.36 binds neither the RPC functions nor the model params' `devices` list,
so this module reaches them the way llama.cpp's own tools do: `ggml_backend_reg_by_name("RPC")`,
then the registry's proc addresses `ggml_backend_rpc_add_server` (one registry per endpoint,
each with its devices) and `ggml_backend_rpc_start_server` (the worker side). Both exist only
when llama.cpp was built with `-DGGML_RPC=ON`; `rpc_available()` says whether it was.

ggml's RPC client aborts the process when it cannot reach a server, so `add_servers` first
checks each endpoint with a plain TCP connection and raises `ModelLoadError` naming the one
that does not answer. The protocol has no authentication: a worker must only listen where its
clients alone can reach it.
"""

from __future__ import annotations

import ctypes
import socket
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as L

from kodkod.core.backend_types import ModelLoadError

DEVICE_CPU, DEVICE_GPU, DEVICE_IGPU = 0, 1, 2
CONNECT_TIMEOUT_S = 3.0

_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_START_SERVER = ctypes.CFUNCTYPE(
    None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)
)


class RpcUnavailableError(ModelLoadError):
    """This llama.cpp build has no RPC backend (built without -DGGML_RPC=ON)."""


@dataclass(frozen=True, slots=True)
class RpcDevice:
    handle: int  # ggml_backend_dev_t
    name: str  # ggml's device name, e.g. RPC0
    endpoint: str  # host:port of the worker


def _ggml() -> ctypes.CDLL:
    """libggml of the installed llama-cpp-python (the instance libllama already loaded)."""
    lib_dir = Path(L.__file__).parent / "lib"
    lib = ctypes.CDLL(str(lib_dir / "libggml.so"), mode=ctypes.RTLD_GLOBAL)
    lib.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    lib.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_name.restype = ctypes.c_char_p
    return lib


def _rpc_reg(lib: ctypes.CDLL) -> int | None:
    L.llama_backend_init()
    return lib.ggml_backend_reg_by_name(b"RPC") or None


def rpc_available() -> bool:
    """Whether the llama.cpp library in use was built with the RPC backend."""
    return _rpc_reg(_ggml()) is not None


def gpu_devices_present() -> bool:
    """Whether llama.cpp sees a GPU (RPC devices do not count: they are asked for by name)."""
    lib = _ggml()
    L.llama_backend_init()
    return bool(lib.ggml_backend_dev_by_type(DEVICE_GPU) or lib.ggml_backend_dev_by_type(DEVICE_IGPU))


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{endpoint!r} is not host:port")
    return host.strip("[]"), int(port)


def check_reachable(endpoint: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """ModelLoadError unless a TCP connection to the worker succeeds."""
    host, port = split_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ModelLoadError(f"RPC worker {endpoint} is not reachable ({exc.strerror or exc})") from None


def add_servers(endpoints: list[str] | tuple[str, ...]) -> list[RpcDevice]:
    """Register each worker with ggml (once per process and endpoint) and return its devices."""
    lib = _ggml()
    reg = _rpc_reg(lib)
    if reg is None:
        raise RpcUnavailableError(
            "rpc_servers needs llama.cpp built with -DGGML_RPC=ON (scripts/setup.sh builds it so)"
        )
    address = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    if not address:
        raise RpcUnavailableError("this llama.cpp build's RPC backend cannot add servers")
    add_server = _ADD_SERVER(address)
    devices: list[RpcDevice] = []
    for endpoint in endpoints:
        check_reachable(endpoint)
        server_reg = add_server(endpoint.encode())
        if not server_reg:
            raise ModelLoadError(f"RPC worker {endpoint} offers no devices")
        for i in range(lib.ggml_backend_reg_dev_count(server_reg)):
            handle = lib.ggml_backend_reg_dev_get(server_reg, i)
            name = (lib.ggml_backend_dev_name(handle) or b"RPC").decode("utf-8", "replace")
            devices.append(RpcDevice(int(handle), name, endpoint))
    return devices


def device_array(devices: list[RpcDevice]) -> ctypes.Array[ctypes.c_void_p]:
    """A NULL-terminated `ggml_backend_dev_t` array (keep it alive during the load)."""
    return (ctypes.c_void_p * (len(devices) + 1))(*[d.handle for d in devices], None)


def start_server(endpoint: str, n_threads: int) -> None:
    """Serve this machine's CPU to RPC clients on `endpoint`; blocks for the process's life."""
    lib = _ggml()
    reg = _rpc_reg(lib)
    if reg is None:
        raise RpcUnavailableError("this llama.cpp build has no RPC backend (build with -DGGML_RPC=ON)")
    address = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_start_server")
    cpu = lib.ggml_backend_dev_by_type(DEVICE_CPU)
    if not address or not cpu:
        raise RpcUnavailableError("this llama.cpp build cannot start an RPC server")
    devices = (ctypes.c_void_p * 1)(cpu)
    _START_SERVER(address)(endpoint.encode(), None, n_threads, 1, devices)
