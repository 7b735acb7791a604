"""The pipe between a `ChildBackend` and its engine child process: framing and messages.

A `Channel` sends typed records over one end of a Unix socket pair: an 8-byte little-endian
length, then the record pickled (protocol 5). The two ends are the server process and the child
it started, both running this package from the same installation, so pickle crosses no trust
boundary. `send(..., fds=...)` passes file descriptors with the length header (SCM_RIGHTS);
only the child's `Ready` (the logits memory) carries one. A peer that went away is
`ChannelClosed`, whatever the socket said (EOF, reset, broken pipe).

The conversation: the parent sends `LoadRequest`; the child answers with `Progress` records,
then `Loaded` (the model's facts) or `Failed`; the parent answers `ContextReply`; the child
answers `Ready` (with the logits memory) or `Failed`. From then on every request (`Decode`,
`Kv*`, `Close`) gets exactly one `Done` or `Failed`.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from kodkod.core.backend_types import BatchRow, ContextConfig, ModelInfo

_HEADER = struct.Struct("<Q")
MAX_FDS = 4


class ChannelClosed(Exception):
    """The process at the other end went away."""


# -- parent → child ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadRequest:
    path: str
    name: str
    tensor_split: tuple[float, ...]  # one share per device, local CPU first (() = equal)
    rpc_servers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ContextReply:
    config: ContextConfig


@dataclass(frozen=True, slots=True)
class Decode:
    rows: Sequence[BatchRow]


@dataclass(frozen=True, slots=True)
class KvCopy:
    src: int
    dst: int
    p0: int
    p1: int


@dataclass(frozen=True, slots=True)
class KvRemove:
    slot: int
    p0: int
    p1: int


@dataclass(frozen=True, slots=True)
class KvClear:
    pass


@dataclass(frozen=True, slots=True)
class KvSave:
    slot: int


@dataclass(frozen=True, slots=True)
class KvRestore:
    slot: int
    data: bytearray


@dataclass(frozen=True, slots=True)
class Close:
    pass


Request = Decode | KvCopy | KvRemove | KvClear | KvSave | KvRestore | Close


# -- child → parent ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    fraction: float


@dataclass(frozen=True, slots=True)
class Loaded:
    info: ModelInfo


@dataclass(frozen=True, slots=True)
class Ready:
    num_slots: int
    kv_capacity: int
    logits_rows: int  # rows of n_vocab float32 in the memory passed with this record
    slot_cells: int = 0  # each slot's own KV stream (per-slot layout); 0: one shared pool


@dataclass(frozen=True, slots=True)
class Done:
    value: object = None


@dataclass(frozen=True, slots=True)
class Failed:
    kind: str  # "load", "kv_full" or "backend"
    message: str


class Channel:
    """One end of the socket pair (one thread at a time uses it)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, record: object, fds: Sequence[int] = ()) -> None:
        data = pickle.dumps(record, protocol=5)
        header = _HEADER.pack(len(data))
        try:
            if fds:
                socket.send_fds(self._sock, [header], list(fds))
                self._sock.sendall(data)
            else:
                self._sock.sendall(header + data)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from None

    def recv(self) -> object:
        record, fds = self.recv_with_fds()
        for fd in fds:  # none expected here
            os.close(fd)
        return record

    def recv_with_fds(self) -> tuple[object, list[int]]:
        try:
            head, fds, _flags, _addr = socket.recv_fds(self._sock, _HEADER.size, MAX_FDS)
            if not head:
                raise ChannelClosed("the other process closed the channel")
            header = bytearray(head)
            if len(header) < _HEADER.size:
                header += self._read_exact(_HEADER.size - len(header))
            (size,) = _HEADER.unpack(header)
            return pickle.loads(self._read_exact(size)), fds
        except OSError as exc:
            raise ChannelClosed(str(exc)) from None

    def _read_exact(self, size: int) -> bytearray:
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = self._sock.recv_into(view[got:], size - got)
            if n == 0:
                raise ChannelClosed("the other process closed the channel")
            got += n
        return buf

    def close(self) -> None:
        self._sock.close()
