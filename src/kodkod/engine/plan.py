"""What a scheduler step decides: KV operations for the engine loop to replay on the backend
(in order, before the step's decode), and the step plan itself. Pure data."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kodkod.engine.host_cache import HostEntry
from kodkod.engine.sequence import Sequence


@dataclass(frozen=True, slots=True)
class CopyPrefix:
    src: int
    dst: int
    length: int


@dataclass(frozen=True, slots=True)
class Truncate:
    slot: int
    length: int  # keep positions [0, length)


@dataclass(frozen=True, slots=True)
class Offload:
    """Save the slot's KV to the host tier (the Truncate that frees it follows)."""

    slot: int
    entry: HostEntry


@dataclass(frozen=True, slots=True)
class Restore:
    """Load a host-tier entry's KV into an empty slot."""

    slot: int
    entry: HostEntry


KVOp = CopyPrefix | Truncate | Offload | Restore


class Admission(enum.Enum):
    ADMITTED = "admitted"
    SHARE_WAIT = "share_wait"  # waits for a running prefill of a shared prefix
    NO_ROOM = "no_room"


class StepKind(enum.Enum):
    DECODE = "decode"
    PREFILL = "prefill"


@dataclass(slots=True)
class Entry:
    seq: Sequence
    start: int  # first position computed (== seq.num_computed when planned)
    num_tokens: int
    num_logits: int  # 1 when this chunk reaches the end of seq.tokens, else 0
    # speculative decoding: tokens drafted after the pending one; the row computes
    # seq.tokens[start:] + drafts (num_tokens = num_logits = 1 + len(drafts))
    drafts: tuple[int, ...] | list[int] = ()


@dataclass(slots=True)
class StepPlan:
    kind: StepKind
    entries: list[Entry]
    kv_ops: list[KVOp] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(e.num_tokens for e in self.entries)
