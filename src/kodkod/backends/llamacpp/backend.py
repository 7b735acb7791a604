"""The llama.cpp backend: one model, one context with its KV cells, batched decode.

By default the context is created with `kv_unified=True`, so all `num_slots` sequence slots
share one pool of `cache_size` cells (llama.cpp rounds it up to a multiple of 256). With
`ContextConfig.kv_unified` off, llama.cpp keeps one KV stream per slot (seq id i is stream i)
of `cache_size / num_slots` cells rounded up to 256 (`slot_cells`), and each slot's attention
spans its own stream only. A prefix copy across streams cannot share cells: llama.cpp's
`seq_cp` would copy the whole stream at the next decode, after any state save or restore of the
same step, so `kv_copy` copies through the slot's saved state instead (`_copy_stream`). Both
are created with `swa_full=True` so sliding-window models keep every position a prefix copy
may need. A persistent `llama_batch` sized for the largest step is refilled in place each step
(`backends/llamacpp/batch.py`); decode() returns the batch indices whose logits were requested,
and `logits(index)` is a row of one numpy view of llama.cpp's logits buffer (remade only when
that buffer moves). What it offers beyond the contract is `self.capabilities`: LoRA adapters on
the context (`backends/llamacpp/lora.py`, freed before the context), the model's grammar
compiler (`backends/llamacpp/grammar.py`, closed before the model) and its vocabulary
fingerprint.
"""

from __future__ import annotations

import ctypes
import logging
import secrets
from collections.abc import Callable, Sequence

import llama_cpp as L
import numpy as np

