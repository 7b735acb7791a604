"""The numpy `llama_batch` (what llama_decode reads) and the logits view over a real decode.

The batch tests need no model; the logits test decodes with the default model and compares
every row the backend hands out with llama.cpp's own `llama_get_logits_ith`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import llama_cpp as L
import numpy as np
import pytest

from kodkod.backends.llamacpp.backend import LlamaCppBackend
from kodkod.backends.llamacpp.batch import NumpyBatch
from kodkod.core.backend_types import BackendError, BatchRow, ContextConfig, ModelSource

# -- the numpy llama_batch --------------------------------------------------------------------


def test_numpy_batch_holds_what_llama_decode_reads() -> None:
    batch = NumpyBatch(16)
    rows = [
        BatchRow(3, [7], 40, 1),
        BatchRow(1, [10, 11, 12, 13], 5, 1),
        BatchRow(2, [20, 21], 0, 0),
        BatchRow(0, [30, 31], 9, 2),
    ]
    assert batch.fill(rows) == [[0], [4], [], [7, 8]]
    s = batch.struct
    assert s.n_tokens == 9
    assert [s.token[i] for i in range(9)] == [7, 10, 11, 12, 13, 20, 21, 30, 31]
    assert [s.pos[i] for i in range(9)] == [40, 5, 6, 7, 8, 0, 1, 9, 10]
    assert [s.n_seq_id[i] for i in range(9)] == [1] * 9
    assert [s.seq_id[i][0] for i in range(9)] == [3, 1, 1, 1, 1, 2, 2, 0, 0]
    assert [s.logits[i] for i in range(9)] == [1, 0, 0, 0, 1, 0, 0, 1, 1]
    assert not s.embd
    # refilled in place: a smaller step leaves nothing of the last one behind that it reads
    assert batch.fill([BatchRow(5, [1, 2, 3], 0, 1)]) == [[2]]
    assert s.n_tokens == 3
    assert [s.logits[i] for i in range(3)] == [0, 0, 1]
    assert [s.seq_id[i][0] for i in range(3)] == [5, 5, 5]
    assert ctypes.addressof(s.seq_id[2].contents) - ctypes.addressof(s.seq_id[0].contents) == 8


def test_numpy_batch_in_slot_order_writes_rows_by_slot_and_maps_logits_back() -> None:
    # one KV stream per slot: llama.cpp wants runs of consecutive sequence ids, so the rows go in
    # slot order while each row's logit indices still come back in the caller's row order
    batch = NumpyBatch(16)
    rows = [BatchRow(3, [7], 40, 1), BatchRow(1, [10, 11, 12], 5, 1), BatchRow(0, [30, 31], 9, 2)]
    assert batch.fill(rows, in_slot_order=True) == [[5], [4], [0, 1]]
    s = batch.struct
    assert [s.seq_id[i][0] for i in range(6)] == [0, 0, 1, 1, 1, 3]
    assert [s.token[i] for i in range(6)] == [30, 31, 10, 11, 12, 7]
    assert [s.pos[i] for i in range(6)] == [9, 10, 5, 6, 7, 40]
    assert [s.logits[i] for i in range(6)] == [1, 1, 0, 0, 1, 1]


def test_numpy_batch_refuses_more_tokens_than_it_holds() -> None:
    batch = NumpyBatch(4)
    with pytest.raises(BackendError, match="more than 4 tokens"):
        batch.fill([BatchRow(0, [1, 2, 3], 0, 1), BatchRow(1, [1, 2], 0, 1)])
    with pytest.raises(OverflowError):  # an id no llama_token can hold is refused, not wrapped
        batch.fill([BatchRow(0, [2**40], 0, 1)])


@pytest.fixture(scope="module")
def backend(default_gguf: Path) -> Iterator[LlamaCppBackend]:
    b = LlamaCppBackend.load(
        ModelSource(default_gguf, "default"),
        lambda info: ContextConfig(cache_size=1024, num_slots=4, batch_tokens=256, n_threads=2),
    )
    yield b
    b.close()


@pytest.mark.model
def test_logits_rows_are_llama_cpps_rows_for_every_batch_shape(backend: LlamaCppBackend) -> None:
    ids = backend.tokenize("The lighthouse keeper looked at the grey sea", add_bos=True, parse_special=True)
    n = len(ids)
    steps = [
        # prompt chunks with one, several and no logits beside a one-token row
        [
            BatchRow(0, ids, 0, 1),
            BatchRow(1, ids[:5], 0, 2),
            BatchRow(2, ids[:1], 0, 1),
            BatchRow(3, ids[:4], 0, 0),
        ],
        [BatchRow(0, [5], n, 1)],  # one decode row
        [BatchRow(1, ids[5:8], 5, 3), BatchRow(2, [3], 1, 1)],  # verification-like rows
        [BatchRow(0, [7], n + 1, 1), BatchRow(1, [7], 8, 1), BatchRow(2, [7], 2, 1), BatchRow(3, [7], 4, 1)],
    ]
    for rows in steps:
        indices = backend.decode(rows)
        for row, idx in zip(rows, indices, strict=True):
            assert len(idx) == row.num_logits
            for i in idx:
                ptr = L.llama_get_logits_ith(backend._ctx, i)
                row_view = backend.logits(i)
                assert row_view.shape == (backend.info.n_vocab,)
                assert row_view.ctypes.data == ctypes.addressof(ptr.contents)
                assert np.array_equal(row_view, np.ctypeslib.as_array(ptr, shape=(backend.info.n_vocab,)))
    backend.kv_clear()


@pytest.fixture(scope="module")
def per_slot_backend(default_gguf: Path) -> Iterator[LlamaCppBackend]:
    b = LlamaCppBackend.load(
        ModelSource(default_gguf, "default"),
        lambda info: ContextConfig(
            cache_size=1024, num_slots=4, batch_tokens=256, n_threads=2, kv_unified=False
        ),
    )
    yield b
    b.close()


@pytest.mark.model
def test_per_slot_logits_rows_follow_the_callers_rows(
    backend: LlamaCppBackend, per_slot_backend: LlamaCppBackend
) -> None:
    # rows out of slot order with partial logits: the batch is written in slot order, and each
    # row's logits must still be that row's (the same as the unified pool gives for it)
    ids = backend.tokenize("The lighthouse keeper looked at the grey sea", add_bos=True, parse_special=True)
    rows = [BatchRow(2, ids, 0, 1), BatchRow(0, ids[:5], 0, 2), BatchRow(1, ids[:3], 0, 0)]
    want = [[backend.logits(i).copy() for i in idx] for idx in backend.decode(rows)]
    got = [[per_slot_backend.logits(i).copy() for i in idx] for idx in per_slot_backend.decode(rows)]
    for w_row, g_row in zip(want, got, strict=True):
        assert len(w_row) == len(g_row)
        for w, g in zip(w_row, g_row, strict=True):
            assert int(np.argmax(w)) == int(np.argmax(g))
            assert np.allclose(w, g, atol=1e-2)
    backend.kv_clear()
    per_slot_backend.kv_clear()
