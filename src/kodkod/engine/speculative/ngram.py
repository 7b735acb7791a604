"""N-gram drafting: propose what followed the last time the sequence's tail appeared.

`NgramIndex` maps every n-gram of a sequence's tokens (prompt + output), for n in
[n_min, n_max], to the position right after its most recent occurrence. It is updated
incrementally (`sync` indexes only the tokens added since the last call) and rebuilt from
scratch after a rewind (`reset`). `propose(tokens, k)` looks the tail up, longest n first, and
returns up to k tokens that followed it — free drafts for copying, editing and repetitive text.

The tail itself is never a match for itself: an n-gram is indexed only once the token after it
exists, so the newest indexed occurrence always lies strictly earlier.
"""

from __future__ import annotations


class NgramIndex:
    __slots__ = ("n_min", "n_max", "_maps", "_upto")

    def __init__(self, n_min: int = 2, n_max: int = 4) -> None:
        self.n_min = max(1, n_min)
        self.n_max = max(self.n_min, n_max)
        self._maps: list[dict[tuple[int, ...], int]] = [{} for _ in range(self.n_max - self.n_min + 1)]
        self._upto = 0  # n-grams ending before this position are indexed

    def reset(self) -> None:
        for m in self._maps:
            m.clear()
        self._upto = 0

    def sync(self, tokens: list[int]) -> None:
        """Index every n-gram whose follower is known (ends at positions < len(tokens) − 1)."""
        end = len(tokens) - 1
        if end <= self._upto:
            return
        n_min, maps = self.n_min, self._maps
        for j in range(self._upto, end):  # n-grams ending at j, followed by tokens[j + 1]
            for i, m in enumerate(maps):
                n = n_min + i
                if j + 1 < n:
                    break
                m[tuple(tokens[j + 1 - n : j + 1])] = j + 1
        self._upto = end

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the most recent earlier occurrence of the tail."""
        if k <= 0:
            return []
        self.sync(tokens)
        length = len(tokens)
        for i in range(len(self._maps) - 1, -1, -1):
            n = self.n_min + i
            if n > length:
                continue
            pos = self._maps[i].get(tuple(tokens[length - n :]))
            if pos is not None:
                return tokens[pos : pos + k]
        return []
