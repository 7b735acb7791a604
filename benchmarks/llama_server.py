"""llama.cpp's own `llama-server`, built from the llama.cpp that kodkod's llama-cpp-python vendors.

    .venv/bin/python benchmarks/llama_server.py            # build if missing, print the binary
    .venv/bin/python benchmarks/llama_server.py --print-key

Benchmarks that compare kodkod with llama-server share one cached build:
`ensure_built()` downloads the llama-cpp-python source package pinned in pyproject.toml (pip),
configures its `vendor/llama.cpp` with the CMake flags recorded for kodkod's own build
(`<venv>/kodkod-llama-build.json`, written by scripts/setup.sh; `scripts/setup.sh flags` when the
record is missing) and builds only the `llama-server` target. The binary is cached under
`~/.cache/kodkod/llama-server/<key>/` (`KODKOD_CACHE_DIR` moves the root), where the key hashes the
llama-cpp-python version, those flags, the machine and the CPU: both servers run the same kernels,
and a build with other flags or for another CPU is never reused. The first build takes several
minutes on two cores.

`LlamaServer.start()` runs it on a loopback port with `-np N` slots, a total KV size, threads and
flash attention matching kodkod's setup, and waits until `/health` answers 200.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
RECORD_NAME = "kodkod-llama-build.json"  # what scripts/setup.sh leaves next to the venv
# Flags of our own, on top of the recorded ones: a static, release build of only the server.
# They do not change the compiled kernels, so they are not part of the key's recorded flags.
SERVER_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
)
KEY_VERSION = "llama-server-1"  # bump when SERVER_FLAGS or the build recipe change


@dataclass(frozen=True, slots=True)
class BuildSpec:
    """What the llama-server build must match: kodkod's recorded llama.cpp build."""

    llama_cpp_python: str
    cmake_args: str  # exactly as recorded (shell-quoted, like scikit-build-core reads CMAKE_ARGS)
    machine: str
    cpu: str

    def key(self) -> str:
        text = "\n".join((KEY_VERSION, self.llama_cpp_python, self.cmake_args, self.machine, self.cpu))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def cmake_flags(self) -> list[str]:
        return [*shlex.split(self.cmake_args), *SERVER_FLAGS]


def spec_from_record(path: Path) -> BuildSpec | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return BuildSpec(
            str(raw["llama_cpp_python"]), str(raw["cmake_args"]), str(raw["machine"]), str(raw["cpu"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def spec_from_setup() -> BuildSpec:
    """The flags scripts/setup.sh would build with (when the venv carries no build record)."""
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup.sh"), "flags"], capture_output=True, text=True, check=True
    ).stdout
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    version = pyproject.split('"llama-cpp-python==', 1)[1].split('"', 1)[0]
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return BuildSpec(version, values["CMAKE_ARGS"], os.uname().machine, cpu)


def build_spec() -> BuildSpec:
    return spec_from_record(Path(sys.prefix) / RECORD_NAME) or spec_from_setup()


def cache_root() -> Path:
    base = os.environ.get("KODKOD_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kodkod"
    )
    return Path(base) / "llama-server"


def binary_path(spec: BuildSpec) -> Path:
    return cache_root() / spec.key() / "llama-server"


def ensure_built(spec: BuildSpec | None = None, log: bool = True) -> Path:
    """The cached llama-server for this build spec, building it first when it is missing."""
    spec = spec or build_spec()
    target = binary_path(spec)
    if target.exists():
        return target
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent.parent / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another benchmark may be building it right now
        if not target.exists():
            _build(spec, target, log)
    return target


def _build(spec: BuildSpec, target: Path, log: bool) -> None:
    jobs = str(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(dir=target.parent.parent, prefix=".build-") as tmp_name:
        tmp = Path(tmp_name)
        if log:
            print(f"building llama-server from llama-cpp-python {spec.llama_cpp_python} (several minutes)")
            print(f"  flags: {' '.join(spec.cmake_flags())}")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
             "--no-binary", ":all:", "-d", str(tmp), f"llama-cpp-python=={spec.llama_cpp_python}"],
            check=True,
        )  # fmt: skip
        (sdist,) = tmp.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        (src,) = tmp.glob("llama_cpp_python-*/vendor/llama.cpp")
        build = tmp / "build"
        quiet = {} if log else {"stdout": subprocess.DEVNULL}
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), *spec.cmake_flags()], check=True, **quiet)
        subprocess.run(
            ["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], check=True, **quiet
        )
        staged = tmp / "out"
        staged.mkdir()
        shutil.copy2(build / "bin" / "llama-server", staged / "llama-server")
        record = {
            **asdict(spec),
            "key": spec.key(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staged / "build.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        shutil.rmtree(target.parent, ignore_errors=True)
        staged.rename(target.parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LlamaServer:
    """A running llama-server process on a loopback port."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        gguf: Path,
        *,
        n_parallel: int,
        ctx_total: int,
        threads: int,
        log_dir: Path,
        extra: list[str] | None = None,
        wait_s: float = 120.0,
    ) -> LlamaServer:
        """`-np n_parallel` slots over `ctx_total` KV cells in all (llama-server gives each slot
        ctx_total / n_parallel), the batch sizes and flash attention kodkod uses."""
        binary = ensure_built()
        port = free_port()
        args = [
            str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(n_parallel), "-c", str(ctx_total), "-t", str(threads), "-tb", str(threads),
            "-b", "2048", "-ub", "512", "-fa", "on", "--no-webui", "--metrics", "--jinja",
            *(extra or []),
        ]  # fmt: skip
        log_path = log_dir / f"llama-server-{port}.log"
        proc = subprocess.Popen(args, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
        server = cls(proc, port, log_path, args)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}:\n{server.log()[-4000:]}")
            try:
                if httpx.get(f"{server.base_url}/health", timeout=2.0).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        server.stop()
        raise RuntimeError(f"llama-server not ready in {wait_s} s:\n{server.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, grace_s: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--print-key", action="store_true", help="print the build spec and key, build nothing")
    args = ap.parse_args()
    spec = build_spec()
    if args.print_key:
        print(json.dumps({**asdict(spec), "key": spec.key(), "binary": str(binary_path(spec))}, indent=1))
        return
    print(ensure_built(spec))


if __name__ == "__main__":
    main()
