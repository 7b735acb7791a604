"""A loaded model and the small helpers around it: identity, threads, heap and placement.

`LoadedModel` is what `ModelManager` installs: the entry and parameters it was loaded with, the
backend's tokenizer and grammar compiler, its engine, the context plan, its chat template, an
optional draft and the LoRA library of `lora_dir`. `model_key` is a model's identity for "is it
loaded?". `LostModel` records a model the manager unloaded because its backend's process ended
(`lost_backend` finds that cause in an engine fault).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import time
from dataclasses import dataclass, field
from typing import Any

from kodkod.chat import ChatTemplate
from kodkod.core.backend_types import BackendLostError, ModelInfo
from kodkod.core.constraints import GrammarCompiler
from kodkod.engine.backend import Tokenizer
from kodkod.engine.client import EngineClient
from kodkod.models.context import ContextPlan
from kodkod.models.draft import DraftModel
from kodkod.models.lora import LoraLibrary
from kodkod.models.params import ModelLoadParams
from kodkod.models.registry import ModelEntry


class NoModelLoaded(Exception):
    """Raised by model-dependent code when nothing is loaded (→ 503)."""


@dataclass(slots=True)
class LoadedModel:
    entry: ModelEntry
    params: ModelLoadParams
    info: ModelInfo
    tokenizer: Tokenizer
    grammar: GrammarCompiler | None  # the backend's, None: no constrained decoding
    engine: EngineClient
    plan: ContextPlan
    template: ChatTemplate | None
    draft: DraftModel | None = None
    loras: LoraLibrary | None = None  # LoRA adapters of lora_dir for this model (models/lora.py)
    load_time_s: float = 0.0
    loaded_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def key(self) -> str:
        return model_key(self.entry)

    @property
    def max_seq_len(self) -> int:
        return self.plan.max_seq_len

    @property
    def cache_size(self) -> int:
        return self.plan.cache_size

    @property
    def cache_mode(self) -> str:
        return self.plan.cache_mode

    @property
    def max_batch_size(self) -> int:
        return self.plan.max_batch_size

    @property
    def chunk_size(self) -> int:
        return self.plan.chunk_size


@dataclass(frozen=True, slots=True)
class LostModel:
    """A model unloaded because its backend's process ended (an RPC worker went away)."""

    name: str
    reason: str  # BackendLostError's message: which workers no longer accept connections
    at: float = field(default_factory=time.time)  # time.time() of the unload

    @property
    def message(self) -> str:
        return f"the model {self.name!r} was unloaded: {self.reason}"


def lost_backend(exc: BaseException) -> BackendLostError | None:
    """The BackendLostError behind an engine fault, if that is what caused it."""
    seen: BaseException | None = exc
    for _ in range(8):  # causes chain shortly; never loop on a cycle
        if seen is None:
            return None
        if isinstance(seen, BackendLostError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def model_key(entry: ModelEntry) -> str:
    """Identity of a model for "is it loaded?": its resolved folder, or file when it has no
        folder (as in TabbyAPI since August 2026: names that resolve to the same path are the same
    model).
        Two folders linking one GGUF stay different models: their tabby_config.yml may differ."""
    return str((entry.folder or entry.gguf).resolve())


def available_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def release_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(name).malloc_trim(0)


def placement_kwargs(params: ModelLoadParams) -> dict[str, Any]:
    p = params.placement
    if p is None:
        return {}
    out: dict[str, Any] = {"split_mode": p.split_mode, "tensor_split": p.tensor_split}
    if p.rpc_servers:
        out["rpc_servers"] = p.rpc_servers
    return out
