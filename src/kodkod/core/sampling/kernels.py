"""Vectorised (numpy) versions of the sampling stages llama.cpp lacks.

Each kernel works on a `Candidates` view: a structured array of (id, logit, p) rows in
llama.cpp's `llama_token_data` layout, of which the first `size` are live. A kernel edits the
logits, shrinks the live set (`keep`), or — for a final choice — sets `selected`, exactly like a
native llama.cpp sampler does with its `llama_token_data_array`, so kernels can sit at any
position of a native chain (see `backends/llamacpp/custom_samplers.py`) and can be unit-tested
on hand-built logits.

Semantics follow exllamav2 (TabbyAPI's reference backend) unless noted:
- smoothing: quadratic sampling with a curve, l' = max − k·f·d² + s·f·d³, d = l − max,
  k = (3 − curve)/2, s = (curve − 1)/2 (curve 1 = plain quadratic, exl2's form).
- top-a: keep p ≥ a · p_max².
- tail-free: sort p (ignoring p < 1e-8), |second differences| normalised; keep the tokens
  whose cumulative share stays ≤ z, plus one.
- skew: draw u uniformly, use u^exp(−skew) on the descending cumulative distribution
  (skew > 0 favours less likely tokens, < 0 more likely ones).
- draw (ours, not exl2's): Gumbel-max, argmax(logit + g) with g = −log(−log u) and u a hash of
  (seed, position in the sequence, token id). Exactly softmax sampling, but the choice only moves when
  two perturbed scores nearly tie, so the tiny logit differences llama.cpp's kernels show across
  batch shapes and KV layouts almost never change a seeded text (a CDF walk over 49k tokens
  flips on almost any noise), and a token's noise does not depend on which others survived.
- decaying penalties: the last `sustain` tokens penalise fully; the `decay` tokens before them
  fade linearly towards no penalty; each token's repetition and presence penalties use its most
  recent occurrence, the frequency penalty sums over occurrences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
_TINY_P = 1e-8


@dataclass(slots=True)
class Candidates:
    """The live candidate rows of one sampling step (a view of llama.cpp's array)."""

    data: np.ndarray  # TOKEN_DATA rows; the first `size` are live
    size: int
    selected: int = -1
    sorted: bool = False

    @classmethod
    def from_logits(cls, logits: np.ndarray) -> Candidates:
        data = np.empty(logits.shape[0], dtype=TOKEN_DATA)
        data["id"] = np.arange(logits.shape[0], dtype=np.int32)
        data["logit"] = logits
        data["p"] = 0.0
        return cls(data, int(logits.shape[0]))

    @property
    def logits(self) -> np.ndarray:
        return self.data["logit"][: self.size]

    @property
    def ids(self) -> np.ndarray:
        return self.data["id"][: self.size]

    def keep(self, mask: np.ndarray) -> None:
        """Keep the rows where `mask` is true (at least the best one), in their order."""
        n = int(np.count_nonzero(mask))
        if n == self.size:
            return
        if n == 0:
            mask = np.zeros(self.size, dtype=bool)
            mask[int(np.argmax(self.logits))] = True
            n = 1
        self.data[:n] = self.data[: self.size][mask]
        self.size = n


def probs(logits: np.ndarray) -> np.ndarray:
    """Softmax in float64 (−inf → 0)."""
    x = logits.astype(np.float64)
    m = x.max()
    if not np.isfinite(m):
        return np.full(x.shape, 1.0 / max(1, x.shape[0]))
    e = np.exp(x - m)
    return e / e.sum()


def smooth(c: Candidates, factor: float, curve: float) -> None:
    """Quadratic (curve 1) to cubic (curve 3) sampling; −inf stays −inf."""
    logits = c.logits
    finite = np.isfinite(logits)
    if not finite.any():
        return
    top = float(logits[finite].max())
    d = logits[finite].astype(np.float64) - top
    k = (3.0 - curve) / 2.0
    s = (curve - 1.0) / 2.0
    out = np.full(c.size, -np.inf, dtype=np.float32)
    out[finite] = (top - k * factor * d * d + s * factor * d * d * d).astype(np.float32)
    c.data["logit"][: c.size] = out
    c.sorted = False


def top_a(c: Candidates, a: float) -> None:
    p = probs(c.logits)
    c.keep(p >= a * float(p.max()) ** 2)


def tail_free(c: Candidates, z: float) -> None:
    if c.size < 3:
        return
    p = probs(c.logits)
    live = np.flatnonzero(p >= _TINY_P)
    if live.size < 3:
        return
    order = live[np.argsort(-p[live], kind="stable")]
    sp = p[order]
    d2 = np.abs(sp[:-2] - 2.0 * sp[1:-1] + sp[2:])
    total = float(d2.sum())
    if total <= 0.0:
        return  # a flat tail: nothing to cut
    cum = np.cumsum(d2 / total)
    num = int(np.searchsorted(cum, z, side="right")) + 1  # entries with cum ≤ z, plus one
    mask = np.zeros(c.size, dtype=bool)
    mask[order[:num]] = True
    c.keep(mask)


def skew_choice(c: Candidates, skew: float, u: float) -> None:
    """Select a row: u ∈ [0, 1) is mapped through u^exp(−skew) onto the sorted CDF."""
    p = probs(c.logits)
    live = np.flatnonzero(p >= _TINY_P)
    if live.size == 0:
        live = np.array([int(np.argmax(p))])
    order = live[np.argsort(-p[live], kind="stable")]
    sp = p[order]
    cum = np.cumsum(sp / sp.sum())
    target = (u ** float(np.exp(-skew))) * 0.9998  # exl2's guard against rounding at the top
    idx = min(int(np.searchsorted(cum, target, side="left")), order.size - 1)
    c.data["p"][: c.size] = p.astype(np.float32)
    c.selected = int(order[idx])


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform_noise(ids: np.ndarray, seed: int, step: int) -> np.ndarray:
    """A uniform number in (0, 1) per token id, a pure function of (seed, step, id)."""
    with np.errstate(over="ignore"):
        key = _mix64(np.array([(seed & 0xFFFFFFFF) << 32 | (step & 0xFFFFFFFF)], dtype=np.uint64))
        x = _mix64(ids.astype(np.uint64) * _GOLDEN + key)
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)


