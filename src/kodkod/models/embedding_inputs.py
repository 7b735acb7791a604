"""What the embedding service does to a request's inputs before any batch runs: tokenize and
check them against the encoder's limits, cut them into batches, and share threads into lanes.

`tokenize_all` refuses an input the model cannot take (`EmbeddingInputError`, → 400 naming the
numbers; `InputTooLong` past the model's sequence limit). `plan_batches` cuts consecutive
inputs into batches within the encoder's tokens and sequences per call; `split_tail` halves
the last batch of each lane so the lanes finish together; `lane_plan` shares the embedding
threads out into lanes (`models/embeddings.py` runs them).
"""

from __future__ import annotations

from collections.abc import Sequence

from kodkod.core.encoder_types import Encoder

__all__ = [
    "MAX_LANES",
    "EmbeddingInputError",
    "InputTooLong",
    "lane_plan",
    "plan_batches",
    "split_tail",
    "tokenize_all",
]


class EmbeddingInputError(ValueError):
    """An input the model cannot take (→ 400, names the numbers)."""


class InputTooLong(EmbeddingInputError):
    """An input longer than the model's sequence limit."""


def plan_batches(lengths: Sequence[int], max_tokens: int, max_seqs: int, pair_tokens: int = 0) -> list[range]:
    """Consecutive input ranges of at most `max_seqs` inputs and `max_tokens` tokens, except
    that a range of one input takes a second when the two hold at most `pair_tokens` (an
    input longer than both forms a range of its own)."""
    out: list[range] = []
    start, tokens = 0, 0
    for i, n in enumerate(lengths):
        full = tokens + n > max_tokens and (i - start > 1 or tokens + n > pair_tokens)
        if i > start and (full or i - start >= max_seqs):
            out.append(range(start, i))
            start, tokens = i, 0
        tokens += n
    if start < len(lengths):
        out.append(range(start, len(lengths)))
    return out


def split_tail(batches: list[range], lanes: int) -> list[range]:
    """`batches` with each of the last `lanes` halved (by inputs): the lanes' final batches are
    short, so no lane waits long for the others at the end of a request."""
    if lanes < 2:
        return batches
    head, tail = batches[:-lanes], batches[-lanes:]
    out = list(head)
    for part in tail:
        mid = part.start + len(part) // 2
        out.extend([part] if len(part) < 2 else [range(part.start, mid), range(mid, part.stop)])
    return out


MAX_LANES = 4  # encoder contexts side by side; beyond a few, one context's threads scale as well


def lane_plan(n_threads: int) -> tuple[int, int]:
    """(lanes, threads per lane) for `n_threads` embedding threads: one lane per thread up to
    MAX_LANES, the threads shared out among them."""
    lanes = max(1, min(n_threads, MAX_LANES))
    return lanes, max(1, n_threads // lanes)


def tokenize_all(encoder: Encoder, inputs: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Each input's token ids (text tokenized, id lists taken as given), or the first input
    that is empty, too long or holds an id outside the vocabulary as an EmbeddingInputError."""
    info = encoder.info
    out: list[list[int]] = []
    for index, item in enumerate(inputs):
        ids = encoder.tokenize(item) if isinstance(item, str) else list(item)
        if not ids:
            raise EmbeddingInputError(f"input {index} is empty")
        if len(ids) > info.max_input_tokens:
            raise InputTooLong(
                f"input {index} has {len(ids)} tokens; the embedding model {info.name!r} takes at "
                f"most {info.max_input_tokens}"
            )
        bad = next((t for t in ids if not 0 <= t < info.n_vocab), None)
        if bad is not None:
            raise EmbeddingInputError(f"input {index} holds token id {bad}, outside 0..{info.n_vocab - 1}")
        out.append(ids)
    return out
