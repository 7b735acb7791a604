"""Incremental, UTF-8-safe detokenization.

Each token is turned into its bytes (the backend's `token_to_piece`) and pushed through an
incremental UTF-8 decoder, so a character split over several byte-fallback tokens (emoji, CJK)
is released only once it is complete. Bytes that can never form a valid character become U+FFFD
rather than being dropped or raising.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of complete UTF-8 text pieces."""

    __slots__ = ("_piece", "_decoder")

    def __init__(self, piece: Callable[[int], bytes]) -> None:
        self._piece = piece
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """Text completed by this token ('' while a multi-byte character is still open)."""
        return self._decoder.decode(self._piece(token_id))

    def flush(self) -> str:
        """Release whatever is pending at the end of the output (incomplete bytes → U+FFFD)."""
        return self._decoder.decode(b"", final=True)
