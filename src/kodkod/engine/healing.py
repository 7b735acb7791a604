"""Token healing: regenerate the prompt's last token so the output can continue it naturally.

A prompt that ends mid-word ("The capital of Fra") leaves the model a token boundary it would
never have produced itself. With `token_healing`, the engine drops the prompt's last token and
lets the first generated token be any token whose text starts with the dropped text ("Fra" →
"France", "Francis", ...); the dropped text is not emitted again. Candidates are found by
scanning the vocabulary once per distinct piece (cached).
"""

from __future__ import annotations

import numpy as np

from kodkod.engine.backend import Backend

_CACHE_LIMIT = 256


def healing_candidates(backend: Backend, piece: bytes, cache: dict[bytes, list[int]]) -> list[int]:
    """Token ids whose bytes start with `piece` (including the piece's own token)."""
    if not piece:
        return []
    hit = cache.get(piece)
    if hit is not None:
        return hit
    out = [t for t in range(backend.info.n_vocab) if backend.token_bytes(t, special=False).startswith(piece)]
    if len(cache) >= _CACHE_LIMIT:
        cache.pop(next(iter(cache)))
    cache[piece] = out
    return out


class HealingMask:
    """Logits processor: the first output token must be one of `allowed`."""

    __slots__ = ("_allowed",)

    def __init__(self, allowed: list[int]) -> None:
        self._allowed = np.asarray(allowed, dtype=np.int64)

    def process(self, row: object, output_ids: list[int]) -> None:
        if output_ids:
            return
        logits: np.ndarray = row  # type: ignore[assignment]
        keep = logits[self._allowed].copy()
        logits[:] = -np.inf
        logits[self._allowed] = keep

    def accept(self, token_id: int) -> None:
        pass
