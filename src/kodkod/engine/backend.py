"""The backend contract: what the engine needs from an inference library.

The engine drives a backend from its single thread. A backend owns one model, one context with a
KV pool of `kv_capacity` cells for `num_slots` sequence slots — shared by all slots, or split
into one stream of `slot_cells` cells per slot — and makes samplers.
Only `backends.llamacpp` implements it with llama.cpp (structurally: it never imports the
engine); tests use a fake. The value types it exchanges are in `core/backend_types.py`.

One `decode(rows)` call evaluates every row in one forward pass. A row is a run of tokens of
one slot starting at `start_pos`; its last `num_logits` tokens produce logits. The call returns,
for each row, the batch indices of its logits in order, which `logits()` and
`Sampler.sample()` take. KV ops (`kv_copy`, `kv_remove`) keep a slot's cache equal to the
tokens the engine believes it holds; speculative rollback is just `kv_remove` of the rejected
tail.

What a backend can do beyond this contract (LoRA adapters, grammar compilation, a fast
vocabulary fingerprint) it reports in `capabilities`, a `core.backend_types.BackendCapabilities`
record (in core because the backend builds it without importing the engine); callers read it,
they never probe a backend's attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from kodkod.core.backend_types import BackendCapabilities, BatchRow, ModelInfo
from kodkod.core.types import SamplingParams


class Sampler(Protocol):
    """A per-sequence sampler; keeps its own state (RNG, penalties) across tokens."""

    def sample(self, index: int) -> int:
        """Choose (and accept) the next token from the logits at batch `index`."""
        ...

    def accept(self, token_id: int) -> None:
        """Tell the sampler about a token chosen elsewhere (e.g. an accepted draft token)."""
        ...

    def close(self) -> None: ...


class Tokenizer(Protocol):
    """The model's vocabulary. Read-only, so safe to use from any thread."""

    n_vocab: int

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]: ...

    def token_bytes(self, token_id: int, *, special: bool) -> bytes: ...

    def detokenize(self, token_ids: Sequence[int], *, special: bool) -> str: ...


class Backend(Protocol):
    """Engine-thread-only: decode, KV and samplers. `tokenizer` may be shared."""

    info: ModelInfo

    @property
    def tokenizer(self) -> Tokenizer: ...

    num_slots: int
    kv_capacity: int
    # cells of each slot's own KV stream (per-slot layout), 0 when all slots share one pool
    slot_cells: int
    capabilities: BackendCapabilities

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]: ...

    def token_bytes(self, token_id: int, *, special: bool) -> bytes: ...

    def decode(self, rows: Sequence[BatchRow]) -> list[list[int]]: ...

    def logits(self, index: int) -> np.ndarray:
        """A writable float32 view of the logits at batch `index`, valid until the next decode."""
        ...

    def kv_copy(self, src: int, dst: int, p0: int, p1: int) -> None: ...

    def kv_remove(self, slot: int, p0: int, p1: int = -1) -> None: ...

    def kv_clear(self) -> None: ...

    def kv_save(self, slot: int) -> bytearray:
        """The slot's KV as bytes (host-RAM prefix tier)."""
        ...

    def kv_restore(self, slot: int, data: bytearray) -> None:
        """Load kv_save() bytes into an empty slot."""
        ...

    def new_sampler(
        self, params: SamplingParams, history: Sequence[int], num_prompt: int | None = None
    ) -> Sampler:
        """A sampler for one sequence. `history` (prompt, plus output kept after a rewind) feeds
        penalties and DRY; the first `num_prompt` of it are prompt (default: all)."""
        ...

    def close(self) -> None: ...
