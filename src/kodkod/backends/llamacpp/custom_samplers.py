"""llama.cpp samplers whose `apply`/`accept` run our numpy kernels (`core.sampling.kernels`).

`PySampler` builds a `llama_sampler_i` with ctypes callbacks and registers it with
`llama_sampler_init`, so a stage llama.cpp lacks sits at its exact position inside the native
chain: `apply` receives the chain's `llama_token_data_array`, which we view as a numpy array
without copying, let the stage edit/shrink/select, and write `size`/`selected`/`sorted` back.

Lifetime: the chain owns the `llama_sampler` struct (it deletes it when freed; our `free`
callback is NULL because the Python object owns the state). The `PySampler` keeps the
interface struct and callback objects alive and must outlive the chain — `NativeSampler`
holds it and frees the chain first. Callbacks never raise into C: an error leaves the
candidates unchanged (a selector falls back to the most likely token) and is logged.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Protocol

import llama_cpp as L
import numpy as np

from kodkod.core.sampling import kernels as K
from kodkod.core.sampling import stages as S

log = logging.getLogger(__name__)

_NAME_FN = ctypes.CFUNCTYPE(ctypes.c_void_p, L.llama_sampler_p_ctypes)
_ROW_BYTES = K.TOKEN_DATA.itemsize


class PyStage(Protocol):
    """A stage run from a llama.cpp chain: edits `c` in place; told every accepted token."""

    def apply(self, c: K.Candidates) -> None: ...

    def accept(self, token_id: int) -> None: ...


def candidates_view(cur: L.llama_token_data_array) -> K.Candidates:
    """A zero-copy numpy view of a llama_token_data_array."""
    n = int(cur.size)
    addr = ctypes.cast(cur.data, ctypes.c_void_p).value
    if not n or not addr:
        return K.Candidates(np.empty(0, dtype=K.TOKEN_DATA), 0, int(cur.selected), bool(cur.sorted))
    buf = (ctypes.c_char * (n * _ROW_BYTES)).from_address(addr)
    data = np.frombuffer(buf, dtype=K.TOKEN_DATA)  # type: ignore[call-overload]  # stubs omit ctypes arrays
    return K.Candidates(data, n, int(cur.selected), bool(cur.sorted))


class PySampler:
    """One custom llama_sampler wrapping a `PyStage`; `handle` goes into a chain."""

    __slots__ = ("stage", "selects", "_name", "_name_cb", "_apply_cb", "_accept_cb", "_iface", "handle")

    def __init__(self, name: str, stage: PyStage, *, selects: bool = False) -> None:
        self.stage = stage
        self.selects = selects
        self._name = ctypes.create_string_buffer(name.encode("ascii"))
        self._name_cb = _NAME_FN(self._name_fn)
        self._apply_cb = L.llama_sampler_i_apply(self._apply)
        self._accept_cb = L.llama_sampler_i_accept(self._accept)
        iface = L.llama_sampler_i()
        iface.name = ctypes.cast(self._name_cb, L.llama_sampler_i_name)
        iface.apply = self._apply_cb
        iface.accept = self._accept_cb
        self._iface = iface
        self.handle = L.llama_sampler_init(ctypes.byref(iface), None)

    def _name_fn(self, _smpl: object) -> int:
        return ctypes.addressof(self._name)

    def _apply(self, _smpl: object, cur_p: ctypes._Pointer) -> None:
        cur = cur_p.contents
        try:
            c = candidates_view(cur)
            self.stage.apply(c)
        except Exception:
            log.exception("sampler stage %s failed; candidates left unchanged", self._name.value)
            if self.selects and cur.size:
                c = candidates_view(cur)
                c.selected = int(np.argmax(c.logits))
            else:
                return
        cur.size = c.size
        cur.selected = c.selected
        cur.sorted = c.sorted

    def _accept(self, _smpl: object, token: int) -> None:
        try:
            self.stage.accept(int(token))
        except Exception:
            log.exception("sampler stage %s failed to accept a token", self._name.value)


# -- the stages -------------------------------------------------------------------------------


class SmoothingStage:
    def __init__(self, st: S.Smoothing) -> None:
        self.factor, self.curve = st.factor, st.curve

    def apply(self, c: K.Candidates) -> None:
        K.smooth(c, self.factor, self.curve)

    def accept(self, token_id: int) -> None:
        pass


class TopAStage:
    def __init__(self, st: S.TopA) -> None:
        self.a = st.a

    def apply(self, c: K.Candidates) -> None:
        K.top_a(c, self.a)

    def accept(self, token_id: int) -> None:
        pass


class TailFreeStage:
    def __init__(self, st: S.TailFree) -> None:
        self.z = st.z

    def apply(self, c: K.Candidates) -> None:
        K.tail_free(c, self.z)

    def accept(self, token_id: int) -> None:
        pass


class SkewStage:
    """The final choice with a skewed uniform draw, u keyed by (seed, position)."""

    def __init__(self, st: S.SkewDraw, position: int) -> None:
        self.skew, self.seed = st.skew, st.seed
        self.position = position  # tokens in the sequence before the one being chosen

    def apply(self, c: K.Candidates) -> None:
        u = float(K.uniform_noise(np.zeros(1, dtype=np.int64), self.seed, self.position)[0])
        K.skew_choice(c, self.skew, u)

    def accept(self, token_id: int) -> None:
        self.position += 1


class GumbelDrawStage:
    """The seeded random draw: Gumbel-max keyed by (seed, position, token id).

    Keyed by the position in the whole sequence, so a sampler rebuilt after a rollback (the
    engine passes prompt + kept output as history) continues the same noise stream.
    """

    def __init__(self, st: S.Draw, position: int) -> None:
        self.seed = st.seed
        self.position = position

    def apply(self, c: K.Candidates) -> None:
        K.gumbel_choice(c, self.seed, self.position)

    def accept(self, token_id: int) -> None:
        self.position += 1


class DecayingPenaltyStage:
    """Repetition/frequency/presence penalties that fade out over `decay` older tokens."""

    def __init__(self, st: S.Penalties, history: list[int]) -> None:
        self.st = st
        self.tokens = list(history)
        self.num_prompt = len(history)

    def apply(self, c: K.Candidates) -> None:
        st = self.st
        sustain = len(self.tokens) - self.num_prompt if st.output_only else st.last_n
        n = sustain + st.decay
        if n <= 0:
            return
        recent = np.asarray(self.tokens[-n:][::-1], dtype=np.int64)
        K.decayed_penalties(
            c,
            recent,
            sustain=sustain,
            decay=st.decay,
            repeat=st.repeat,
            frequency=st.frequency,
            presence=st.presence,
        )

    def accept(self, token_id: int) -> None:
        self.tokens.append(token_id)
