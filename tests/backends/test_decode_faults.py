"""Decode-failure isolation against real llama.cpp (default model, in process).

The API refuses token ids outside the vocabulary before they reach the engine; these tests go
around that check to prove the engine's second line of defence: llama_decode really fails for
such a batch, the rows responsible are found, the KV cache is repaired (llama.cpp accepts the
same positions again), and a greedy stream running beside the bad request is not affected.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kodkod.backends.llamacpp.backend import LlamaCppBackend
from kodkod.core.backend_types import BatchRow, ContextConfig, ModelSource
from kodkod.core.types import (
    ErrorEvent,
    ErrorKind,
    FinishEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from kodkod.engine.client import EngineClient
from kodkod.engine.faults import find_culprits
from kodkod.engine.loop import EngineConfig
from kodkod.engine.stream import RequestStream

pytestmark = pytest.mark.model

BAD = 999999999
PROMPT = "The lighthouse keeper looked at the grey sea and wrote in his journal that"


@pytest.fixture(scope="module")
def backend(default_gguf: Path) -> Iterator[LlamaCppBackend]:
    b = LlamaCppBackend.load(
        ModelSource(default_gguf, "default"),
        lambda info: ContextConfig(cache_size=1024, num_slots=4, batch_tokens=256, n_threads=2),
    )
    yield b
    b.close()


def test_find_culprits_names_the_bad_row_and_repairs_the_cache(backend: LlamaCppBackend) -> None:
    ids = backend.tokenize(PROMPT, add_bos=True, parse_special=True)
    backend.kv_clear()
    (idx,) = backend.decode([BatchRow(0, ids, 0, 1)])
    expected = backend.logits(idx[-1]).copy()
    backend.kv_clear()
    rows = [BatchRow(0, ids, 0, 1), BatchRow(1, [1, 2, BAD], 0, 1)]
    with pytest.raises(Exception) as err:
        backend.decode(rows)
    assert find_culprits(backend, rows, err.value) == [1]
    # every slot is back where it started: the good row decodes again at the same positions
    (idx,) = backend.decode([rows[0]])
    np.testing.assert_array_equal(backend.logits(idx[-1]), expected)
    backend.kv_clear()


def test_a_bad_prompt_that_reaches_the_engine_fails_alone(backend: LlamaCppBackend) -> None:
    greedy = SamplingParams(temperature=0.0)
    ids = backend.tokenize(PROMPT, add_bos=True, parse_special=True)

    def good(rid: str) -> GenerationRequest:
        return GenerationRequest(rid, list(ids), sampling=greedy, max_tokens=40, ban_eos_token=True)

    async def main() -> None:
        backend.kv_clear()
        client = EngineClient.start(backend, EngineConfig(max_seq_len=512, max_batch_size=4, chunk_size=64))
        fatal: list[BaseException] = []
        client._engine._on_fatal = fatal.append
        try:
            await client.submit(good("warm")).collect()
            alone, _ = await client.submit(good("alone")).collect()  # from the cached prefix too
            stream = client.submit(good("beside"))
            it = stream.__aiter__()
            first = await it.__anext__()
            assert isinstance(first, TokenEvent)
            # around client.check, which would refuse it with a 400
            bad = RequestStream("bad", asyncio.get_running_loop())
            client._engine.submit(GenerationRequest("bad", [1, BAD], sampling=greedy, max_tokens=4), bad)
            _, bad_final = await bad.collect()
            assert isinstance(bad_final, ErrorEvent) and bad_final.kind is ErrorKind.BAD_REQUEST
            ids_out = list(first.token_ids)
            final = None
            async for ev in it:
                if isinstance(ev, TokenEvent):
                    ids_out += ev.token_ids
                else:
                    final = ev
            assert isinstance(final, FinishEvent)
            assert ids_out == alone.token_ids
            assert fatal == [] and client.problem is None
        finally:
            await client.shutdown("test over")

    asyncio.run(main())
