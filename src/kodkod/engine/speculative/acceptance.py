"""The speculative-sampling acceptance rule (Leviathan et al. 2023; Chen et al. 2023).

A draft proposes token d drawn from its distribution q; the target's distribution at that
position is p. Accept d with probability min(1, p[d] / q[d]); on rejection draw a replacement
from the residual norm(max(0, p − q)). The emitted token is then distributed exactly as p:

    P(emit t) = q[t]·min(1, p[t]/q[t]) + P(reject)·residual[t]
              = min(q[t], p[t]) + (1 − Σ min(p, q))·max(0, p[t] − q[t]) / Σ max(0, p − q)
              = min(q[t], p[t]) + max(0, p[t] − q[t])            (the two sums are equal)
              = p[t].

The engine only drafts deterministically (a greedy draft model or an n-gram lookup), so q is a
point mass on d: accept with probability p[d], otherwise draw from p with d removed. That is
the same as "draw t ~ p with the sequence's own sampler; accept iff t == d; else t is the
replacement" — which is what `engine.speculative.verify` does, running the full sampling
pipeline on each verified row. `accept_or_resample` is the general rule for drafts that are
themselves sampled (and the statistical test of the identity above).
"""

from __future__ import annotations

import numpy as np


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """norm(max(0, p − q)); p itself where the residual is empty (p == q)."""
    r = np.maximum(p - q, 0.0)
    total = float(r.sum())
    return r / total if total > 0.0 else np.asarray(p, dtype=np.float64)


def accept_or_resample(
    p: np.ndarray, q: np.ndarray, draft: int, rng: np.random.Generator
) -> tuple[bool, int]:
    """(accepted, token): keep `draft` (drawn from q) with prob min(1, p/q), else resample."""
    qd = float(q[draft])
    if qd > 0.0 and rng.random() * qd < float(p[draft]):  # u < p/q without dividing
        return True, draft
    r = residual(p, q)
    return False, int(rng.choice(r.shape[0], p=r / r.sum()))


def point_mass(n: int, token: int) -> np.ndarray:
    """q of a deterministic draft."""
    q = np.zeros(n, dtype=np.float64)
    q[token] = 1.0
    return q
