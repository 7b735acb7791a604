"""Per-sequence samplers built from the engine's stage list as llama.cpp sampler chains.

Each stage of `engine.sampling.stages` maps onto one native llama.cpp sampler, so sampling runs
in C. A chain that is nothing but greedy takes a numpy argmax instead (≈10× cheaper than
building llama.cpp's 49k-entry candidate array). The sampler owns its chain; `close()` frees it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import llama_cpp as L
import numpy as np

from kodkod.engine.sampling import stages as S


def _native(stage: S.Stage, vocab: ctypes.c_void_p, n_vocab: int, n_ctx: int) -> ctypes.c_void_p:
    """One native sampler for one stage; a window of -1 means the whole context."""
    match stage:
        case S.LogitBias(biases):
            arr = (L.llama_logit_bias * len(biases))()
            for i, (tok, bias) in enumerate(biases):
                arr[i].token = tok
                arr[i].bias = bias
            return L.llama_sampler_init_logit_bias(n_vocab, len(biases), arr)
        case S.Penalties(last_n, repeat, freq, present):
            window = n_ctx if last_n < 0 else last_n
            return L.llama_sampler_init_penalties(n_vocab, window, repeat, freq, present)
        case S.Dry(mult, base, allowed, last_n, breakers):
            raw = [b.encode("utf-8") for b in breakers]
            arr = (ctypes.c_char_p * max(1, len(raw)))(*raw)
            window = n_ctx if last_n < 0 else last_n
            return L.llama_sampler_init_dry(vocab, mult, base, allowed, window, arr, len(raw))
        case S.Temperature(value):
            return L.llama_sampler_init_temp(value)
        case S.DynamicTemperature(value, delta, exponent):
            return L.llama_sampler_init_temp_ext(value, delta, exponent)
        case S.TopK(k):
            return L.llama_sampler_init_top_k(k)
        case S.Typical(p):
            return L.llama_sampler_init_typical(p, 1)
        case S.TopP(p):
            return L.llama_sampler_init_top_p(p, 1)
        case S.MinP(p):
            return L.llama_sampler_init_min_p(p, 1)
        case S.Xtc(prob, threshold, seed):
            return L.llama_sampler_init_xtc(prob, threshold, 1, seed)
        case S.Mirostat2(tau, eta, seed):
            return L.llama_sampler_init_mirostat_v2(seed, tau, eta)
        case S.AdaptiveP(target, decay, seed):
            return L.llama_sampler_init_adaptive_p(target, decay, seed)
        case S.Greedy():
            return L.llama_sampler_init_greedy()
        case S.Draw(seed):
            return L.llama_sampler_init_dist(seed)
    raise ValueError(f"no native sampler for stage {stage!r}")


class NativeSampler:
    """A llama.cpp sampler chain for one sequence."""

    __slots__ = ("_ctx", "_chain", "_argmax", "_logits", "uses_history")

    def __init__(
        self,
        ctx: ctypes.c_void_p,
        vocab: ctypes.c_void_p,
        n_vocab: int,
        n_ctx: int,
        stages: list[S.Stage],
        logits: Callable[[int], np.ndarray],
    ) -> None:
        self._ctx = ctx
        self._logits = logits
        self._argmax = len(stages) == 1 and isinstance(stages[0], S.Greedy)
        self.uses_history = any(isinstance(st, S.Penalties | S.Dry) for st in stages)
        self._chain = None
        if not self._argmax:
            chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
            for stage in stages:
                L.llama_sampler_chain_add(chain, _native(stage, vocab, n_vocab, n_ctx))
            self._chain = chain

    def sample(self, index: int) -> int:
        if self._argmax:
            return int(self._logits(index).argmax())
        return int(L.llama_sampler_sample(self._chain, self._ctx, index))

    def accept(self, token_id: int) -> None:
        if self._chain is not None:
            L.llama_sampler_accept(self._chain, token_id)

    def close(self) -> None:
        if self._chain is not None:
            L.llama_sampler_free(self._chain)
            self._chain = None
