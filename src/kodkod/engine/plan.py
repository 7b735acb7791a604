"""What a scheduler step decides: the step plan — the rows to compute and every KV operation
the model runner replays on the backend (in order, before the step's decode) — and the draft
plan speculation attaches to a DECODE plan. Pure data.

A plan carries *all* the KV operations since the previous plan: those of its own admissions,
evictions and preemptions, and those queued between steps by `Scheduler.remove()` (trimming
the idle cache), `rollback()` (rejected drafts, banned-string rewinds), `room.clear_cache()` and the
cells reserved for drafts (`accept_drafts()`). Work between steps that needs the backend in
sync at once (exclusive work, idle compaction, a failed decode's retry) takes them as a KV-only
plan from `Scheduler.flush()`."""

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
    DECODE = "decode"  # decode rows only (one pending token each, plus drafts)
    PREFILL = "prefill"  # prompt chunks only
    MIXED = "mixed"  # decode rows, then prompt chunks (batch invariance off)
    KV_ONLY = "kv_only"  # no rows: only KV operations to replay


@dataclass(slots=True)
class Entry:
    seq: Sequence
    start: int  # first position computed (== seq.num_computed when planned)
    num_tokens: int
    num_logits: int  # 1 when this chunk reaches the end of seq.tokens, else 0
    # speculative decoding: tokens drafted after the pending one; the row computes
    # seq.tokens[start:] + drafts (num_tokens = num_logits = 1 + len(drafts))
    drafts: tuple[int, ...] | list[int] = ()
    prefill: bool = False  # a chunk of a prompt (else a decode row)


@dataclass(slots=True)
class DraftPlan:
    """Speculation's proposal for one DECODE plan: the entries that draft and how many tokens
    each wants (`wants[i]` for `entries[i]`), made before the KV ops run. The scheduler accepts
    it (`Scheduler.accept_drafts`: reserves `cells`) or refuses it; after the ops ran, the draft
    runner fills `drafts` (possibly shorter than wanted) and the plan takes them
    (`StepPlan.take_drafts`)."""

    entries: list[Entry]
    wants: list[int]
    cells: int  # KV cells the whole DECODE step needs: one per row plus every wanted draft
    drafts: list[list[int] | tuple[int, ...]] = field(default_factory=list)


@dataclass(slots=True)
class StepPlan:
    kind: StepKind
    entries: list[Entry]
    kv_ops: list[KVOp] = field(default_factory=list)
    draft: DraftPlan | None = None  # accepted draft plan (DECODE only)

    @property
    def num_tokens(self) -> int:
        return sum(e.num_tokens for e in self.entries)

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens of the plan's prompt chunks."""
        return sum(e.num_tokens for e in self.entries if e.prefill)

    def take_drafts(self, drafts: DraftPlan) -> None:
        """Each drafting entry's row becomes its pending token plus its drafts."""
        for e, d in zip(drafts.entries, drafts.drafts, strict=True):
            e.drafts = d
            e.num_tokens = e.num_logits = 1 + len(d)
