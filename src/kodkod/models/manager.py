"""The model manager: what is loaded, and loading / unloading it safely.

One main model at a time. A load runs llama.cpp's blocking loader in a worker thread (the HTTP
loop keeps serving; model-dependent endpoints answer 503 meanwhile), sizes the context from the
model's metadata, finds its chat template and starts an engine thread for it. Unloading ends
every pending and running request with an error event, stops the engine and frees every C
handle. Loads and unloads are serialised by one lock.

The concrete backend is injected (`backend_loader`), so this module never imports llama.cpp.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kodkod.backends.base import Backend, ContextConfig, ModelInfo, ModelSource, Tokenizer
from kodkod.chat import ChatTemplate, find_template
from kodkod.engine.client import EngineClient
from kodkod.engine.loop import EngineConfig
from kodkod.models.params import (
    DEFAULT_MAX_BATCH_SIZE,
    ModelLoadParams,
    cache_types,
    context_sizes,
    rope_settings,
)
from kodkod.models.registry import ModelEntry

log = logging.getLogger(__name__)

ProgressFn = Callable[[float], None]


class BackendLoader(Protocol):
    def __call__(
        self, source: ModelSource, make_config: Callable[[ModelInfo], ContextConfig] | None
    ) -> Backend: ...


class NoModelLoaded(Exception):
    """Raised by model-dependent code when nothing is loaded (→ 503)."""


@dataclass(slots=True)
class LoadedModel:
    entry: ModelEntry
    params: ModelLoadParams
    info: ModelInfo
    tokenizer: Tokenizer
    engine: EngineClient
    max_seq_len: int
    cache_size: int
    cache_mode: str
    max_batch_size: int
    chunk_size: int
    template: ChatTemplate | None
    loaded_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.entry.name


def available_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _context_config(
    params: ModelLoadParams, info: ModelInfo, sizes: dict[str, int]
) -> ContextConfig:
    """Decide the context of a freshly loaded model (records the sizes into `sizes`)."""
    max_seq_len, cache_size = context_sizes(info.n_ctx_train, params.max_seq_len, params.cache_size)
    type_k, type_v = cache_types(params.cache_mode)
    batch = params.max_batch_size or DEFAULT_MAX_BATCH_SIZE
    chunk = max(16, min(params.chunk_size, max_seq_len))
    arch = info.architecture
    meta = info.metadata
    heads = int(meta.get(f"{arch}.attention.head_count", "0") or 0)
    embd = int(meta.get(f"{arch}.embedding_length", "0") or 0)
    head_dim = int(meta.get(f"{arch}.attention.key_length", "0") or 0) or (embd // heads if heads else 0)
    freq_base = float(meta.get(f"{arch}.rope.freq_base", "10000") or 10000)
    scale, base = rope_settings(
        params, max_seq_len=max_seq_len, n_ctx_train=info.n_ctx_train, freq_base=freq_base, head_dim=head_dim
    )
    sizes.update(max_seq_len=max_seq_len, cache_size=cache_size, max_batch_size=batch, chunk_size=chunk)
    return ContextConfig(
        cache_size=cache_size,
        num_slots=min(256, batch + max(8, batch)),
        batch_tokens=max(chunk, batch * 8),
        n_threads=params.n_threads or available_threads(),
        cache_type_k=type_k,
        cache_type_v=type_v,
        flash_attention=params.flash_attention,
        rope_freq_scale=scale,
        rope_freq_base=base,
    )


class ModelManager:
    def __init__(
        self,
        backend_loader: BackendLoader,
        templates_dir: Path,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._loader = backend_loader
        self._templates_dir = templates_dir
        self._on_fatal = on_fatal
        self.current: LoadedModel | None = None
        self.lock = asyncio.Lock()
        self.loading: str | None = None

    def require(self) -> LoadedModel:
        model = self.current
        if model is None or not model.engine.alive:
            raise NoModelLoaded("No models are currently loaded")
        return model

    async def load(
        self, entry: ModelEntry, params: ModelLoadParams, progress: ProgressFn | None = None
    ) -> LoadedModel:
        async with self.lock:
            await self._unload_locked("the model was replaced by another load")
            self.loading = entry.name
            try:
                loaded = await asyncio.to_thread(self._load_blocking, entry, params, progress)
            finally:
                self.loading = None
            self.current = loaded
            return loaded

    def _load_blocking(
        self, entry: ModelEntry, params: ModelLoadParams, progress: ProgressFn | None
    ) -> LoadedModel:
        t0 = time.perf_counter()
        sizes: dict[str, int] = {}

        def on_progress(value: float) -> bool:
            if progress is not None:
                progress(value)
            return True

        backend = self._loader(
            ModelSource(entry.gguf, entry.name, progress=on_progress),
            lambda info: _context_config(params, info, sizes),
        )
        try:
            template = find_template(
                prompt_template=params.prompt_template,
                templates_dir=self._templates_dir,
                model_path=entry.folder or entry.gguf,
                gguf_template=backend.info.chat_template,
                gguf_named_templates=backend.info.named_chat_templates,
            )
            engine = EngineClient.start(
                backend,
                EngineConfig(sizes["max_seq_len"], sizes["max_batch_size"], sizes["chunk_size"]),
                self._on_fatal,
            )
        except BaseException:
            backend.close()
            raise
        log.info(
            "loaded %s in %.1f s (max_seq_len %d, cache %d tokens, %s, batch %d)",
            entry.name, time.perf_counter() - t0, sizes["max_seq_len"], sizes["cache_size"],
            params.cache_mode, sizes["max_batch_size"],
        )
        return LoadedModel(
            entry=entry,
            params=params,
            info=backend.info,
            tokenizer=backend.tokenizer,
            engine=engine,
            max_seq_len=sizes["max_seq_len"],
            cache_size=sizes["cache_size"],
            cache_mode=params.cache_mode,
            max_batch_size=sizes["max_batch_size"],
            chunk_size=sizes["chunk_size"],
            template=template,
        )

    async def unload(self, message: str = "the model was unloaded") -> bool:
        async with self.lock:
            return await self._unload_locked(message)

    async def _unload_locked(self, message: str) -> bool:
        model, self.current = self.current, None
        if model is None:
            return False
        await model.engine.shutdown(message)
        await asyncio.to_thread(model.engine.close_backend)
        log.info("unloaded %s", model.name)
        return True

    def shutdown_sync(self) -> None:
        """Process exit: stop the engine and free the model without an event loop."""
        model, self.current = self.current, None
        if model is not None:
            model.engine.shutdown_sync("the server is shutting down")
            model.engine.close_backend()
