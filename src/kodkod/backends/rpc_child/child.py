"""The engine child process: owns an RPC-backed `LlamaCppBackend` and serves its parent.

    python -m kodkod.backends.rpc_child.child CHANNEL_FD PARENT_PID

Started by `ChildBackend.load` with one end of a socket pair. It loads the model over the
local CPU and the RPC workers (reporting progress), lets the parent size the context from the
model's facts, then answers decode and KV requests one at a time until `Close` or until the
channel closes. After each decode it copies the logits rows the batch asked for, in order,
into a memfd it shared with the parent (`Ready`), so the parent samples without another
round trip.

Why a process of its own: ggml's RPC client aborts the process when a worker stops answering.
Here that ends only this process; the parent sees its channel close and turns that into
`BackendLostError`. The child never outlives the parent: it leaves when the channel closes,
and a thread waiting on the parent's pidfd ends it if the parent dies while a call blocks. It
writes no core dump (a model's memory is large) and asks ggml for no backtrace (ggml would
attach a debugger to itself).
"""

from __future__ import annotations

import logging
import mmap
import os
import resource
import select
import socket
import sys
import threading
from pathlib import Path

import numpy as np

from kodkod.backends.llamacpp.backend import LlamaCppBackend
from kodkod.backends.llamacpp.model import LlamaModel
from kodkod.backends.rpc_child.channel import (
    Channel,
    ChannelClosed,
    Close,
    ContextReply,
    Decode,
    Done,
    Failed,
    KvClear,
    KvCopy,
    KvRemove,
    KvRestore,
    KvSave,
    Loaded,
    LoadRequest,
    Progress,
    Ready,
    Request,
)
from kodkod.core.backend_types import BackendError, KVCacheFullError

log = logging.getLogger("kodkod.engine_child")


def _leave_with_parent(parent_pid: int) -> None:
    """End this process as soon as the parent is gone (even while a call blocks)."""

    def wait() -> None:
        try:
            fd = os.pidfd_open(parent_pid)
        except OSError:  # already gone, or no pidfd support
            if os.getppid() != parent_pid:
                os._exit(3)
            return
        select.select([fd], [], [])
        os._exit(3)

    threading.Thread(target=wait, name="kodkod-parent-watch", daemon=True).start()


class LogitsOut:
    """The memfd the parent reads logits rows from: `rows` × n_vocab float32."""

    def __init__(self, rows: int, n_vocab: int) -> None:
        size = max(1, rows * n_vocab * 4)
        self.fd = os.memfd_create("kodkod-logits", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self._map = mmap.mmap(self.fd, size)
        self.rows = np.frombuffer(self._map, np.float32, rows * n_vocab).reshape(rows, n_vocab)

    def close(self) -> None:
        del self.rows
        self._map.close()


def _serve_call(backend: LlamaCppBackend, out: LogitsOut, msg: Request) -> object:
    match msg:
        case Decode(rows):
            indices = backend.decode(rows)
            k = 0
            for ix in indices:
                for i in ix:
                    out.rows[k] = backend.logits(i)
                    k += 1
            return indices
        case KvCopy(src, dst, p0, p1):
            backend.kv_copy(src, dst, p0, p1)
        case KvRemove(slot, p0, p1):
            backend.kv_remove(slot, p0, p1)
        case KvClear():
            backend.kv_clear()
        case KvSave(slot):
            return backend.kv_save(slot)
        case KvRestore(slot, data):
            backend.kv_restore(slot, data)
        case _:
            raise BackendError(f"unknown request {type(msg).__name__}")
    return None


def _serve(channel: Channel, backend: LlamaCppBackend, out: LogitsOut) -> None:
    while True:
        try:
            msg = channel.recv()
        except ChannelClosed:
            return  # the parent went away
        if isinstance(msg, Close):
            return
        try:
            value = _serve_call(backend, out, msg)  # type: ignore[arg-type]
        except KVCacheFullError as exc:
            channel.send(Failed("kv_full", str(exc)))
        except BackendError as exc:
            channel.send(Failed("backend", str(exc)))
        except Exception as exc:
            log.exception("engine child request failed")
            channel.send(Failed("backend", f"{type(exc).__name__}: {exc}"))
        else:
            channel.send(Done(value))


def run(channel: Channel) -> int:
    req = channel.recv()
    if not isinstance(req, LoadRequest):
        return 2

    def progress(value: float) -> bool:
        channel.send(Progress(value))
        return True

    try:
        model = LlamaModel.load(
            Path(req.path),
            req.name,
            progress=progress,
            tensor_split=req.tensor_split,
            rpc_servers=req.rpc_servers,
        )
    except BackendError as exc:
        channel.send(Failed("load", str(exc)))
        return 1
    try:
        channel.send(Loaded(model.info))
        reply = channel.recv()
        if not isinstance(reply, ContextReply):
            model.close()
            return 2
        backend = LlamaCppBackend(model, reply.config)
    except BackendError as exc:
        model.close()
        channel.send(Failed("load", str(exc)))
        return 1
    except ChannelClosed:
        model.close()
        return 1
    out = LogitsOut(reply.config.batch_tokens, model.n_vocab)
    try:
        channel.send(
            Ready(backend.num_slots, backend.kv_capacity, reply.config.batch_tokens, backend.slot_cells),
            [out.fd],
        )
        os.close(out.fd)
        _serve(channel, backend, out)
    except ChannelClosed:
        pass
    finally:
        backend.close()
        out.close()
    return 0


def main(argv: list[str]) -> int:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _leave_with_parent(int(argv[2]))
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s [engine child %(process)d]: %(message)s"
    )
    channel = Channel(socket.socket(fileno=int(argv[1])))
    try:
        return run(channel)
    finally:
        channel.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
