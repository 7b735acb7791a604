"""Draft models: vocabulary checks and the second backend a draft runs on.

A draft proposes tokens by id for the target to verify, so both must share one vocabulary.
`VocabProbe` reads a model's vocabulary without its weights (a llama.cpp vocab-only load) and
fingerprints it: `n_vocab` plus a sha256 over every token's text. Fingerprints are cached per
file (path, size, mtime), so checking a draft twice costs nothing. `check_same_vocab()` raises
`DraftVocabError` (a 400) naming both models when they differ.

`DraftModel` owns the draft's backend (weights + a context shaped like the target's pool);
the engine drafts with it (`engine/speculative/`). `spec_config()` turns the draft_model
parameters into the engine's `SpecConfig`: draft_mode "model" with a loaded draft → every
request drafts with it; "ngram" → every request drafts from n-grams; otherwise only requests
with `speculative_ngram: true` draft. k adapts to measured acceptance and cost when
`dynamic_draft` is true or `draft_num_tokens` is unset (then it is the upper bound, default
16 for a model, 12 for n-grams); `dynamic_draft: false` with `draft_num_tokens` is static
speculation: exactly that many every step.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kodkod.core.backend_types import ContextConfig, ModelInfo, ModelSource
from kodkod.engine.backend import Backend
from kodkod.engine.speculative.state import SpecConfig, SpecMode
from kodkod.models.context import ContextPlan
from kodkod.models.params import DraftParams, LoadParamError
from kodkod.models.registry import ModelEntry


class BackendLoader(Protocol):
    def __call__(
        self,
        source: ModelSource,
        make_config: Callable[[ModelInfo], ContextConfig] | None,
        *,
        split_mode: str | None = ...,
        tensor_split: Sequence[float] = ...,
        rpc_servers: Sequence[str] = ...,
    ) -> Backend: ...


class DraftVocabError(LoadParamError):
    """The draft's vocabulary differs from the target's."""


@dataclass(frozen=True, slots=True)
class VocabFingerprint:
    n_vocab: int
    digest: str
    info: ModelInfo  # hparams may be missing (vocab-only load): use models.context.n_ctx_train


@dataclass(slots=True)
class DraftModel:
    """A loaded draft model (owner of its backend; `close()` frees it)."""

    entry: ModelEntry
    params: DraftParams
    backend: Backend
    plan: ContextPlan

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def info(self) -> ModelInfo:
        return self.backend.info

    def close(self) -> None:
        self.backend.close()


def fingerprint_backend(backend: Backend) -> str:
    """sha256 over every token's text (the backend's own fingerprint when it reports one, else
    the token bytes)."""
    direct = backend.capabilities.vocab_fingerprint
    if direct is not None:
        return direct()
    h = hashlib.sha256()
    tok = backend.tokenizer
    for t in range(tok.n_vocab):
        h.update(tok.token_bytes(t, special=True))
        h.update(b"\0")
    return h.hexdigest()


class VocabProbe:
    """Vocabulary fingerprints of model files, cached per (path, size, mtime)."""

    def __init__(self, loader: BackendLoader) -> None:
        self._loader = loader
        self._cache: dict[tuple[str, int, int], VocabFingerprint] = {}
        self._lock = threading.Lock()

    def fingerprint(self, entry: ModelEntry) -> VocabFingerprint:
        path = entry.gguf.resolve()
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        backend = self._loader(ModelSource(entry.gguf, entry.name, vocab_only=True), None)
        try:
            digest = fingerprint_backend(backend)
            found = VocabFingerprint(backend.tokenizer.n_vocab, digest, backend.info)
        finally:
            backend.close()
        with self._lock:
            self._cache[key] = found
        return found


def check_same_vocab(probe: VocabProbe, target: ModelEntry, draft: ModelEntry) -> VocabFingerprint:
    """DraftVocabError unless draft and target share a vocabulary; returns the target's print."""
    t, d = probe.fingerprint(target), probe.fingerprint(draft)
    if t.n_vocab != d.n_vocab or t.digest != d.digest:
        detail = (
            f"{d.n_vocab} vs {t.n_vocab} tokens" if t.n_vocab != d.n_vocab else "same size, different tokens"
        )
        raise DraftVocabError(
            f"draft model {draft.name!r} cannot draft for {target.name!r}: their vocabularies "
            f"differ ({detail}); a draft model must use the same tokenizer as the model"
        )
    return t


def load_draft(
    loader: BackendLoader,
    entry: ModelEntry,
    params: DraftParams,
    make_plan: Callable[[ModelInfo], ContextPlan],
    progress: Callable[[float], None] | None,
    placement: dict[str, Any],
) -> DraftModel:
    """Load the draft's weights and a context planned by make_plan(info)."""
    plans: list[ContextPlan] = []

    def make_config(info: ModelInfo) -> ContextConfig:
        plans.append(make_plan(info))
        return plans[-1].config

    def on_progress(value: float) -> bool:
        if progress is not None:
            progress(value)
        return True

    source = ModelSource(Path(entry.gguf), entry.name, progress=on_progress)
    backend = loader(source, make_config, **placement)
    return DraftModel(entry, params, backend, plans[-1])


def spec_config(params: DraftParams | None, has_model: bool) -> SpecConfig:
    """The engine's speculative-decoding settings for these draft parameters."""
    if params is None:
        return SpecConfig()
    if params.draft_mode == "model" and has_model:
        mode = SpecMode.MODEL
    elif params.draft_mode == "ngram":
        mode = SpecMode.NGRAM
    else:  # disabled, mtp (no multi-token-prediction heads in llama.cpp models here)
        mode = SpecMode.OFF
    return SpecConfig(
        mode=mode,
        num_tokens=params.draft_num_tokens,
        dynamic=params.dynamic_draft or params.draft_num_tokens is None,
        ngram_match_min=params.ngram_match_min,
    )