def gumbel_noise(ids: np.ndarray, seed: int, step: int) -> np.ndarray:
    """Standard Gumbel noise for each token id, a pure function of (seed, step, id)."""
    return -np.log(-np.log(uniform_noise(ids, seed, step)))


def gumbel_choice(c: Candidates, seed: int, step: int) -> None:
    """Select a row by Gumbel-max over the live candidates (−inf never wins).

    Rows more than 25 below the best logit are skipped: one wins with probability < e^-22
    per row (its noise would have to beat the leader's by 22), so even 49k of them together
    hold under 1e-5 of the mass; skipping them keeps the usual case cheap.
    """
    logits = c.logits
    top = float(logits.max()) if c.size else 0.0
    rows = np.flatnonzero(logits >= top - 25.0)
    if rows.size == 0:
        c.selected = int(np.argmax(logits))
        return
    scores = logits[rows].astype(np.float64) + gumbel_noise(c.ids[rows], seed, step)
    c.selected = int(rows[int(np.argmax(scores))])


def decayed_penalties(
    c: Candidates,
    recent_first: np.ndarray,
    *,
    sustain: int,
    decay: int,
    repeat: float,
    frequency: float,
    presence: float,
) -> None:
    """Penalise tokens in `recent_first` (most recent first; only sustain + decay are read)."""
    window = recent_first[: sustain + decay]
    if window.size == 0:
        return
    m = np.maximum(0, np.arange(window.size) - sustain)
    strength = 1.0 - m / float(decay) if decay > 0 else np.ones(window.size)
    tokens, first, inverse = np.unique(window, return_index=True, return_inverse=True)
    rep = 1.0 + (repeat - 1.0) * strength[first]
    sub = presence * strength[first] + np.bincount(
        inverse, weights=frequency * strength, minlength=tokens.size
    )
    pos = _positions(c, tokens)
    ok = pos >= 0
    pos, rep, sub = pos[ok], rep[ok], sub[ok]
    logits = c.data["logit"]
    cur = logits[pos].astype(np.float64)
    cur = np.where(cur > 0.0, cur / rep, cur * rep) - sub
    logits[pos] = cur.astype(np.float32)
    c.sorted = False


def _positions(c: Candidates, tokens: np.ndarray) -> np.ndarray:
    """Row index of each token id among the live candidates, −1 when absent."""
    ids = c.ids
    n = c.size
    if n and int(ids[n - 1]) == n - 1 and np.array_equal(ids, np.arange(n, dtype=ids.dtype)):
        # untouched vocabulary order (the usual case this early in the chain)
        pos = tokens.astype(np.int64)
        pos[pos >= n] = -1
        return pos
    index = np.full(int(max(ids.max(initial=0), tokens.max(initial=0))) + 1, -1, dtype=np.int64)
    index[ids] = np.arange(n)
    return index[tokens]
