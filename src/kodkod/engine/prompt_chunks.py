"""Prompt chunks of one engine step: which prompts compute how many tokens, within a budget.

A step's token budget is `chunk_size` (llama.cpp's batch is at least that big). With batch
invariance off (the default), the decode rows of the step come first, one token each, and
what is left of the budget goes to the prompts still prefilling, first admitted first
(`take_chunks`): the oldest prompt takes as much as it needs, the next one the rest, and so on
until the budget or the KV cells run out. So a burst of short requests is prefilled in one
step instead of one step each, and a request's first token never waits behind a prompt that
arrived after it.

Decode rows and prompt chunks share a step only while the step stays small (`fits_mixed`):
llama.cpp's CPU flash attention switches at `MIXED_MAX_ROWS` query rows per ubatch to a tiled
kernel whose tiles of consecutive rows attend over the union of their sequences' cells, so
decode rows of several sequences inside a big step make it compute over every live cell of
the pool. Measured on a chat batch (docs/measurements.md, "where the chat-step time goes"): 8
decode rows beside a 120-token prompt cost far more than the same rows in a step of their own,
so a long prompt gets a PREFILL step of its own, taking turns with the streams' DECODE steps;
short prompts (a few tokens each) still ride in the decode step. Decode rows alone stay under
it too in the shared pool (`engine/decode_rows.py`, `DECODE_MAX_ROWS`).

Each chunk asks `room(n)` for its KV cells: the scheduler's reservation for the step being
planned, which evicts idle cached prefixes to find them and may give fewer (then the chunk is
shorter, and later prompts get nothing this step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kodkod.engine.plan import Entry, StepKind, StepPlan
from kodkod.engine.sequence import Sequence

# Query rows per ubatch at which llama.cpp's CPU flash attention turns to its tiled kernel
# (GGML_FA_TILE_Q in ggml-cpu): a mixed step stays below it.
MIXED_MAX_ROWS = 64


def prompt_end(seq: Sequence) -> int:
    """Where a sequence's prefill stops: its last token, except for a CFG pair, which computes
    its last prompt tokens together in a decode row (both logits in one step)."""
    return len(seq.tokens) - (1 if seq.group is not None else 0)


def chunk_entry(seq: Sequence, num_tokens: int) -> Entry:
    """The next `num_tokens` of `seq`'s prompt; logits when they reach its end."""
    end = prompt_end(seq)
    logits = 1 if seq.num_computed + num_tokens == end == len(seq.tokens) else 0
    return Entry(seq, seq.num_computed, num_tokens, logits, prefill=True)


def take_chunks(prefillers: Iterable[Sequence], budget: int, room: Callable[[int], int]) -> list[Entry]:
    """Chunks for `prefillers` (in order) within `budget` tokens; `room(n)` grants up to n KV
    cells. Stops at the first prompt that cannot get all it asked for."""
    entries: list[Entry] = []
    for seq in prefillers:
        if budget <= 0:
            break
        wanted = min(budget, prompt_end(seq) - seq.num_computed)
        if wanted <= 0:
            continue
        granted = room(wanted)
        if granted > 0:
            entries.append(chunk_entry(seq, granted))
            budget -= granted
        if granted < wanted:
            break
    return entries


def fits_mixed(num_decoders: int, prefillers: Iterable[Sequence], budget: int) -> bool:
    """Whether the prompt tokens the step would take beside `num_decoders` decode rows (at
    most `budget`) keep it under MIXED_MAX_ROWS rows (and there is budget left at all)."""
    if budget < 1:
        return False
    room = MIXED_MAX_ROWS - 1 - num_decoders
    return budget <= room or sum(prompt_end(s) - s.num_computed for s in prefillers) <= room


def step_of(decoders: list[Sequence], chunks: list[Entry]) -> StepPlan | None:
    """A step of one decode row per decoder, then the prompt chunks (None: nothing to run)."""
    entries = [Entry(s, s.num_computed, 1, 1) for s in decoders] + chunks
    if not entries:
        return None
    kind = StepKind.MIXED if decoders and chunks else StepKind.DECODE if decoders else StepKind.PREFILL
    return StepPlan(kind, entries)
