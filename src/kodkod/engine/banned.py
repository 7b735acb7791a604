"""Banned strings: text that must never reach the client, enforced by rewinding.

`BannedStringGuard` sits between the detokenizer and the stop-string matcher. It holds output
text back, whole tokens at a time, while it could still be the start of a banned string. When
a banned string appears, it names the output token where it began: the engine drops that token
and everything after it (tokens and KV), bans that token id at that position, and samples again.
Text released by the guard is final — a rewind never takes back anything a client has seen.

Tokens whose text is empty (the first bytes of a multi-byte character) belong to the character
they start, so a rewind to a character goes back to its first byte; the detokenizer can then
simply restart, since the kept tokens always end on a character boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kodkod.engine.stopping import partial_match_len


@dataclass(slots=True)
class GuardResult:
    text: str  # released, final
    rewind_to: int | None = None  # output token index to go back to (that token is banned there)


class BannedStringGuard:
    __slots__ = ("_banned", "_max_len", "_held", "_starts")

    def __init__(self, banned: list[str]) -> None:
        self._banned = [b for b in dict.fromkeys(banned) if b]
        self._max_len = max((len(b) for b in self._banned), default=0)
        self._held = ""
        self._starts: list[tuple[int, int]] = []  # (output token index, offset in _held)

    def feed(self, token_index: int, text: str) -> GuardResult:
        old_len = len(self._held)  # holds no complete banned string (it would have hit)
        self._starts.append((token_index, old_len))
        self._held += text
        hit = self._first_hit(old_len)
        if hit is not None:
            k = self._token_at(hit)
            rewind_to = self._starts[k][0]
            self._held = self._held[: self._starts[k][1]]
            del self._starts[k:]
            return GuardResult(self._release(), rewind_to)
        return GuardResult(self._release())

    def flush(self) -> str:
        held, self._held = self._held, ""
        self._starts.clear()
        return held

    def _first_hit(self, old_len: int) -> int | None:
        """Earliest banned string, searched only where one could end inside the new text."""
        best: int | None = None
        for b in self._banned:
            i = self._held.find(b, max(0, old_len - len(b) + 1))
            if i != -1 and (best is None or i < best):
                best = i
        return best

    def _token_at(self, offset: int) -> int:
        """Index in _starts of the token whose text covers `offset` (back to its first byte)."""
        k = 0
        for i, (_, start) in enumerate(self._starts):
            if start <= offset:
                k = i
            else:
                break
        # tokens with empty text just before k started the same character
        while k > 0 and self._starts[k - 1][1] == self._starts[k][1]:
            k -= 1
        return k

    def _release(self) -> str:
        """Release the held text that can no longer begin a banned string (whole tokens).

        A token is released when its whole text lies before the at-risk suffix; an empty token
        (first bytes of a character) only together with the token that completes the character.
        """
        cut = len(self._held) - self._suffix_at_risk()
        starts = self._starts
        release_tokens = 0
        release_upto = 0
        for i, (_, start) in enumerate(starts):
            end = starts[i + 1][1] if i + 1 < len(starts) else len(self._held)
            if end > cut:
                break
            if end > start:
                release_tokens, release_upto = i + 1, end
        if release_tokens == 0:
            return ""
        out = self._held[:release_upto]
        self._held = self._held[release_upto:]
        self._starts = [(t, s - release_upto) for t, s in starts[release_tokens:]]
        return out

    def _suffix_at_risk(self) -> int:
        return partial_match_len(self._held, self._banned, self._max_len)


class LoopDetector:
    """Says when the last `window` output tokens are one pattern repeated (period <= 256).

    Checked every `every` tokens once `window` tokens exist: a period p is a candidate only if
    the last token also appears p tokens earlier; a candidate is confirmed when the whole
    window equals itself shifted by p (numpy compare).
    """

    __slots__ = ("_window", "_max_p", "_every")

    def __init__(self, window: int, every: int = 8) -> None:
        self._window = window
        self._max_p = max(1, min(window // 2, 256))
        self._every = every

    def add(self, output_ids: list[int]) -> bool:
        n = len(output_ids)
        if n < self._window or n % self._every:
            return False
        w = np.asarray(output_ids[-self._window :])
        last = w[-1]
        tail = w[-1 - self._max_p : -1]
        for back in np.flatnonzero(tail[::-1] == last):
            p = int(back) + 1
            if np.array_equal(w[p:], w[:-p]):
                return True
        return False

    def reset(self, output_ids: list[int]) -> None:
        """Nothing to rebuild: the check looks at the output itself."""
