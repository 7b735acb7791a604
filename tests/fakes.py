"""A deterministic fake backend for engine tests (no model, no llama.cpp).

Its "model" is a lookup: the next token after token t is `script.get(t, (t + 1) % n_vocab)`.
Token t's text is `pieces.get(t, f"<{t}>")` as UTF-8 bytes (raw bytes allowed, to test
byte-fallback tokens). It mirrors llama.cpp's KV semantics per slot (positions must be
contiguous; decode into a position that is already filled is an error), records every batch,
and counts live samplers so tests can check nothing leaks. `fail_tokens` makes a decode fail
like llama.cpp's does: rows before the first bad one have already written their KV.

Costs without sleeping: give a backend a `FakeClock` (and the engine the same clock,
`EngineConfig.clock`) and every decode advances it by `call_cost_s + token_cost_s × tokens`, so
what the engine measures is exactly the set costs — deterministic, whatever the machine does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kodkod.core.backend_types import BackendCapabilities, BatchRow, KVCacheFullError, ModelInfo
from kodkod.core.types import SamplingParams


@dataclass
class FakeTokenizer:
    n_vocab: int
    pieces: dict[int, bytes]

    def token_bytes(self, token_id: int, *, special: bool) -> bytes:
        return self.pieces.get(token_id, f"<{token_id}>".encode())

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]:
        return [b % self.n_vocab for b in text.encode()]

    def detokenize(self, token_ids: Sequence[int], *, special: bool) -> str:
        return b"".join(self.token_bytes(t, special=special) for t in token_ids).decode("utf-8", "replace")


class FakeSampler:
    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        backend.live_samplers += 1
        self.closed = False

    def sample(self, index: int) -> int:
        return int(self.backend.logits(index).argmax())

    def accept(self, token_id: int) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.backend.live_samplers -= 1


@dataclass(slots=True)
class FakeClock:
    """Seconds that pass only when a fake backend decodes (engine thread only)."""

    now_s: float = 0.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@dataclass
class FakeBackend:
    n_vocab: int = 64
    kv_capacity: int = 256
    num_slots: int = 8
    slot_cells: int = 0  # > 0: per-slot KV streams of this many cells (decode refuses more)
    eos: int = 0
    script: dict[int, int] = field(default_factory=dict)
    second: dict[int, int] = field(default_factory=dict)
    pieces: dict[int, bytes] = field(default_factory=dict)
    fail_decode: bool = False
    fail_tokens: set[int] = field(default_factory=set)  # a batch holding one of these fails
    delay_s: float = 0.0  # sleep per decode, to make requests last
    clock: FakeClock | None = None  # advanced by each decode's set cost (below)
    call_cost_s: float = 0.0  # per decode call
    token_cost_s: float = 0.0  # per token in the call

    def __post_init__(self) -> None:
        self.tokenizer = FakeTokenizer(self.n_vocab, self.pieces)
        self.info = ModelInfo(
            name="fake",
            path=Path("fake.gguf"),
            architecture="fake",
            n_vocab=self.n_vocab,
            n_ctx_train=self.kv_capacity,
            n_params=0,
            size_bytes=0,
            bos_id=None,
            eos_ids=frozenset({self.eos}),
            add_bos=False,
            bos_text="",
            eos_text="<eos>",
            chat_template=None,
        )
        self.kv: list[list[int]] = [[] for _ in range(self.num_slots)]  # tokens per slot
        self.batches: list[list[BatchRow]] = []
        self.live_samplers = 0
        self._logits: list[np.ndarray] = []
        self.closed = False
        self.capabilities = BackendCapabilities()  # no LoRA, no grammars

    # tokenizer passthrough
    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]:
        return self.tokenizer.tokenize(text, add_bos=add_bos, parse_special=parse_special)

    def token_bytes(self, token_id: int, *, special: bool) -> bytes:
        return self.tokenizer.token_bytes(token_id, special=special)

    def next_token(self, t: int) -> int:
        return self.script.get(t, (t + 1) % self.n_vocab)

    def second_token(self, t: int) -> int:
        return self.second.get(t, (t + 2) % self.n_vocab)

    def decode(self, rows: Sequence[BatchRow]) -> list[list[int]]:
        if self.fail_decode:
            raise RuntimeError("simulated decode failure")
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.clock is not None:
            self.clock.advance(self.call_cost_s + self.token_cost_s * sum(len(r.tokens) for r in rows))
        bad = next((i for i, r in enumerate(rows) if self.fail_tokens.intersection(r.tokens)), None)
        if bad is not None:
            for row in rows[:bad]:  # written before the failing part, left behind
                self.kv[row.slot].extend(row.tokens)
            self.failed_decodes = getattr(self, "failed_decodes", 0) + 1
            raise RuntimeError("simulated decode failure: llama_decode failed with status -1")
        self.batches.append(list(rows))
        self._logits = []
        out: list[list[int]] = []
        i = 0
        for row in rows:
            cache = self.kv[row.slot]
            assert row.start_pos == len(cache), f"slot {row.slot}: start {row.start_pos} != {len(cache)}"
            assert None not in cache, f"slot {row.slot} has positions without KV"
            if self.slot_cells and len(cache) + len(row.tokens) > self.slot_cells:
                raise KVCacheFullError(f"slot {row.slot}: its KV stream is full")
            cache.extend(row.tokens)
            first = i + len(row.tokens) - row.num_logits
            idx = []
            for j, t in enumerate(row.tokens):
                if i + j >= first:
                    vec = np.zeros(self.n_vocab, dtype=np.float32)
                    vec[self.second_token(t)] = 5.0  # the runner-up, chosen when the first is banned
                    vec[self.next_token(t)] = 10.0
                    self._logits.append(vec)
                    idx.append(len(self._logits) - 1)
            i += len(row.tokens)
            out.append(idx)
        return out

    def logits(self, index: int) -> np.ndarray:
        return self._logits[index]

    def kv_copy(self, src: int, dst: int, p0: int, p1: int) -> None:
        if not self.kv[dst]:
            assert p0 == 0
            self.kv[dst] = list(self.kv[src][p0:p1])
            return
        # into positions a kv_remove(dst, p0, p1) emptied (compaction re-sharing a prefix)
        assert all(t is None for t in self.kv[dst][p0:p1]), "copy over live positions"
        self.kv[dst][p0:p1] = self.kv[src][p0:p1]

    def kv_remove(self, slot: int, p0: int, p1: int = -1) -> None:
        if p1 == -1:
            del self.kv[slot][p0:]
        else:  # a range inside: the positions become holes (None) until a kv_copy fills them
            self.kv[slot][p0:p1] = [None] * (p1 - p0)

    def kv_save(self, slot: int) -> bytearray:
        self.saves = getattr(self, "saves", 0) + 1
        return bytearray(json.dumps(self.kv[slot]), "utf-8")

    def kv_restore(self, slot: int, data: bytearray) -> None:
        assert not self.kv[slot], "restore into a non-empty slot"
        self.kv[slot] = list(json.loads(data))
        self.restores = getattr(self, "restores", 0) + 1

    def kv_clear(self) -> None:
        self.kv = [[] for _ in range(self.num_slots)]

    def new_sampler(
        self, params: SamplingParams, history: Sequence[int], num_prompt: int | None = None
    ) -> FakeSampler:
        return FakeSampler(self)

    def close(self) -> None:
        self.closed = True
