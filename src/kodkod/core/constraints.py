"""Constrained decoding as a token mask per sequence (grammars, JSON schemas, regexes).

A grammar is described by a `GrammarSpec` (pure data), compiled once per request by a
backend's `GrammarCompiler` into a `ConstraintFactory`, and every choice of the request gets its
own `Constraint` from `factory.new()` (its own parser state). The engine calls, per sampled
token and on its own thread:

    constraint.process(row, output_ids)   before sampling: disallowed tokens → -inf
    constraint.accept(token)              after sampling: advance the parser
    constraint.is_done()                  after emitting: the grammar can take no more text

`MaskConstraint` is the generic implementation over any `TokenMatcher` (the parser; llguidance
in `backends/llamacpp/grammar.py`): the matcher writes an allowed-token bitmask (one bit per
token, little-endian in int32 words) and the row is masked with two vectorised numpy calls.
EOS is allowed exactly when the grammar accepts (the matcher
puts it in the mask). `DelayedConstraint` leaves the output free until a marker (a reasoning
end tag) has been generated, then hands over to the inner constraint.

Nothing here imports an inference library, so the engine and tests can use it with fakes.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kodkod.core.types import Constraint

log = logging.getLogger(__name__)

NEG_INF = np.float32(-np.inf)


class GrammarKind(str, enum.Enum):
    JSON_SCHEMA = "json_schema"  # text is the schema as JSON
    REGEX = "regex"
    LARK = "lark"  # llguidance's Lark dialect (may embed `%json {...}`)
    GBNF = "gbnf"  # llama.cpp GBNF (converted to Lark)


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """What the output must match. `lenient`: ignore JSON-schema keywords the compiler lacks."""

    kind: GrammarKind
    text: str
    lenient: bool = False


class GrammarError(ValueError):
    """A grammar that cannot be compiled; the message is safe to show to the client."""


class TokenMatcher(Protocol):
    """An incremental parser over token ids."""

    def fill_mask(self, words: np.ndarray) -> None:
        """Write the allowed next tokens into `words` (int32, bit t%32 of word t//32)."""
        ...

    def consume(self, token_id: int) -> bool:
        """Advance by one token; False if the token was not allowed (the matcher is broken)."""
        ...

    def is_stopped(self) -> bool:
        """Nothing but EOS can follow."""
        ...

    def rollback(self, num_tokens: int) -> bool:
        """Undo the last `num_tokens` consumed tokens."""
        ...


class ConstraintFactory(Protocol):
    """A compiled grammar: hands out independent constraints (one per sequence)."""

    def new(self) -> Constraint: ...


class GrammarCompiler(Protocol):
    """Compiles specs for one model's vocabulary (may block for a while: call off-loop)."""

    def compile(self, spec: GrammarSpec) -> ConstraintFactory:
        """Raises GrammarError for a grammar that does not compile."""
        ...


def mask_words(n_vocab: int) -> np.ndarray:
    return np.zeros((n_vocab + 31) // 32, dtype=np.int32)


class MaskConstraint:
    """`core.types.Constraint` over a `TokenMatcher`: one bitmask per token, applied in numpy."""

    __slots__ = ("_matcher", "_words", "_inverted", "_n_vocab", "_broken", "_consumed")

    def __init__(self, matcher: TokenMatcher, n_vocab: int) -> None:
        self._matcher = matcher
        self._n_vocab = n_vocab
        self._words = mask_words(n_vocab)
        self._inverted = np.empty_like(self._words)
        self._broken = False
        self._consumed = 0

    def process(self, row: object, output_ids: list[int]) -> None:
        logits: np.ndarray = row  # type: ignore[assignment]
        self._matcher.fill_mask(self._words)
        # Invert the bits so 1 = banned, unpack to one byte per token and mask in one call.
        np.invert(self._words, out=self._inverted)
        n = min(self._n_vocab, logits.shape[0])
        banned = np.unpackbits(self._inverted.view(np.uint8), count=n, bitorder="little").view(bool)
        np.copyto(logits[:n], NEG_INF, where=banned)
        if logits.shape[0] > n:  # padded output rows: tokens the vocabulary lacks
            logits[n:] = NEG_INF

    def accept(self, token_id: int) -> None:
        if self._broken:
            return
        if self._matcher.consume(token_id):
            self._consumed += 1
        else:
            # Only possible if a later stage banned every allowed token and the sampler picked
            # a masked one; end the sequence instead of emitting junk.
            log.warning("constraint rejected token %d; ending the sequence", token_id)
            self._broken = True

    def is_done(self) -> bool:
        return self._broken or self._matcher.is_stopped()

    def rollback_to(self, output_ids: list[int]) -> None:
        """The engine cut the output back to `output_ids` (banned-string rewind)."""
        extra = self._consumed - len(output_ids)
        if extra > 0 and not self._broken and self._matcher.rollback(extra):
            self._consumed -= extra


class DelayedConstraint:
    """No constraint until `marker` appears in the output, then `inner` from the next token.

    Used when a reply starts inside a reasoning block: the grammar applies to the answer after
    the reasoning end tag. `piece(token_id)` gives a token's bytes.
    """

    __slots__ = ("_inner", "_marker", "_piece", "_tail", "_active", "_seen", "_start")

    def __init__(self, inner: Constraint, marker: str, piece: Callable[[int], bytes]) -> None:
        self._inner = inner
        self._marker = marker.encode("utf-8")
        self._piece = piece
        self._tail = b""
        self._active = False
        self._seen = 0  # output tokens accepted so far
        self._start = 0  # output index where the inner constraint took over

    @property
    def active(self) -> bool:
        return self._active

    def process(self, row: object, output_ids: list[int]) -> None:
        if self._active:
            self._inner.process(row, output_ids)

    def accept(self, token_id: int) -> None:
        self._seen += 1
        if self._active:
            self._inner.accept(token_id)
            return
        buf = self._tail + self._piece(token_id)
        if self._marker in buf:
            self._active = True
            self._start = self._seen
        else:
            self._tail = buf[-(len(self._marker) - 1) :] if len(self._marker) > 1 else b""

    def is_done(self) -> bool:
        return self._active and self._inner.is_done()

    def rollback_to(self, output_ids: list[int]) -> None:
        inner_rollback = getattr(self._inner, "rollback_to", None)
        if self._active and len(output_ids) >= self._start:
            if inner_rollback is not None:
                inner_rollback(output_ids[self._start :])
            self._seen = len(output_ids)
            return
        if self._active and inner_rollback is not None:
            inner_rollback([])
        self._active, self._tail, self._seen = False, b"", 0
        for t in output_ids:  # replay the free text to find the marker state again
            self.accept(t)