from kodkod.backends.llamacpp.batch import NumpyBatch
from kodkod.backends.llamacpp.grammar import LlgCompiler
from kodkod.backends.llamacpp.lora import LoraHost
from kodkod.backends.llamacpp.model import LlamaModel
from kodkod.backends.llamacpp.rpc import gpu_devices_present
from kodkod.backends.llamacpp.sampler import NativeSampler
from kodkod.core.backend_types import (
    BackendCapabilities,
    BackendError,
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

# llama_get_logits returning the address as an int (the binding's own returns a pointer object)
_get_logits = L.llama_cpp._lib["llama_get_logits"]
_get_logits.argtypes = [ctypes.c_void_p]
_get_logits.restype = ctypes.c_void_p

# Cache type names accepted by `ContextConfig.cache_type_k/_v` → GGML type ids.
CACHE_TYPES: dict[str, int] = {
    "f32": L.GGML_TYPE_F32,
    "f16": L.GGML_TYPE_F16,
    "bf16": 30,
    "q8_0": L.GGML_TYPE_Q8_0,
    "q5_1": L.GGML_TYPE_Q5_1,
    "q5_0": L.GGML_TYPE_Q5_0,
    "q4_1": L.GGML_TYPE_Q4_1,
    "q4_0": L.GGML_TYPE_Q4_0,
    "iq4_nl": L.GGML_TYPE_IQ4_NL,
}


class LlamaCppBackend:
    """Implements `engine.backend.Backend` (structurally) on llama.cpp's low-level API."""

    def __init__(self, model: LlamaModel, config: ContextConfig | None) -> None:
        self._model = model
        self.tokenizer: LlamaModel = model
        self.config = config
        self.info: ModelInfo = model.info
        self._ctx = None
        self._batch: NumpyBatch | None = None
        self._n_vocab = model.n_vocab
        self._outputs: np.ndarray | None = None  # the last decode's logits, one row per output
        self._num_outputs = 0
        self._logits_addr = 0  # where llama.cpp's logits buffer was, and a view of its rows there
        self._logits_view = np.zeros((0, self._n_vocab), np.float32)
        self._row_of: dict[int, int] | None = None  # batch index -> output row (None: the same)
        self.adapters: LoraHost | None = None  # LoRA adapters (core.backend_types.AdapterHost)
        self._grammar: LlgCompiler | None = LlgCompiler(model)  # builds its tables on first use
        self.capabilities = self._capabilities()
        self.kv_unified = True
        if config is None:  # tokenizer-only
            self.num_slots = 0
            self.kv_capacity = 0
            self.slot_cells = 0
            return
        self.num_slots = config.num_slots
        params = L.llama_context_default_params()
        params.n_ctx = config.cache_size
        params.n_batch = config.batch_tokens
        params.n_ubatch = min(config.batch_tokens, 512)
        params.n_seq_max = config.num_slots
        params.n_threads = config.n_threads
        params.n_threads_batch = config.n_threads
        params.kv_unified = config.kv_unified
        params.swa_full = True
        params.no_perf = True
        params.flash_attn_type = 1 if config.flash_attention else 0
        try:
            params.type_k = CACHE_TYPES[config.cache_type_k]
            params.type_v = CACHE_TYPES[config.cache_type_v]
        except KeyError as exc:
            raise ModelLoadError(f"unknown KV cache type {exc.args[0]!r}") from None
        if config.rope_freq_scale:
            params.rope_freq_scale = config.rope_freq_scale
        if config.rope_freq_base:
            params.rope_freq_base = config.rope_freq_base
        ctx = L.llama_init_from_model(model.handle, params)
        if not ctx:
            raise ModelLoadError(
                f"llama.cpp could not create a context (cache_size={config.cache_size}, "
                f"cache types {config.cache_type_k}/{config.cache_type_v}, flash attention "
                f"{'on' if config.flash_attention else 'off'}); a quantised V cache needs flash "
                "attention"
            )
        self._ctx = ctx
        self.adapters = LoraHost(model.handle, ctx)
        self.capabilities = self._capabilities()
        self._mem = L.llama_get_memory(ctx)
        self.kv_capacity = int(L.llama_n_ctx(ctx))
        self.kv_unified = config.kv_unified
        self.slot_cells = 0 if config.kv_unified else int(L.llama_n_ctx_seq(ctx))
        self._batch = NumpyBatch(config.batch_tokens)

    @classmethod
    def load(
        cls,
        source: ModelSource,
        make_config: Callable[[ModelInfo], ContextConfig] | None,
        *,
        split_mode: str | None = None,
        tensor_split: Sequence[float] = (),
        rpc_servers: Sequence[str] = (),
    ) -> LlamaCppBackend:
        """Load the model, then size its context with make_config(info) (None: tokenizer only).
        `split_mode`/`tensor_split`: GPU placement (GPU builds only), or with `rpc_servers`
        the shares of the local CPU and each RPC worker (see LlamaModel.load)."""
        model = LlamaModel.load(
            source.path,
            source.name,
            vocab_only=source.vocab_only,
            progress=source.progress,
            split_mode=split_mode,
            tensor_split=tensor_split,
            rpc_servers=rpc_servers,
        )
        try:
            return cls(model, make_config(model.info) if make_config is not None else None)
        except BaseException:
            model.close()
            raise

    @staticmethod
    def supports_gpu_offload() -> bool:
        """Whether this llama.cpp build can place layers on a GPU."""
        return gpu_devices_present()  # llama.cpp counts an RPC-enabled build as one

    def _capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(
            adapters=self.adapters,
            grammar=self._grammar,
            vocab_fingerprint=self._model.vocab_fingerprint,
        )

    # -- tokenizer ----------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]:
        return self._model.tokenize(text, add_bos=add_bos, parse_special=parse_special)

    def token_bytes(self, token_id: int, *, special: bool) -> bytes:
        return self._model.piece(token_id, special=special)

    # -- decode -------------------------------------------------------------------------------

    def decode(self, rows: Sequence[BatchRow]) -> list[list[int]]:
        batch = self._batch
        if batch is None:
            if self._model.closed:
                raise ModelClosedError()
            raise BackendError("the model was loaded for tokenizing only")
        self._outputs = None  # llama_decode may move the logits buffer
        out = batch.fill(rows, in_slot_order=not self.kv_unified)
        n_tokens = batch.struct.n_tokens
        n_outputs = sum(len(idx) for idx in out)
        self._num_outputs = n_outputs
        # llama.cpp stores the requested logits contiguously, in batch order
        wanted = None if n_outputs == n_tokens else sorted(b for idx in out for b in idx)
        self._row_of = None if wanted is None else {b: k for k, b in enumerate(wanted)}
        rc = L.llama_decode(self._ctx, batch.struct)
        if rc == 1:
            raise KVCacheFullError("no room in the KV cache for this batch")
        if rc != 0:
            raise BackendError(f"llama_decode failed with status {rc}")
        return out

    def logits(self, index: int) -> np.ndarray:
        outputs = self._outputs
        if outputs is None:
            outputs = self._outputs = self._output_logits()
        row_of = self._row_of
        return outputs[index if row_of is None else row_of[index]]

    def _output_logits(self) -> np.ndarray:
        """All logits of the last decode as one (outputs, n_vocab) view. llama.cpp keeps them in
        one buffer that only moves when it grows, so the view is remade only then."""
        addr = _get_logits(self._ctx)
        n = self._num_outputs
        if not addr or n == 0:
            raise BackendError("the last decode produced no logits")
        view = self._logits_view
        if addr != self._logits_addr or view.shape[0] < n:
            flat = np.frombuffer((ctypes.c_float * (n * self._n_vocab)).from_address(addr), np.float32)  # type: ignore[call-overload]  # stubs omit ctypes arrays
            view = self._logits_view = flat.reshape(n, self._n_vocab)
            self._logits_addr = addr
        return view[:n]

    # -- KV cache -----------------------------------------------------------------------------

    def kv_copy(self, src: int, dst: int, p0: int, p1: int) -> None:
        if self.kv_unified:
            L.llama_memory_seq_cp(self._mem, src, dst, p0, p1)  # shares the cells
        else:
            self._copy_stream(src, dst, p0, p1)

    def _copy_stream(self, src: int, dst: int, p0: int, p1: int) -> None:
        """Per-slot streams: dst (empty) gets a copy of src's positions [p0, p1). llama.cpp's
        cross-stream `seq_cp` only queues a whole-stream buffer copy for the next decode, so a
        save or restore of either slot before then would see the old data; the slot's state
        round trip copies now, and only its occupied cells."""
        if p0 > 0:
            raise BackendError("a prefix copy between KV streams must start at position 0")
        self.kv_restore(dst, self.kv_save(src))
        if p1 >= 0:
            self.kv_remove(dst, p1, -1)

    def kv_remove(self, slot: int, p0: int, p1: int = -1) -> None:
        if not L.llama_memory_seq_rm(self._mem, slot, p0, p1):
            raise BackendError(f"could not remove KV positions {p0}..{p1} of slot {slot}")

    def kv_clear(self) -> None:
        L.llama_memory_clear(self._mem, True)

    def kv_save(self, slot: int) -> bytearray:
        """The slot's KV (positions and K/V data), for the host-RAM prefix tier. llama.cpp
        writes straight into the returned buffer, which is faster than filling a ctypes array
        and copying it to bytes (docs/measurements.md)."""
        size = int(L.llama_state_seq_get_size(self._ctx, slot))
        data = bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(data)
        written = int(L.llama_state_seq_get_data(self._ctx, view, size, slot))
        del view  # releases the export, so the bytearray may be resized or freed later
        if written != size:
            raise BackendError(f"could not save the KV of slot {slot} ({written}/{size} bytes)")
        return data

    def kv_restore(self, slot: int, data: bytearray) -> None:
        """Load kv_save() data into an empty slot, read in place (a copy first would cost more
        than the restore itself). The same KV bytes, but the cells may sit elsewhere in the
        pool, which moves the attention sums' last bits."""
        src = (ctypes.c_uint8 * len(data)).from_buffer(data)
        if int(L.llama_state_seq_set_data(self._ctx, src, len(data), slot)) != len(data):
            raise BackendError(f"could not restore a cached prefix into slot {slot}")

    # -- sampling -----------------------------------------------------------------------------

    def new_sampler(
        self, params: SamplingParams, history: Sequence[int], num_prompt: int | None = None
    ) -> NativeSampler:
        seed = params.seed if params.seed is not None and params.seed >= 0 else secrets.randbits(32)
        stages = build_stages(params, n_vocab=self._n_vocab, seed=seed & 0xFFFFFFFF)
        return NativeSampler(
            self._ctx,
            self._model.vocab,
            self._n_vocab,
            self.kv_capacity,
            stages,
            self.logits,
            history,
            num_prompt,
        )

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        self.capabilities = BackendCapabilities()
        if self._grammar is not None:
            self._grammar.close()
            self._grammar = None
        if self.adapters is not None:
            self.adapters.close()  # adapters first: the context points at them
            self.adapters = None
        self._batch = None
        self._outputs = None
        if self._ctx is not None:
            L.llama_free(self._ctx)
            self._ctx = None
        self._model.close()
