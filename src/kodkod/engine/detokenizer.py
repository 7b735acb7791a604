"""Incremental, UTF-8-safe detokenization.

Each token is turned into its bytes (the backend's `token_to_piece`) and pushed through an
incremental UTF-8 decoder, so a character split over several byte-fallback tokens (emoji, CJK)
is released only once it is complete. Bytes that can never form a valid character become U+FFFD
rather than being dropped or raising.

Most tokens are whole characters on their own, so the text of such a token is decoded once and
kept in a table shared by every sequence of one backend (`TokenTexts`): while no character is
open, adding a token is one dictionary look-up. Only a token whose bytes are not complete UTF-8
by themselves, or one that follows the first bytes of an open character, goes through the
incremental decoder.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenTexts:
    """The text of each token id whose bytes are complete UTF-8 alone, filled as tokens are
    seen; one table per `special` rendering (special tokens as text, or as nothing). One per
    backend: a vocabulary's pieces never change."""

    special: dict[int, str] = field(default_factory=dict)
    plain: dict[int, str] = field(default_factory=dict)

    def table(self, special: bool) -> dict[int, str]:
        return self.special if special else self.plain


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of complete UTF-8 text pieces."""

    __slots__ = ("_piece", "_texts", "_decoder", "_open")

    def __init__(self, piece: Callable[[int], bytes], texts: dict[int, str] | None = None) -> None:
        """`texts`: the shared table of whole-character token texts for this `piece`
        function (None: a table of its own)."""
        self._piece = piece
        self._texts: dict[int, str] = {} if texts is None else texts
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._open = False  # the decoder holds the first bytes of a character

    def add(self, token_id: int) -> str:
        """Text completed by this token ('' while a multi-byte character is still open)."""
        if not self._open:
            text = self._texts.get(token_id)
            if text is not None:
                return text
            data = self._piece(token_id)
            try:
                text = data.decode("utf-8")  # strict: only complete, valid UTF-8 is kept
            except UnicodeDecodeError:
                pass
            else:
                self._texts[token_id] = text
                return text
        else:
            data = self._piece(token_id)
        decoder = self._decoder
        text = decoder.decode(data)
        self._open = bool(decoder.getstate()[0])
        return text

    def flush(self) -> str:
        """Release whatever is pending at the end of the output (incomplete bytes → U+FFFD)."""
        self._open = False
        return self._decoder.decode(b"", final=True)

    def restart(self) -> IncrementalDetokenizer:
        """A detokenizer with nothing pending, sharing this one's pieces and text table."""
        return IncrementalDetokenizer(self._piece, self._texts)
