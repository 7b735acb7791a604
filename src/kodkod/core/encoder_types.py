"""The contract of a sentence encoder (an embedding model), shared by its backend and the
embedding service.

An `Encoder` tokenizes text and turns a batch of token lists into one pooled vector per list.
Its `EncoderInfo` states the limits the caller must respect before calling `embed` (the
longest input, the most tokens and sequences in one call): the backend never truncates.
An encoder has `info.lanes` lanes: calls on different lanes may run at the same time (from
different threads), calls on one lane run one after another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = ["Encoder", "EncoderInfo", "EncoderLoader"]


@dataclass(frozen=True, slots=True)
class EncoderInfo:
    name: str
    path: Path  # the GGUF that was loaded
    architecture: str
    n_embd: int  # length of one vector
    n_vocab: int
    max_input_tokens: int  # one input, special tokens included
    batch_tokens: int  # tokens of one embed() call
    batch_sequences: int  # inputs of one embed() call
    pooling: str  # "mean" | "cls" | "last"
    normalize: bool  # vectors are L2-normalised
    pack_tokens: int = 0  # the fastest tokens per call to pack inputs into (0: batch_tokens)
    pair_tokens: int = 0  # ... or two inputs of at most this many together (<= batch_tokens)
    lanes: int = 1  # calls that may run at the same time, one per lane


class Encoder(Protocol):
    info: EncoderInfo

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` with the model's special tokens around it."""
        ...

    def embed(self, inputs: Sequence[Sequence[int]], lane: int = 0) -> np.ndarray:
        """One float32 row per input (within the `info` limits), computed on `lane`."""
        ...

    def close(self) -> None: ...


class EncoderLoader(Protocol):
    def __call__(self, path: Path, name: str, *, n_threads: int, lanes: int = 1) -> Encoder:
        """An encoder with `lanes` lanes of `n_threads` threads each."""
        ...
