"""A loaded llama.cpp model: weights, vocabulary, metadata, tokenizer.

`LlamaModel.load()` wraps `llama_model_load_from_file` (split GGUFs load from their first part)
and reports real progress through llama.cpp's progress callback. The object owns the model
handle; `close()` frees it, and from then on every method that would reach llama.cpp raises
`ModelClosedError` (the vocabulary pointer dies with the model). Token pieces are cached per
token, so detokenizing is a list lookup after the first time a token is seen.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import llama_cpp as L

from kodkod.backends.llamacpp.rpc import add_servers, device_array, gpu_devices_present
from kodkod.core.backend_types import ModelClosedError, ModelInfo, ModelLoadError

log = logging.getLogger(__name__)


@L.llama_log_callback
def _route_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    """Send llama.cpp's own log lines to Python logging (debug; errors as warnings)."""
    try:
        msg = text.decode("utf-8", errors="replace").rstrip("\n")
    except Exception:  # pragma: no cover - never raise into C
        return
    if msg:
        log.log(logging.WARNING if level in (2, 3) and "error" in msg.lower() else logging.DEBUG, msg)


def init_llama() -> None:
    """Process-wide llama.cpp initialisation (idempotent)."""
    L.llama_backend_init()
    L.llama_log_set(_route_log, None)


_SPLIT_MODES = {"none": 0, "layer": 1, "row": 2}


def _apply_split(
    params: L.llama_model_params, split_mode: str | None, tensor_split: Sequence[float]
) -> object:
    """Set GPU split options; returns the array that must outlive the load call."""
    if split_mode is None:
        return None
    if not gpu_devices_present():
        raise ModelLoadError("GPU split options given, but this llama.cpp build has no GPU")
    params.split_mode = _SPLIT_MODES[split_mode]
    if not tensor_split:
        return None
    n = int(L.llama_max_devices())
    arr = (ctypes.c_float * n)(*list(tensor_split)[:n])
    params.tensor_split = arr
    return arr


def _block_count(path: Path) -> int:
    """The model's number of repeating layers, from its GGUF metadata."""
    from gguf import GGUFReader  # imported lazily: only RPC loads need it

    fields = GGUFReader(str(path)).fields
    arch = fields.get("general.architecture")
    key = f"{arch.contents() if arch is not None else ''}.block_count"
    count = fields.get(key)
    value = count.contents() if count is not None else None
    if not isinstance(value, int) or value <= 0:
        raise ModelLoadError(f"'{path.name}' has no {key} to split its layers by")
    return value


def _apply_rpc(
    params: L.llama_model_params, path: Path, endpoints: Sequence[str], shares: Sequence[float]
) -> tuple[object, list[str]]:
    """Place layers on the local CPU and the RPC workers in proportions `shares` (local CPU
    first, then one per worker device; () = equal shares). Returns the arrays that must outlive
    the load call and one line per device saying where its layers went."""
    devices = add_servers(tuple(endpoints))
    n_devices = len(devices) + 1
    weights = [float(x) for x in shares] if shares else [1.0] * n_devices
    if len(weights) != n_devices:
        raise ModelLoadError(
            f"gpu_split has {len(weights)} entries, but the load has {n_devices} devices (the local "
            f"CPU and {len(devices)} RPC device(s)): give one amount per device, local CPU first"
        )
    total = sum(weights)
    n_offloadable = _block_count(path) + 1  # the repeating layers and the output layer
    n_local = round(n_offloadable * weights[0] / total)
    params.n_gpu_layers = n_offloadable - n_local
    params.split_mode = _SPLIT_MODES["layer"]
    remote = weights[1:]
    split = (ctypes.c_float * int(L.llama_max_devices()))(*remote) if sum(remote) > 0 else None
    if split is not None:
        params.tensor_split = split
    dev_list = device_array(devices)
    # the binding declares the field a plain pointer ("unused"): give it the array's address
    params.devices = ctypes.addressof(dev_list)  # type: ignore[assignment]
    lines = [f"local CPU: {n_local} of {n_offloadable} layers"]
    remote_total = sum(remote) or 1.0
    lines += [
        f"{d.name} (RPC worker {d.endpoint}): about {round(params.n_gpu_layers * w / remote_total)} "
        f"of {n_offloadable} layers"
        for d, w in zip(devices, remote, strict=True)
    ]
    return (split, dev_list), lines


