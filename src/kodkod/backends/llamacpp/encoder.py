"""A sentence encoder on llama.cpp: an embedding context over a loaded GGUF model.

`LlamaEncoder.load(path, name, n_threads=...)` loads the model and creates its own context
with `embeddings=True`, the model's pooling (mean / CLS / last; a non-causal model without one
pools by its mean; a causal model without one is a chat model and refused), flash attention
(it skips the masked cells between packed inputs), and `n_batch = n_ubatch`
large enough for the longest input: a non-causal model must see all tokens of a sequence in
one micro-batch. `embed()` packs many inputs into one `llama_batch` (one sequence id per input,
positions from 0), runs it, and reads each input's pooled vector with
`llama_get_embeddings_seq`; WordPiece (BERT) text is decomposed to NFD before llama.cpp
tokenizes it, as BERT's own tokenizer does first; vectors are L2-normalised when the model
says so (the converter's `kodkod.embedding.normalize` key; a GGUF without it is normalised,
as OpenAI's API does).
`lanes` contexts share the one model: calls on different lanes run at the same time (each on
its own threads), calls on one lane one after another (each lane has a lock). Several small
single-threaded contexts beat one context with several threads on packed short inputs: they
never wait at each other's per-operation barriers, and the small operations (norms, GELU,
attention of a pack) run in parallel whole instead of split (docs/measurements.md).
The object owns the model, the contexts and their batches; `close()` frees them (waiting for
a running call), contexts first.
"""

from __future__ import annotations

import ctypes
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as L
import numpy as np

from kodkod.backends.llamacpp.model import LlamaModel
from kodkod.core.backend_types import BackendError, ModelClosedError, ModelLoadError
from kodkod.core.encoder_types import EncoderInfo

__all__ = ["BATCH_SEQUENCES", "LlamaEncoder"]

BATCH_SEQUENCES = 64  # inputs packed into one call (llama.cpp's sequence ids per context)
# The micro-batch holds at least one whole input of the longest kind; inputs are packed into
# calls of at most PACK_TOKENS, where the cost per input is lowest (docs/measurements.md).
# Flash attention skips the masked (other-sequence) cells of a packed micro-batch key by key,
# which the plain attention path multiplies out in full; from 64 query rows (ggml's
# GGML_FA_TILE_Q) llama.cpp's CPU flash attention switches to a tiled kernel that multiplies
# out every 64 x 64 tile holding one unmasked cell, so packs stay below that. Two inputs too
# long to share such a call still share one of at most PAIR_TOKENS: half of the tiles do work,
# and each call has a fixed cost.
MIN_BATCH_TOKENS = 256
PACK_TOKENS = 63
PAIR_TOKENS = 96
_POOLING_NAMES = {
    L.LLAMA_POOLING_TYPE_MEAN: "mean",
    L.LLAMA_POOLING_TYPE_CLS: "cls",
    L.LLAMA_POOLING_TYPE_LAST: "last",
}
NORMALIZE_KEY = "kodkod.embedding.normalize"
MAX_SEQ_KEY = "kodkod.embedding.max_seq_length"


@dataclass(slots=True)
class _Lane:
    """One embedding context, its memory handle (None for models without one) and its batch;
    `lock` is held by the call running on it."""

    ctx: L.llama_context_p | None
    mem: L.llama_memory_t | None
    batch: L.llama_batch | None
    lock: threading.Lock


