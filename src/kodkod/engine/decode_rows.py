"""Which caught-up sequences get a decode row in this step, when one step may not hold them all.

llama.cpp's CPU flash attention (over an unquantised K and V cache of one type) runs a per-row
kernel for a micro-batch of fewer than `MIXED_MAX_ROWS` query rows and a tiled kernel from
that many rows on (`GGML_FA_TILE_Q`). A tile of consecutive rows skips a block of KV cells only
when every row of the tile masks all of them. In the one shared pool (`kv_layout: unified`) the
decode rows of a big step come from as many different sequences, so every tile unmasks the
cells of all of them and each row's attention becomes a matrix product over every live cell of
the pool: one more row at the threshold roughly doubles the step (docs/measurements.md, "decode
steps under 64 rows in the unified pool").

So in that layout a step holds at most `DECODE_MAX_ROWS` decode rows; the other caught-up
sequences decode in the next step. Rows go round robin, least recently decoded first (new
ones first of all, in running order), so every step stays full and no stream waits more than
one step in a row while there are at most twice the cap of them. A CFG pair (main and shadow) is one unit of
two rows: it decodes together or not at all. With per-slot KV streams each decode row attends
over its own stream only (llama.cpp gives every stream its own query rows), so there is no cap
there (`decode_row_cap`).
"""

from __future__ import annotations

from kodkod.engine.group import is_shadow
from kodkod.engine.prompt_chunks import MIXED_MAX_ROWS
from kodkod.engine.sequence import Sequence

# The most decode rows of different sequences one step holds in the shared pool: one under
# the row count at which the tiled attention kernel takes over.
DECODE_MAX_ROWS = MIXED_MAX_ROWS - 1


def decode_row_cap(tiled_attention: bool, per_slot: bool) -> int:
    """The decode rows one step may hold (0: no limit). `tiled_attention`: the context runs
    llama.cpp's CPU flash attention over an unquantised cache (its tiled kernel can run);
    `per_slot`: per-slot KV streams, where it never mixes sequences in a tile."""
    return DECODE_MAX_ROWS if tiled_attention and not per_slot else 0


class DecodeRowPicker:
    """Least recently decoded first, at most `max_rows` rows (0: every sequence, always).

    A round robin: each sequence that decodes in a capped step goes to the back of the line;
    a sequence new to the line goes to its front."""

    __slots__ = ("max_rows", "_turn", "_ticket")

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self._turn: dict[Sequence, int] = {}  # place in line of the sequences of capped steps
        self._ticket = 0

    def pick(self, decoders: list[Sequence]) -> list[Sequence]:
        """The sequences of `decoders` (caught up, a CFG shadow right after its main) that
        decode in this step, in their given order."""
        if not self.max_rows or len(decoders) <= self.max_rows:
            self._turn.clear()  # nobody waits: the line starts afresh next time
            return decoders
        units: list[list[Sequence]] = []
        for seq in decoders:
            if is_shadow(seq) and units:
                units[-1].append(seq)
            else:
                units.append([seq])
        turn = self._turn
        chosen: set[Sequence] = set()
        rows = 0
        for unit in sorted(units, key=lambda u: turn.get(u[0], -1)):
            if rows + len(unit) > self.max_rows:
                continue  # a pair that does not fit; a single row after it may
            rows += len(unit)
            chosen.update(unit)
            self._ticket += 1
            turn[unit[0]] = self._ticket  # to the back of the line
        self._turn = {u[0]: turn.get(u[0], -1) for u in units}  # the finished leave the line
        return [s for s in decoders if s in chosen]