class LlamaModel:
    """Owner of a `llama_model *` and its vocabulary."""

    def __init__(self, handle: ctypes.c_void_p, path: Path, name: str) -> None:
        self.handle = handle
        self.vocab = L.llama_model_get_vocab(handle)
        self.path = path
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self._pieces: list[bytes | None] = [None] * self.n_vocab
        self._special_pieces: list[bytes | None] = [None] * self.n_vocab
        self._buf = ctypes.create_string_buffer(256)
        self.info = self._read_info(name)

    @classmethod
    def load(
        cls,
        path: Path,
        name: str,
        *,
        vocab_only: bool = False,
        progress: Callable[[float], bool] | None = None,
        split_mode: str | None = None,
        tensor_split: Sequence[float] = (),
        rpc_servers: Sequence[str] = (),
    ) -> LlamaModel:
        """Load a model; `split_mode` ("none"/"layer"/"row") and `tensor_split` (proportions
        per device) place it on GPUs and are only given on builds that have one. With
        `rpc_servers` ("host:port" of `kodkod rpc-worker`s) the layers are split over the local
        CPU and the workers instead, `tensor_split` giving one share per device (local CPU
        first); the log says where each device's layers went."""
        init_llama()
        params = L.llama_model_default_params()
        params.n_gpu_layers = 0 if not gpu_devices_present() else -1
        params.vocab_only = vocab_only
        if rpc_servers and not vocab_only:
            split_ref, lines = _apply_rpc(params, path, rpc_servers, tensor_split)
            for line in lines:
                log.info("loading %s: %s", name, line)
        else:
            split_ref = _apply_split(params, split_mode, tensor_split)
        callback_ref = None
        if progress is not None:

            def _progress(value: float, _ud: ctypes.c_void_p) -> bool:
                try:
                    return bool(progress(float(value)))
                except Exception:  # never raise into C
                    log.exception("load progress callback failed")
                    return True

            callback_ref = L.llama_progress_callback(_progress)
            params.progress_callback = callback_ref
        handle = L.llama_model_load_from_file(str(path).encode(), params)
        del callback_ref, split_ref  # only needed during the call
        if not handle:
            raise ModelLoadError(
                f"llama.cpp could not load '{path.name}' (not a GGUF model it supports, a "
                "truncated file, or the load was cancelled)"
            )
        return cls(handle, path, name)

    # -- metadata ---------------------------------------------------------------------------

    def _meta_str(self, key: str) -> str | None:
        size = 4096
        while True:
            buf = ctypes.create_string_buffer(size)
            n = L.llama_model_meta_val_str(self.handle, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def _all_meta(self) -> dict[str, str]:
        out: dict[str, str] = {}
        kbuf = ctypes.create_string_buffer(512)
        for i in range(L.llama_model_meta_count(self.handle)):
            if L.llama_model_meta_key_by_index(self.handle, i, kbuf, 512) < 0:
                continue
            key = kbuf.value.decode("utf-8", errors="replace")
            if key.startswith("tokenizer.ggml.") and key not in (
                "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.model",
            ):
                continue  # token arrays: large and useless here
            value = self._meta_str(key)
            if value is not None:
                out[key] = value
        return out

    def _read_info(self, name: str) -> ModelInfo:
        vocab = self.vocab
        meta = self._all_meta()
        bos = int(L.llama_vocab_bos(vocab))
        eos_ids = {t for t in range(self.n_vocab) if L.llama_vocab_is_eog(vocab, t)}
        eos = int(L.llama_vocab_eos(vocab))
        if eos >= 0:
            eos_ids.add(eos)
        named = {
            k.removeprefix("tokenizer.chat_template."): v
            for k, v in meta.items()
            if k.startswith("tokenizer.chat_template.")
        }
        desc = ctypes.create_string_buffer(256)
        L.llama_model_desc(self.handle, desc, 256)
        return ModelInfo(
            name=name,
            path=self.path,
            architecture=meta.get("general.architecture", "unknown"),
            n_vocab=self.n_vocab,
            n_ctx_train=int(L.llama_model_n_ctx_train(self.handle)),
            n_params=int(L.llama_model_n_params(self.handle)),
            size_bytes=int(L.llama_model_size(self.handle)),
            bos_id=bos if bos >= 0 else None,
            eos_ids=frozenset(eos_ids),
            add_bos=bool(L.llama_vocab_get_add_bos(vocab)),
            bos_text=self.piece(bos, special=True).decode("utf-8", "replace") if bos >= 0 else "",
            eos_text=self.piece(eos, special=True).decode("utf-8", "replace") if eos >= 0 else "",
            chat_template=meta.get("tokenizer.chat_template"),
            named_chat_templates=named,
            metadata={**meta, "description": desc.value.decode("utf-8", "replace")},
        )

    # -- tokenizer --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.handle is None

    def check_open(self) -> None:
        """Raise ModelClosedError once `close()` has run."""
        if self.handle is None:
            raise ModelClosedError(f"the model {self.info.name!r} was unloaded")

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]:
        self.check_open()
        # a lone surrogate (JSON allows "\ud800") has no UTF-8 form: it becomes "?"
        data = text.encode("utf-8", "replace")
        n_max = len(data) + 8
        while True:
            arr = (L.llama_token * n_max)()
            n = L.llama_tokenize(self.vocab, data, len(data), arr, n_max, add_bos, parse_special)
            if n >= 0:
                return list(arr[:n])
            n_max = -n

    def piece(self, token_id: int, *, special: bool) -> bytes:
        """The bytes of one token; special tokens render as text only when `special`."""
        self.check_open()
        cache = self._special_pieces if special else self._pieces
        if 0 <= token_id < self.n_vocab:
            cached = cache[token_id]
            if cached is not None:
                return cached
        else:
            return b""
        buf = self._buf
        n = L.llama_token_to_piece(self.vocab, token_id, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token_id, buf, len(buf), 0, special)
        out = buf.raw[:n]
        cache[token_id] = out
        return out

    def token_bytes(self, token_id: int, *, special: bool) -> bytes:
        """`Tokenizer.token_bytes`: the same as `piece` (engine thread: shares a buffer)."""
        return self.piece(token_id, special=special)

    def detokenize(self, token_ids: Sequence[int], *, special: bool) -> str:
        return b"".join(self.piece(t, special=special) for t in token_ids).decode("utf-8", errors="replace")

    def vocab_fingerprint(self) -> str:
        """sha256 over every token's stored text: equal for models sharing a vocabulary."""
        self.check_open()
        h = hashlib.sha256()
        for t in range(self.n_vocab):
            h.update(L.llama_vocab_get_text(self.vocab, t) or b"")
            h.update(b"\0")
        return h.hexdigest()

    def close(self) -> None:
        if self.handle:
            handle, self.handle = self.handle, None  # type: ignore[assignment]
            self.vocab = None  # owned by the model: dies with it
            L.llama_model_free(handle)
