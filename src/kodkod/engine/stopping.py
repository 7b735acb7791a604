"""Stop strings: find them in streamed text and never let them (or their prefixes) leak.

Text is held back while its tail could still grow into a stop string; once the tail can no
longer match, it is released. When a stop string appears, the text before it is released and
the match is reported; nothing after it is ever emitted.

Work per fed piece is bounded by the tail that could still match, never by the text generated so
far: the held text is shorter than the longest stop string, a search for a complete stop string
starts where one could first end inside the new text, and the hold-back check tries only tail
positions where a stop string's first character occurs, comparing in C (`str.startswith`).
"""

from __future__ import annotations


class StopStringMatcher:
    """Streaming matcher over a fixed set of stop strings."""

    __slots__ = ("_stops", "_held", "_max_len", "active")

    def __init__(self, stop_strings: list[str]) -> None:
        self._stops = [s for s in dict.fromkeys(stop_strings) if s]
        self._held = ""
        self._max_len = max((len(s) for s in self._stops), default=0)
        self.active = bool(self._stops)  # False: feed() passes text through (callers may skip it)

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add new text; return (text that is safe to emit, the stop string hit or None)."""
        if not self._stops:
            return text, None
        buf = self._held + text
        held_len = len(self._held)  # holds no complete stop string (it would have hit)
        hit_at = -1
        hit: str | None = None
        for stop in self._stops:
            i = buf.find(stop, max(0, held_len - len(stop) + 1))
            if i != -1 and (hit_at == -1 or i < hit_at):
                hit_at, hit = i, stop
        if hit is not None:
            self._held = ""
            return buf[:hit_at], hit
        keep = self._holdback(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        """Release held text (generation ended for another reason)."""
        held, self._held = self._held, ""
        return held

    def _holdback(self, buf: str) -> int:
        return partial_match_len(buf, self._stops, self._max_len)


def partial_match_len(text: str, needles: list[str], max_len: int) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `needles`
    (`max_len` = the longest needle): the text that must wait to see if a needle completes.

    Only the last `max_len - 1` characters are looked at. For each needle, the candidate
    suffixes are those starting with the needle's first character, longest first; each is
    compared once in C, so there is no per-length loop and no quadratic slicing.
    """
    upper = min(len(text), max_len - 1)
    if upper <= 0:
        return 0
    tail = text[-upper:]
    longest = 0
    for needle in needles:
        limit = min(upper, len(needle) - 1)  # the longest proper prefix that can fit
        if limit <= longest:
            continue
        first = needle[0]
        i = tail.find(first, upper - limit)
        while i != -1 and upper - i > longest:
            if needle.startswith(tail[i:]):
                longest = upper - i
                break
            i = tail.find(first, i + 1)
    return longest
