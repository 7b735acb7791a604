"""A `llama_batch` over numpy arrays, refilled in place for every decode.

`llama_batch_init` allocates one small array of sequence ids per token, which can only be
filled one token at a time through ctypes pointers. Here every array of the batch is a numpy
array this object owns (the per-token sequence-id pointers point into one contiguous array), so
a prompt chunk is written with a few slice assignments, and a one-token decode row with a few
scalar stores. Each token belongs to exactly one sequence, so the sequence counts are set once.
The arrays live as long as this object; llama.cpp only reads them during `llama_decode`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import llama_cpp as L
import numpy as np

from kodkod.core.backend_types import BackendError, BatchRow


def _ptr(arr: np.ndarray, ctype: type) -> ctypes._Pointer:
    return ctypes.cast(arr.ctypes.data, ctypes.POINTER(ctype))


class NumpyBatch:
    """A batch of up to `capacity` tokens; `struct` is what `llama_decode` takes."""

    __slots__ = ("capacity", "struct", "_token", "_pos", "_n_seq", "_seq", "_seq_ptrs", "_want")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._token = np.zeros(capacity, np.int32)
        self._pos = np.zeros(capacity, np.int32)
        self._n_seq = np.ones(capacity, np.int32)  # one sequence per token, always
        self._seq = np.zeros(capacity, np.int32)
        # token i's sequence ids: a pointer to _seq[i]
        self._seq_ptrs = np.arange(capacity, dtype=np.uintp) * np.uintp(4) + np.uintp(self._seq.ctypes.data)
        self._want = np.zeros(capacity, np.int8)
        self.struct = L.llama_batch(
            n_tokens=0,
            token=_ptr(self._token, ctypes.c_int32),
            embd=None,
            pos=_ptr(self._pos, ctypes.c_int32),
            n_seq_id=_ptr(self._n_seq, ctypes.c_int32),
            seq_id=_ptr(self._seq_ptrs, ctypes.POINTER(ctypes.c_int32)),
            logits=_ptr(self._want, ctypes.c_int8),
        )

    def fill(self, rows: Sequence[BatchRow], in_slot_order: bool = False) -> list[list[int]]:
        """Write `rows` into the batch; for each row (in the given order), the batch indices of
        its logits. `in_slot_order` writes the rows sorted by slot: with one KV stream per slot,
        llama.cpp cuts a batch into micro-batches of runs of consecutive sequence ids."""
        token, pos, seq, want = self._token, self._pos, self._seq, self._want
        order = sorted(range(len(rows)), key=lambda k: rows[k].slot) if in_slot_order else range(len(rows))
        out: list[list[int]] = [[] for _ in rows]
        i = 0
        for k in order:
            row = rows[k]
            tokens = row.tokens
            n = len(tokens)
            end = i + n
            if end > self.capacity:
                raise BackendError(f"batch of more than {self.capacity} tokens")
            first_logit = end - row.num_logits
            if n == 1:  # a decode row: scalar stores beat slice assignments
                token[i] = tokens[0]
                pos[i] = row.start_pos
                seq[i] = row.slot
                want[i] = row.num_logits
            else:
                token[i:end] = tokens
                pos[i:end] = np.arange(row.start_pos, row.start_pos + n, dtype=np.int32)
                seq[i:end] = row.slot
                want[i:first_logit] = 0
                want[first_logit:end] = 1
            out[k] = list(range(first_logit, end))
            i = end
        self.struct.n_tokens = i
        return out
