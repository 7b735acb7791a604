"""Backend-facing value types: what a backend reports about a model, what the engine asks it to
decode, the capabilities it reports, and the errors it raises. Shared by the engine (which
defines the contract, see `engine/backend.py`) and the backends (which implement it) without
either importing the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kodkod.core.constraints import GrammarCompiler
from kodkod.core.types import AdapterKey


class BackendError(Exception):
    """A backend operation failed; the message is safe to show to users."""


class KVCacheFullError(BackendError):
    """The KV pool has no room for this batch (nothing was written)."""


class ModelLoadError(BackendError):
    """The model (or adapter) could not be loaded; the message says why."""


class AdapterError(BackendError):
    """A LoRA adapter could not be loaded or is not loaded; the message says why."""


class BackendLostError(BackendError):
    """The backend's process is gone (an RPC-backed model's engine child ended): nothing it held
    survives, every later call fails the same way, and only a new load can serve again. The
    message says why (e.g. which RPC worker no longer accepts connections)."""


class ModelClosedError(BackendError):
    """The model's native handles were freed (it was unloaded); nothing may use it any more.

    Requests hold a lease on their model so this is not reached in normal operation; it turns
    a use after close into a clean error (→ 503) instead of a dangling pointer."""

    def __init__(self, message: str = "the model was unloaded") -> None:
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Facts about a loaded model that the API and engine need."""

    name: str
    path: Path
    architecture: str
    n_vocab: int
    n_ctx_train: int
    n_params: int
    size_bytes: int
    bos_id: int | None
    eos_ids: frozenset[int]  # every end-of-generation token (EOS, EOT, ...)
    add_bos: bool  # the tokenizer adds BOS by itself
    bos_text: str
    eos_text: str
    chat_template: str | None
    named_chat_templates: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Which model file to load, and how to report progress."""

    path: Path
    name: str
    vocab_only: bool = False
    progress: Callable[[float], bool] | None = None  # return False to cancel the load


@dataclass(frozen=True, slots=True)
class ContextConfig:
    """How to size the context of a loaded model (decided once its metadata is known)."""

    cache_size: int  # KV cells shared by all slots
    num_slots: int
    batch_tokens: int  # the largest batch ever passed to decode()
    n_threads: int
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attention: bool = True
    rope_freq_scale: float = 0.0  # 0 = from the model
    rope_freq_base: float = 0.0  # 0 = from the model
    # True: one KV pool all slots share; False: one KV stream per slot, each of
    # cache_size / num_slots cells (rounded up to 256), attended by its own slot only
    kv_unified: bool = True


@dataclass(frozen=True, slots=True)
class BatchRow:
    slot: int
    tokens: Sequence[int]
    start_pos: int
    num_logits: int  # how many trailing tokens of this row produce logits (0 = none)


class AdapterHost(Protocol):
    """LoRA adapters on a backend's context (`BackendCapabilities.adapters`, None when absent).

    Engine thread only (llama.cpp reads the adapter list while it decodes), except reading
    `active` and setting `source`. `activate`/`clear` run as exclusive work (nothing running);
    `key_for` resolves a request's adapters by name — loading one it does not hold yet through
    `source` (name → prepared, validated GGUF path) — and `use` switches the context to a key
    before a decode (cheap when it is already in use).
    """

    source: Callable[[str], Path] | None

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        """The adapters requests use by default, as (name, scale)."""
        ...

    def activate(self, items: Sequence[tuple[str, Path, float]]) -> None:
        """Free every loaded adapter, load these (name, GGUF path, scale), make them active."""
        ...

    def clear(self) -> None:
        """Free every loaded adapter; nothing is active."""
        ...

    def key_for(self, wanted: Sequence[tuple[str, float]] | None) -> AdapterKey:
        """The key of (name, scale) pairs (None: the active ones); AdapterError if one is
        neither loaded nor loadable."""
        ...

    def use(self, key: AdapterKey) -> None: ...


@dataclass(frozen=True, slots=True)
class BackendCapabilities:
    """What a backend can do beyond the required contract (`engine.backend.Backend`); a field
    that is None means "not supported". A backend reports it as `capabilities`, and replaces
    it with an empty record when it is closed."""

    adapters: AdapterHost | None = None  # LoRA adapters on the context
    grammar: GrammarCompiler | None = None  # constrained decoding (thread-safe)
    vocab_fingerprint: Callable[[], str] | None = None  # equal for models sharing a vocabulary
