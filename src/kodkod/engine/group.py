"""Sequence groups: sequences that one request decodes in step.

A request with classifier-free guidance (`cfg_scale != 1`) is a group of two: its main
sequence and a shadow for the negative prompt. The scheduler admits, decodes and preempts the
two together; the shadow is never sampled — its logits row is mixed into the main's
(`neg + scale·(pos − neg)`, `engine/output.py`) — and it is rewound and ended with its main.
Every other sequence is a group of one and carries no record (`Sequence.group is None`), so
the common case costs nothing.

`n > 1` choices are not a group here: each choice is its own request (its own sampler, stream
and finish), and they share their prompt through the prefix cache — the scheduler makes a
request wait while another one is still prefilling a shared prefix
(`Scheduler._should_wait_for_prefill`), so the n choices, like any burst of identical prompts,
compute it once and then copy it (`seq_cp`, shared cells).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kodkod.engine.sequence import SeqStatus

if TYPE_CHECKING:
    from kodkod.engine.sequence import Sequence


@dataclass(slots=True, eq=False)
class SeqGroup:
    """A CFG pair: `main` is sampled, `shadow` (the negative prompt) only decoded beside it."""

    main: Sequence
    shadow: Sequence

    @property
    def members(self) -> tuple[Sequence, Sequence]:
        return self.main, self.shadow


def cfg_group(main: Sequence, shadow: Sequence) -> SeqGroup:
    """Tie a sequence and its negative-prompt shadow together."""
    group = SeqGroup(main, shadow)
    main.group = shadow.group = group
    return group


def members(seq: Sequence) -> tuple[Sequence, ...]:
    """Every sequence of `seq`'s group, main first."""
    return (seq,) if seq.group is None else seq.group.members


def main_of(seq: Sequence) -> Sequence:
    """The sequence of the group that is sampled (and owns the request's events)."""
    return seq if seq.group is None else seq.group.main


def is_shadow(seq: Sequence) -> bool:
    return seq.group is not None and seq.group.shadow is seq


def caught_up(running: Iterable[Sequence]) -> list[Sequence]:
    """The sequences with only their pending token to compute (decode rows); a CFG group only
    when both are caught up, main then shadow."""
    out: list[Sequence] = []
    for s in running:
        if s.in_prefill:
            continue
        g = s.group
        if g is None:
            out.append(s)
        elif g.main is s and not g.shadow.in_prefill and g.shadow.status is SeqStatus.RUNNING:
            out += g.members
    return out


def mains(seqs: Iterable[Sequence]) -> list[Sequence]:
    """The sampled sequences among `seqs` (shadows left out)."""
    return [s for s in seqs if s.group is None or s.group.main is s]
