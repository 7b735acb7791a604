"""Per-sequence samplers built from the engine's stage list as llama.cpp sampler chains.

Each stage of `core.sampling.stages` becomes one sampler in ONE chain, in the stage order:
a native llama.cpp sampler where one exists (bias, penalties, DRY, temperature, top-n-sigma,
top-k/p, min-p, typical, XTC, mirostat, adaptive-P, greedy), otherwise a `PySampler` running
our numpy kernel at that position (smoothing, top-a, tail-free, decaying penalties, skewed
draw). The plain random draw is ours too although llama.cpp has one: `dist` walks the CDF in
vocabulary order, so logit noise of 1e-3 (which llama.cpp's kernels can show between batch
shapes and KV layouts) changes a seeded choice almost every time the distribution is flat;
our Gumbel-max draw (kernels.gumbel_choice) only changes on near-ties. Everything else runs in C.

History: samplers that look back (penalties, DRY) are fed the prompt's tail individually before
they join the chain — penalties over generated tokens only (`output_only`) get none. After
that every chosen token reaches every sampler through the chain's accept.

A chain that is nothing but greedy takes a numpy argmax instead (much cheaper than building
llama.cpp's 49k-entry candidate array). `close()` frees the chain, then drops the callbacks.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence

import llama_cpp as L
import numpy as np

from kodkod.backends.llamacpp import custom_samplers as C
from kodkod.core.sampling import kernels as K
from kodkod.core.sampling import stages as S

MIROSTAT_V1_M = 100  # tokens used to estimate s_hat (the paper's and llama.cpp's value)


def _logit_bias(biases: tuple[tuple[int, float], ...], n_vocab: int) -> ctypes.c_void_p:
    table = np.array(list(biases), dtype=[("token", "<i4"), ("bias", "<f4")])
    arr = (L.llama_logit_bias * len(biases)).from_buffer_copy(table.tobytes())
    return L.llama_sampler_init_logit_bias(n_vocab, len(biases), arr)


def _dry(stage: S.Dry, vocab: ctypes.c_void_p | None, window: int) -> ctypes.c_void_p:
    raw = [b.encode("utf-8") for b in stage.breakers if b]
    if raw and not vocab:
        raise ValueError("DRY sequence breakers need the model's vocabulary")
    arr = (ctypes.c_char_p * max(1, len(raw)))(*raw)
    return L.llama_sampler_init_dry(
        vocab, stage.multiplier, stage.base, stage.allowed_length, window, arr, len(raw)
    )


def _native(stage: S.Stage, vocab: ctypes.c_void_p | None, n_vocab: int) -> ctypes.c_void_p:
    """The native sampler for a stage llama.cpp has (windows already resolved by the caller)."""
    match stage:
        case S.Temperature(value):
            return L.llama_sampler_init_temp(value)
        case S.DynamicTemperature(value, delta, exponent):
            return L.llama_sampler_init_temp_ext(value, delta, exponent)
        case S.TopNSigma(n):
            return L.llama_sampler_init_top_n_sigma(n)
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
        case S.Mirostat(1, tau, eta, seed):
            return L.llama_sampler_init_mirostat(n_vocab, seed, tau, eta, MIROSTAT_V1_M)
        case S.Mirostat(_, tau, eta, seed):
            return L.llama_sampler_init_mirostat_v2(seed, tau, eta)
        case S.AdaptiveP(target, decay, seed):
            return L.llama_sampler_init_adaptive_p(target, decay, seed)
        case S.Greedy():
            return L.llama_sampler_init_greedy()
    raise ValueError(f"no native sampler for stage {stage!r}")


def _custom(stage: S.Stage, history: Sequence[int]) -> C.PySampler | None:
    match stage:
        case S.Smoothing():
            return C.PySampler("kodkod-smoothing", C.SmoothingStage(stage))
        case S.TopA():
            return C.PySampler("kodkod-top-a", C.TopAStage(stage))
        case S.TailFree():
            return C.PySampler("kodkod-tfs", C.TailFreeStage(stage))
        case S.SkewDraw():
            return C.PySampler("kodkod-skew", C.SkewStage(stage, len(history)), selects=True)
        case S.Draw():
            return C.PySampler("kodkod-draw", C.GumbelDrawStage(stage, len(history)), selects=True)
        case S.Penalties(decay=decay) if decay > 0:
            return C.PySampler("kodkod-penalties", C.DecayingPenaltyStage(stage, list(history)))
    return None


class NativeSampler:
    """A llama.cpp sampler chain for one sequence."""

    __slots__ = ("_ctx", "_chain", "_argmax", "_logits", "_custom", "_num_prompt")

    def __init__(
        self,
        ctx: ctypes.c_void_p | None,
        vocab: ctypes.c_void_p | None,
        n_vocab: int,
        n_ctx: int,
        stages: list[S.Stage],
        logits: Callable[[int], np.ndarray] | None,
        history: Sequence[int] = (),
        num_prompt: int | None = None,
    ) -> None:
        self._ctx = ctx
        self._num_prompt = len(history) if num_prompt is None else num_prompt
        self._logits = logits
        self._argmax = len(stages) == 1 and isinstance(stages[0], S.Greedy)
        self._custom: list[C.PySampler] = []
        self._chain = None
        if self._argmax:
            return
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        self._chain = chain
        try:
            for stage in stages:
                L.llama_sampler_chain_add(chain, self._build(stage, vocab, n_vocab, n_ctx, history))
        except BaseException:
            self.close()
            raise

    def _build(
        self,
        stage: S.Stage,
        vocab: ctypes.c_void_p | None,
        n_vocab: int,
        n_ctx: int,
        history: Sequence[int],
    ) -> ctypes.c_void_p:
        custom = _custom(stage, history)
        if custom is not None:
            self._custom.append(custom)
            return custom.handle
        feed: Sequence[int] = ()
        match stage:
            case S.LogitBias(biases):
                smpl = _logit_bias(biases, n_vocab)
            case S.Penalties(last_n, repeat, freq, present, _, output_only):
                window = _window(last_n, n_ctx)
                smpl = L.llama_sampler_init_penalties(n_vocab, window, repeat, freq, present)
                # output-only penalties see just the generated part (kept output after a rewind)
                feed = history[self._num_prompt :][-window:] if output_only else history[-window:]
            case S.Dry(last_n=last_n):
                window = _window(last_n, n_ctx)
                smpl = _dry(stage, vocab, window)
                feed = history[-window:]
            case _:
                smpl = _native(stage, vocab, n_vocab)
        if not smpl:
            raise ValueError(f"llama.cpp refused the sampler for {stage!r}")
        for t in feed:
            L.llama_sampler_accept(smpl, t)
        return smpl

    def sample(self, index: int) -> int:
        """Choose (and accept) the next token from the logits at batch `index`."""
        if self._argmax:
            assert self._logits is not None
            return int(self._logits(index).argmax())
        return int(L.llama_sampler_sample(self._chain, self._ctx, index))

    def sample_row(self, row: np.ndarray) -> int:
        """Choose (and accept) a token from a logits row of our own (no context needed)."""
        if self._argmax:
            return int(np.asarray(row).argmax())
        c = self.apply_row(row)
        token = int(c.data["id"][c.selected])
        L.llama_sampler_accept(self._chain, token)
        return token

    def apply_row(self, row: np.ndarray) -> K.Candidates:
        """Run the chain on a logits row without accepting; the surviving candidates."""
        if self._chain is None:
            c = K.Candidates.from_logits(np.asarray(row, dtype=np.float32))
            c.selected = int(np.argmax(c.logits))
            return c
        c = K.Candidates.from_logits(np.asarray(row, dtype=np.float32))
        arr = L.llama_token_data_array(
            data=ctypes.cast(c.data.ctypes.data, L.llama_token_data_p),
            size=c.size,
            selected=-1,
            sorted=False,
        )
        L.llama_sampler_apply(self._chain, ctypes.byref(arr))
        # a stage may advance `data` (XTC drops the head in place): view what the chain left
        live = C.candidates_view(arr)
        live.data = live.data.copy()
        return live

    def accept(self, token_id: int) -> None:
        if self._chain is not None:
            L.llama_sampler_accept(self._chain, token_id)

    def close(self) -> None:
        if self._chain is not None:
            L.llama_sampler_free(self._chain)
            self._chain = None
        self._custom.clear()


def _window(last_n: int, n_ctx: int) -> int:
    """A penalty / DRY window in tokens: -1 (whole context) and anything longer than the
    context are the context length, so a huge client value never sizes llama.cpp's ring
    buffer beyond what a sequence can hold."""
    return n_ctx if last_n < 0 or last_n > n_ctx else last_n
