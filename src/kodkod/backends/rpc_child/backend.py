"""`ChildBackend`: an RPC-backed model whose llama.cpp context lives in a child process.

It implements `engine.backend.Backend` (structurally) by forwarding what needs the model's
weights — `decode` and the KV operations — over a `Channel` to `rpc_child/child.py`, which owns
the real `LlamaCppBackend`. Everything else stays in this process:

- the tokenizer is a vocabulary-only load of the same GGUF (no worker involved), so the HTTP
  side tokenizes and detokenizes without crossing the process boundary, and grammar-constrained
  decoding (llguidance over that vocabulary) works as with a local load;
- logits come back through shared memory: after each decode the child copies the rows the
  batch asked for into a memfd mapped here, and `logits(index)` is a writable view of one row;
- sampling runs here, on that row, with the same llama.cpp sampler chains as a local load
  (`NativeSampler.sample_row`), so a decode step costs one round trip to the child however
  many sequences it samples.

Not supported (reported as absent in `capabilities`): LoRA adapters (they live on the child's
context; a request naming one gets the engine's 400).

When the child ends unexpectedly — ggml aborts a process whose RPC worker stopped answering —
the call in flight and every later one raise `BackendLostError`, whose message names the workers
that no longer accept connections. `close()` asks the child to free its handles and exit, and
reaps it (killing it after `CLOSE_TIMEOUT_S`); nothing of it outlives the backend.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

import kodkod
from kodkod.backends.llamacpp.grammar import LlgCompiler
from kodkod.backends.llamacpp.model import LlamaModel
from kodkod.backends.llamacpp.rpc import check_reachable
from kodkod.backends.llamacpp.sampler import NativeSampler
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
from kodkod.core.backend_types import (
    BackendCapabilities,
    BackendError,
    BackendLostError,
    BatchRow,
    ContextConfig,
    KVCacheFullError,
    ModelClosedError,
    ModelInfo,
    ModelLoadError,
    ModelSource,
)
from kodkod.core.sampling.stages import build_stages
from kodkod.core.types import SamplingParams

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 30.0  # a clean exit frees the workers' buffers first
REAP_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 1.0


def _child_env() -> dict[str, str]:
    """The server's environment, plus: import this very kodkod, and no ggml backtrace."""
    env = dict(os.environ)
    src = str(Path(kodkod.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    env["GGML_NO_BACKTRACE"] = "1"
    return env


def _how_it_ended(returncode: int | None) -> str:
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def gone_workers(endpoints: Sequence[str]) -> list[str]:
    """The endpoints that refuse a TCP connection now."""
    gone = []
    for endpoint in endpoints:
        try:
            check_reachable(endpoint, PROBE_TIMEOUT_S)
        except ModelLoadError:
            gone.append(endpoint)
    return gone


class RowSampler:
    """`engine.backend.Sampler` on logits rows of this process (the chain needs no context)."""

    __slots__ = ("_native", "_logits")

    def __init__(self, native: NativeSampler, logits: Callable[[int], np.ndarray]) -> None:
        self._native = native
        self._logits = logits

    def sample(self, index: int) -> int:
        return self._native.sample_row(self._logits(index))

    def accept(self, token_id: int) -> None:
        self._native.accept(token_id)

    def close(self) -> None:
        self._native.close()


class _Child:
    """The child process and its channel (owned by one ChildBackend)."""

    def __init__(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kodkod.backends.rpc_child.child",
                    str(theirs.fileno()),
                    str(os.getpid()),
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=_child_env(),
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.channel = Channel(mine)
        log.info("engine child process %d started", self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def reap(self, timeout_s: float) -> int | None:
        """Wait for the process to end (kill it after timeout_s); its exit code."""
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            try:
                return self.proc.wait(REAP_TIMEOUT_S)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL always ends it
                return None
        finally:
            self.channel.close()

    def stop(self) -> None:
        """Ask it to free everything and exit; kill it if it does not."""
        if self.proc.poll() is None:
            with contextlib.suppress(ChannelClosed):
                self.channel.send(Close())
        code = self.reap(CLOSE_TIMEOUT_S)
        log.info("engine child process %d ended (%s)", self.proc.pid, _how_it_ended(code))


class ChildBackend:
    """Implements `engine.backend.Backend` (structurally) over an engine child process."""

    def __init__(
        self,
        child: _Child,
        tokenizer: LlamaModel,
        info: ModelInfo,
        ready: Ready,
        logits_fd: int,
        rpc_servers: Sequence[str],
    ) -> None:
        self._child: _Child | None = child
        self._tok = tokenizer
        self.tokenizer: LlamaModel = tokenizer
        self.info = info
        self.num_slots = ready.num_slots
        self.kv_capacity = ready.kv_capacity
        self.slot_cells = ready.slot_cells
        self.rpc_servers = tuple(rpc_servers)
        self._n_vocab = tokenizer.n_vocab
        size = max(1, ready.logits_rows * self._n_vocab * 4)
        self._map: mmap.mmap | None = mmap.mmap(logits_fd, size)
        self._rows: np.ndarray | None = np.frombuffer(
            self._map, np.float32, ready.logits_rows * self._n_vocab
        ).reshape(ready.logits_rows, self._n_vocab)
        self._row_of: dict[int, int] = {}  # batch index → row of the last decode's logits
        self._grammar: LlgCompiler | None = LlgCompiler(tokenizer)
        self.lost: str | None = None  # why the child is gone (BackendLostError's message)
        self.capabilities = BackendCapabilities(
            grammar=self._grammar, vocab_fingerprint=tokenizer.vocab_fingerprint
        )

    @classmethod
    def load(
        cls,
        source: ModelSource,
        make_config: Callable[[ModelInfo], ContextConfig],
        *,
        tensor_split: Sequence[float] = (),
        rpc_servers: Sequence[str] = (),
    ) -> ChildBackend:
        """Start a child that loads `source` over the local CPU and `rpc_servers` (shares in
        `tensor_split`, local CPU first), size its context with make_config(info)."""
        for endpoint in rpc_servers:  # fail fast, before starting anything
            check_reachable(endpoint)
        tokenizer = LlamaModel.load(source.path, source.name, vocab_only=True)
        child: _Child | None = None
        try:
            child = _Child()
            ch = child.channel
            ch.send(LoadRequest(str(source.path), source.name, tuple(tensor_split), tuple(rpc_servers)))
            info = _await_loaded(ch, source)
            ch.send(ContextReply(make_config(info)))
            ready, fds = ch.recv_with_fds()
            if isinstance(ready, Failed):
                raise ModelLoadError(ready.message)
            if not isinstance(ready, Ready) or len(fds) != 1:
                raise ModelLoadError("the engine child process answered the load unexpectedly")
            try:
                return cls(child, tokenizer, info, ready, fds[0], rpc_servers)
            finally:
                os.close(fds[0])  # the mapping keeps the memory
        except ChannelClosed:
            code = child.reap(REAP_TIMEOUT_S) if child is not None else None
            gone = gone_workers(rpc_servers)
            why = "; ".join(f"RPC worker {e} does not accept connections" for e in gone)
            tokenizer.close()
            raise ModelLoadError(
                f"the engine child process loading {source.name!r} {_how_it_ended(code)}"
                + (f": {why}" if why else " (see the server log)")
            ) from None
        except BaseException:
            if child is not None:
                child.proc.kill()
                child.reap(REAP_TIMEOUT_S)
            tokenizer.close()
            raise

    @property
    def child_pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    # -- calls into the child -------------------------------------------------------------------

    def _call(self, msg: Request) -> object:
        child = self._child
        if child is None:
            if self.lost is not None:
                raise BackendLostError(self.lost)
            raise ModelClosedError()
        try:
            child.channel.send(msg)
            reply = child.channel.recv()
        except ChannelClosed:
            raise self._lose(child) from None
        if isinstance(reply, Done):
            return reply.value
        if isinstance(reply, Failed):
            if reply.kind == "kv_full":
                raise KVCacheFullError(reply.message)
            raise BackendError(reply.message)
        raise BackendError(f"the engine child process answered {type(reply).__name__}")

    def _lose(self, child: _Child) -> BackendLostError:
        """The child is gone: reap it, find out which workers went with it."""
        self._child = None
        code = child.reap(REAP_TIMEOUT_S)
        gone = gone_workers(self.rpc_servers)
        if gone:
            why = "; ".join(f"RPC worker {e} no longer accepts connections" for e in gone)
        else:
            why = "every RPC worker still accepts connections (see the server log)"
        self.lost = f"the engine process of the model {self.info.name!r} {_how_it_ended(code)}: {why}"
        log.error("%s", self.lost)
        return BackendLostError(self.lost)

    # -- tokenizer --------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]:
        return self._tok.tokenize(text, add_bos=add_bos, parse_special=parse_special)

    def token_bytes(self, token_id: int, *, special: bool) -> bytes:
        return self._tok.piece(token_id, special=special)

    # -- decode -----------------------------------------------------------------------------

    def decode(self, rows: Sequence[BatchRow]) -> list[list[int]]:
        self._row_of.clear()
        indices: list[list[int]] = self._call(Decode(list(rows)))  # type: ignore[assignment]
        k = 0
        for ix in indices:
            for i in ix:
                self._row_of[i] = k
                k += 1
        return indices

    def logits(self, index: int) -> np.ndarray:
        if self._rows is None:
            raise ModelClosedError()
        try:
            return self._rows[self._row_of[index]]
        except KeyError:
            raise BackendError(f"batch index {index} has no logits") from None

    # -- KV cache -----------------------------------------------------------------------------

    def kv_copy(self, src: int, dst: int, p0: int, p1: int) -> None:
        self._call(KvCopy(src, dst, p0, p1))

    def kv_remove(self, slot: int, p0: int, p1: int = -1) -> None:
        self._call(KvRemove(slot, p0, p1))

    def kv_clear(self) -> None:
        self._call(KvClear())

    def kv_save(self, slot: int) -> bytearray:
        data = self._call(KvSave(slot))
        assert isinstance(data, bytearray)
        return data

    def kv_restore(self, slot: int, data: bytearray) -> None:
        self._call(KvRestore(slot, data))

    # -- sampling -----------------------------------------------------------------------------

    def new_sampler(
        self, params: SamplingParams, history: Sequence[int], num_prompt: int | None = None
    ) -> RowSampler:
        seed = params.seed if params.seed is not None and params.seed >= 0 else secrets.randbits(32)
        stages = build_stages(params, n_vocab=self._n_vocab, seed=seed & 0xFFFFFFFF)
        native = NativeSampler(
            None, self._tok.vocab, self._n_vocab, self.kv_capacity, stages, self.logits, history, num_prompt
        )
        return RowSampler(native, self.logits)

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        self.capabilities = BackendCapabilities()
        if self._grammar is not None:
            self._grammar.close()
            self._grammar = None
        child, self._child = self._child, None
        if child is not None:
            child.stop()
        self._rows = None
        self._row_of.clear()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a row view is still referenced: unmapped when it goes
                log.debug("logits rows still in use at close")
            self._map = None
        self._tok.close()


def _await_loaded(ch: Channel, source: ModelSource) -> ModelInfo:
    """Relay the child's load progress until it reports the model's facts."""
    while True:
        msg = ch.recv()
        if isinstance(msg, Progress):
            if source.progress is not None and not source.progress(msg.fraction):
                raise ModelLoadError(f"the load of {source.name!r} was cancelled")
        elif isinstance(msg, Loaded):
            return msg.info
        elif isinstance(msg, Failed):
            raise ModelLoadError(msg.message)
        else:
            raise ModelLoadError("the engine child process answered the load unexpectedly")