class LlamaEncoder:
    """Implements `core.encoder_types.Encoder` on llama.cpp's low-level API."""

    def __init__(self, model: LlamaModel, n_threads: int, lanes: int = 1) -> None:
        self._model = model
        self._wordpiece = int(L.llama_vocab_type(model.vocab)) == L.LLAMA_VOCAB_TYPE_WPM
        meta = model.info.metadata
        arch = model.info.architecture
        causal = meta.get(f"{arch}.attention.causal", "true").lower() != "false"
        n_ctx_train = model.info.n_ctx_train
        max_tokens = n_ctx_train
        if MAX_SEQ_KEY in meta:
            max_tokens = min(int(meta[MAX_SEQ_KEY]), n_ctx_train)
        normalize = meta.get(NORMALIZE_KEY, "true").lower() != "false"
        batch_tokens = max(MIN_BATCH_TOKENS, max_tokens)
        params = L.llama_context_default_params()
        params.embeddings = True
        params.n_ctx = batch_tokens
        params.n_batch = batch_tokens
        params.n_ubatch = batch_tokens
        params.n_seq_max = BATCH_SEQUENCES
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.kv_unified = True
        params.no_perf = True
        params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if causal and f"{arch}.pooling_type" not in meta:
            raise ModelLoadError(
                f"{model.info.name!r} is not an embedding model: a {arch} text-generation model "
                "(causal attention and no pooling type in its GGUF)"
            )
        pooling = int(meta.get(f"{arch}.pooling_type", L.LLAMA_POOLING_TYPE_UNSPECIFIED))
        if pooling not in _POOLING_NAMES:
            pooling = L.LLAMA_POOLING_TYPE_LAST if causal else L.LLAMA_POOLING_TYPE_MEAN
        params.pooling_type = pooling
        self._lanes: list[_Lane] = []
        self._closed = False
        try:
            for _ in range(max(1, lanes)):
                ctx = L.llama_init_from_model(model.handle, params)
                if not ctx:
                    raise ModelLoadError(
                        f"llama.cpp could not create an embedding context for {model.info.name!r}"
                    )
                lane = _Lane(ctx, L.llama_get_memory(ctx) or None, None, threading.Lock())
                self._lanes.append(lane)
                lane.batch = L.llama_batch_init(batch_tokens, 0, 1)
        except BaseException:
            self._free_lanes()
            raise
        self._n_embd = int(L.llama_model_n_embd(model.handle))
        self.info = EncoderInfo(
            name=model.info.name,
            path=model.path,
            architecture=arch,
            n_embd=self._n_embd,
            n_vocab=model.n_vocab,
            max_input_tokens=max_tokens,
            batch_tokens=batch_tokens,
            batch_sequences=BATCH_SEQUENCES,
            pooling=_POOLING_NAMES[pooling],
            normalize=normalize,
            pack_tokens=min(PACK_TOKENS, batch_tokens),
            pair_tokens=min(PAIR_TOKENS, batch_tokens),
            lanes=len(self._lanes),
        )

    @classmethod
    def load(cls, path: Path, name: str, *, n_threads: int, lanes: int = 1) -> LlamaEncoder:
        """`lanes` contexts with `n_threads` threads each."""
        model = LlamaModel.load(path, name)
        try:
            return cls(model, n_threads, lanes)
        except BaseException:
            model.close()
            raise

    def tokenize(self, text: str) -> list[int]:
        if self._wordpiece:
            # BERT's tokenizer decomposes (NFD) before it lowercases and strips accents;
            # llama.cpp's WordPiece pre-processing leaves Hangul syllables half-decomposed,
            # so the text arrives already decomposed (NFD is idempotent for everything else).
            text = unicodedata.normalize("NFD", text)
        return self._model.tokenize(text, add_bos=True, parse_special=False)

    def embed(self, inputs: Sequence[Sequence[int]], lane: int = 0) -> np.ndarray:
        info = self.info
        total = sum(len(ids) for ids in inputs)
        if len(inputs) > info.batch_sequences or total > info.batch_tokens:
            raise BackendError(f"{len(inputs)} inputs of {total} tokens exceed one embedding batch")
        if any(not ids or len(ids) > info.max_input_tokens for ids in inputs):
            raise BackendError(f"an input is empty or longer than {info.max_input_tokens} tokens")
        if not 0 <= lane < len(self._lanes):
            raise BackendError(f"no embedding lane {lane} (this encoder has {len(self._lanes)})")
        target = self._lanes[lane]
        with target.lock:
            if target.ctx is None or target.batch is None:
                raise ModelClosedError(f"the embedding model {self.info.name!r} was unloaded")
            return self._run(target.ctx, target.mem, target.batch, inputs)

    def _run(
        self,
        ctx: L.llama_context_p,
        mem: L.llama_memory_t | None,
        batch: Any,  # L.llama_batch (its ctypes arrays are loosely typed)
        inputs: Sequence[Sequence[int]],
    ) -> np.ndarray:
        token, pos, n_seq, seq_id, want = (batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits)
        i = 0
        for seq, ids in enumerate(inputs):
            for p, t in enumerate(ids):
                token[i] = t
                pos[i] = p
                n_seq[i] = 1
                seq_id[i][0] = seq
                want[i] = True
                i += 1
        batch.n_tokens = i
        if mem:
            L.llama_memory_clear(mem, True)
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise BackendError(f"llama_decode failed with status {rc} on an embedding batch")
        out = np.empty((len(inputs), self._n_embd), dtype=np.float32)
        row_type = ctypes.c_float * self._n_embd
        for seq in range(len(inputs)):
            ptr = L.llama_get_embeddings_seq(ctx, seq)
            if not ptr:
                raise BackendError("llama.cpp returned no pooled embedding")
            out[seq] = np.frombuffer(row_type.from_address(ctypes.addressof(ptr.contents)), np.float32)  # type: ignore[call-overload]
        if self.info.normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out /= np.maximum(norms, 1e-12)
        return out

    def _free_lanes(self) -> None:
        for lane in self._lanes:
            with lane.lock:  # a running call finishes first
                if lane.batch is not None:
                    L.llama_batch_free(lane.batch)
                    lane.batch = None
                if lane.ctx is not None:
                    L.llama_free(lane.ctx)
                    lane.ctx = None
                lane.mem = None

    def close(self) -> None:
        self._free_lanes()
        if not self._closed:
            self._closed = True
            self._model.close()
