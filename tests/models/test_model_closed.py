"""A closed (unloaded) llama.cpp model refuses every use with ModelClosedError, never a crash.

Requests hold a lease on their model, so nothing should reach a freed model; this is the
backstop if something does: the vocabulary pointer dies with the model, and every call that
would pass it to llama.cpp raises a clean Python error instead (the API answers 503).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kodkod.backends.llamacpp.backend import LlamaCppBackend
from kodkod.core.backend_types import (
    BackendCapabilities,
    BatchRow,
    ContextConfig,
    ModelClosedError,
    ModelSource,
)
from kodkod.core.constraints import GrammarKind, GrammarSpec

pytestmark = pytest.mark.model


def test_a_closed_model_refuses_use_cleanly(default_gguf: Path) -> None:
    backend = LlamaCppBackend.load(
        ModelSource(default_gguf, "m"),
        lambda info: ContextConfig(
            cache_size=256,
            num_slots=1,
            batch_tokens=64,
            n_threads=1,
            cache_type_k="f16",
            cache_type_v="f16",
            flash_attention=False,
        ),
    )
    ids = backend.tokenize("Hello there", add_bos=True, parse_special=True)
    assert ids and backend.tokenizer.detokenize(ids, special=False).endswith("Hello there")
    compiler = backend.capabilities.grammar
    fingerprint = backend.capabilities.vocab_fingerprint
    assert compiler is not None and fingerprint is not None and backend.capabilities.adapters
    backend.close()
    backend.close()  # idempotent

    with pytest.raises(ModelClosedError, match="unloaded"):
        backend.tokenize("Hello", add_bos=True, parse_special=True)
    with pytest.raises(ModelClosedError):
        backend.token_bytes(ids[-1], special=False)  # even a token whose piece was cached
    with pytest.raises(ModelClosedError):
        backend.tokenizer.detokenize(ids, special=False)
    assert backend.capabilities == BackendCapabilities()  # a closed backend offers nothing
    with pytest.raises(ModelClosedError):
        compiler.compile(GrammarSpec(GrammarKind.REGEX, "[ab]+"))
    with pytest.raises(ModelClosedError):
        fingerprint()
    with pytest.raises(ModelClosedError):
        backend.decode([BatchRow(slot=0, start_pos=0, tokens=ids, num_logits=1)])
