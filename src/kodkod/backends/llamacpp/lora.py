"""LoRA adapters on a llama.cpp context (`engine.backend.AdapterHost`).

`LoraAdapter` owns one `llama_adapter_lora *` (`close()` frees it). `LoraHost` keeps the loaded
adapters by name, each with an id that is never reused, the *active* set (TabbyAPI's
/v1/lora/load: what requests use by default) and the set the context currently applies.

llama.cpp applies an adapter as `W·x + scale·(alpha/rank)·B·(A·x)` (alpha from the adapter's
`adapter.lora.alpha`, rank from its B tensor; alpha 0 means scale alone); `scale` is the user's
`scaling`. `llama_set_adapters_lora` swaps the context's set (pointers and scales) and makes the
next decode rebuild its graph; it compares sets itself, and `use()` skips the call entirely
when the key is unchanged. Zero-scale adapters are left out (llama.cpp ignores them anyway),
so scaling 0 computes exactly the base model.

Every call here runs on the engine thread: llama.cpp registers adapters in a set on the model
that decode reads, so loading or freeing one must never overlap a decode.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import llama_cpp as L

from kodkod.core.backend_types import AdapterError
from kodkod.core.types import AdapterKey

log = logging.getLogger(__name__)


class LoraAdapter:
    """Owner of one loaded adapter."""

    __slots__ = ("uid", "name", "path", "handle")

    def __init__(self, uid: int, name: str, path: Path, handle: object) -> None:
        self.uid = uid
        self.name = name
        self.path = path
        self.handle = handle

    def close(self) -> None:
        if self.handle is not None:
            L.llama_adapter_lora_free(self.handle)
            self.handle = None


class LoraHost:
    """The adapters of one backend; see the module docstring."""

    def __init__(self, model_handle: object, ctx: object) -> None:
        self._model = model_handle
        self._ctx = ctx
        self._loaded: dict[str, LoraAdapter] = {}
        self._by_uid: dict[int, LoraAdapter] = {}
        self._next_uid = 1
        self._active: tuple[tuple[str, float], ...] = ()
        self._applied: AdapterKey = ()
        self.source: Callable[[str], Path] | None = None

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        return self._active  # replaced whole, never mutated: safe to read from any thread

    @property
    def loaded(self) -> list[str]:
        return sorted(self._loaded)

    # -- loading ----------------------------------------------------------------------------

    def _open(self, name: str, path: Path) -> LoraAdapter:
        handle = L.llama_adapter_lora_init(self._model, str(path).encode())
        if not handle:
            raise AdapterError(
                f"llama.cpp could not load the LoRA adapter {name!r} from {path.name} (see the "
                "server log for its reason)"
            )
        adapter = LoraAdapter(self._next_uid, name, path, handle)
        self._next_uid += 1
        log.info("loaded LoRA adapter %s (%s) as #%d", name, path.name, adapter.uid)
        return adapter

    def _register(self, adapter: LoraAdapter) -> None:
        old = self._loaded.get(adapter.name)
        if old is not None:
            self._drop(old)
        self._loaded[adapter.name] = adapter
        self._by_uid[adapter.uid] = adapter

    def _drop(self, adapter: LoraAdapter) -> None:
        if any(uid == adapter.uid for uid, _ in self._applied):
            self.use(())  # the context must not point at a freed adapter
        self._loaded.pop(adapter.name, None)
        self._by_uid.pop(adapter.uid, None)
        adapter.close()

    def activate(self, items: Sequence[tuple[str, Path, float]]) -> None:
        """Load `items` (all or none), then free everything else and make them active."""
        fresh: list[LoraAdapter] = []
        try:
            for name, path, _ in items:
                fresh.append(self._open(name, path))
        except BaseException:
            for adapter in fresh:
                adapter.close()
            raise
        self.clear()
        for adapter in fresh:
            self._register(adapter)
        self._active = tuple((name, float(scale)) for name, _, scale in items)

    def clear(self) -> None:
        self.use(())
        for adapter in list(self._loaded.values()):
            self._drop(adapter)
        self._active = ()

    # -- use --------------------------------------------------------------------------------

    def _get(self, name: str) -> LoraAdapter:
        adapter = self._loaded.get(name)
        if adapter is not None:
            return adapter
        if self.source is None:
            raise AdapterError(f"the LoRA adapter {name!r} is not loaded")
        try:
            path = self.source(name)
        except Exception as exc:  # the source's message is user-facing (LoraError)
            raise AdapterError(str(exc)) from None
        adapter = self._open(name, path)
        self._register(adapter)
        return adapter

    def key_for(self, wanted: Sequence[tuple[str, float]] | None) -> AdapterKey:
        scales: dict[int, float] = {}
        for name, scale in self._active if wanted is None else wanted:
            if scale == 0.0:
                continue
            uid = self._get(name).uid
            scales[uid] = scales.get(uid, 0.0) + float(scale)
        return tuple(sorted(scales.items()))

    def use(self, key: AdapterKey) -> None:
        if key == self._applied:
            return
        n = len(key)
        if n == 0:
            L.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            try:
                handles: list[Any] = [self._by_uid[uid].handle for uid, _ in key]
            except KeyError:
                raise AdapterError("a LoRA adapter this request uses was unloaded") from None
            arr = (L.llama_adapter_lora_p_ctypes * n)(*handles)
            scales = (ctypes.c_float * n)(*(s for _, s in key))
            L.llama_set_adapters_lora(self._ctx, arr, n, scales)
        self._applied = key

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Free every adapter (before the context and model are freed)."""
        if self._ctx is not None:
            self.clear()
        self._ctx = None
