"""The scheduler: which sequences run, and what each engine step computes. Pure — no backend.

Each `schedule()` returns one `StepPlan` of rows for one `llama_decode`. A decode row is the one
pending token of a running sequence that is caught up on its prompt (plus the tokens it
drafted, to verify: see `engine/speculative/`); a prompt chunk is the next tokens of a prompt.

* Batch invariance off (the default): a step holds the decode row of every caught-up sequence
  and, in what is left of `chunk_size` tokens, the chunks of several prompts, first admitted
  first (`engine/prompt_chunks.py`; a MIXED step, or DECODE / PREFILL when one kind is
  missing), as long as the step stays under `MIXED_MAX_ROWS` rows; a bigger one would make
  llama.cpp's attention kernel visit every live cell for the decode rows, so then a DECODE
  step and a PREFILL step (several prompts, the whole `chunk_size`) take turns. A burst of
  requests is prefilled together. Drafting happens in DECODE steps only. In the shared pool
  with that kernel (`tiled_attention`) a step holds at most `DECODE_MAX_ROWS` decode rows,
  least recently decoded first (`engine/decode_rows.py`); the rest decode in the next step.
* Batch invariance on (`batch_invariant`): a DECODE step of decode rows only, or a PREFILL
  step of ONE prompt's chunk, taking turns when both are pending. llama.cpp's CPU kernels give
  slightly different numbers for different batch shapes; keeping prompts alone makes a
  request's greedy output independent of its neighbours (engine-notes.md), at the cost of one
  step per prompt chunk under concurrency.

A step holds sequences of one LoRA adapter set only; sets take turns (`engine/adapters.py`),
and prefixes are only reused under the same set.

Admission (FIFO) happens before each plan: a waiting sequence gets a slot when fewer than
`max_batch_size` run and the pool has room for its uncached prompt tokens. It starts from the
longest cached or running prefix: an exact cached prefix is adopted in place, a partial one is
shared into a fresh slot (`seq_cp` — shared cells, no copy). A request whose prompt shares a
prefix with a sequence still prefilling waits for it, so `n` choices and bursts of identical
prompts compute their common prefix once. Under pressure, cached prefixes are evicted LRU; if
decode still has no room, the newest running sequence is preempted (its KV dropped, it will
recompute transparently), so nothing running is ever corrupted.

With per-slot KV streams (`KVPool.slot_cells`) a slot's sequence is bounded by `max_seq_len`,
which fits its stream, so cells are never short: the only contended resource is slots. A
partial prefix is then copied for real into a free slot, or, when no slot is free, the cached
slot holding it is adopted and cut to fit (its whole prefix offered to the host tier first);
idle streams are outside every other slot's attention, so nothing is trimmed while busy.

Idle cached prefixes are kept under a budget while anything runs, and pushed out to the
host-RAM tier when there is one (`engine/kv_room.py`: eviction, the budget, and the queue of
KV ops); they come back from there (`Restore`) when a later request shares them.

KV operations decided here are applied to the `KVPool` mirror at once and queued; the next
plan carries every queued op (`engine/plan.py`), and the model runner (`engine/runner.py`)
replays them on the backend before the decode. Ops queued between steps (`remove`,
`rollback`, `room.clear_cache`) ride in the next plan; work between steps that needs the backend
in sync at once takes them as a KV-only plan from `flush()`. Speculation asks for the cells of
its drafts through one call, `accept_drafts()`; it never edits scheduler state.
"""

from __future__ import annotations

import contextlib
from collections import deque

from kodkod.engine.adapters import pick_group
from kodkod.engine.budget import HOST_MIN_GAIN
from kodkod.engine.decode_rows import DecodeRowPicker, decode_row_cap
from kodkod.engine.group import caught_up, main_of, members
from kodkod.engine.host_cache import HostEntry, HostPrefixCache
from kodkod.engine.kv import KVPool, SlotState, SlotTable, common_prefix_len
from kodkod.engine.kv_room import KVRoom
from kodkod.engine.plan import (  # re-exported: the plan types live in plan.py
    Admission,
    CopyPrefix,
    DraftPlan,
    KVOp,
    Offload,
    Restore,
    StepKind,
    StepPlan,
    Truncate,
)
from kodkod.engine.prompt_chunks import fits_mixed, prompt_end, step_of, take_chunks
from kodkod.engine.scheduler_config import SchedulerConfig  # re-exported
from kodkod.engine.sequence import SeqStatus, Sequence

__all__ = [
    "Admission",
    "CopyPrefix",
    "DraftPlan",
    "KVOp",
    "Offload",
    "Restore",
    "Scheduler",
    "SchedulerConfig",
    "StepKind",
    "StepPlan",
    "Truncate",
]


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        capacity: int,
        num_slots: int,
        host: HostPrefixCache | None = None,
        slot_cells: int = 0,
    ) -> None:
        self.config = config
        self.pool = KVPool(capacity, num_slots, slot_cells)
        self.slots = SlotTable(self.pool, num_slots)
        self.room = KVRoom(self.pool, self.slots, host, config.busy_cache_cells)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.paused = False  # stop admitting (exclusive work is waiting for the engine)
        self.num_preemptions = 0
        self._prefill_next = False
        self._last_group: tuple | None = None  # adapter key of the last step's rows
        self._reserved = 0  # KV cells the step being planned has taken (`_reserve`)
        self._rows = DecodeRowPicker(decode_row_cap(config.tiled_attention, slot_cells > 0))

    # -- bookkeeping ------------------------------------------------------------------------

    @property
    def max_decode_rows(self) -> int:
        """The decode rows one step may hold, drafted ones included (0: no limit)."""
        return self._rows.max_rows

    @property
    def has_work(self) -> bool:
        return bool(self.running) or (bool(self.waiting) and not self.paused)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted); its computed KV stays as a cached prefix."""
        if seq.status is SeqStatus.WAITING:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        elif seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq, keep=True)
            if self.running:
                self.room.trim_idle_cache()
        seq.status = SeqStatus.FINISHED

    @property
    def host(self) -> HostPrefixCache | None:
        return self.room.host

    def _release(self, seq: Sequence, *, keep: bool) -> None:
        self.room.release(seq.slot, keep=keep)
        seq.slot = -1

    def flush(self) -> StepPlan | None:
        """A KV-only plan of the ops queued since the last plan (None: nothing queued), for
        work between steps that needs the backend in sync now."""
        return StepPlan(StepKind.KV_ONLY, [], self.room.take_ops()) if self.room.ops else None

    @property
    def prefill_pending(self) -> bool:
        """Requests wait for admission or a running sequence is still prefilling."""
        return bool(self.waiting) or any(s.in_prefill for s in self.running)

    # -- admission --------------------------------------------------------------------------

    def _should_wait_for_prefill(self, seq: Sequence, reusable: int) -> bool:
        """A running sequence is still computing a longer shared prefix: wait and share it."""
        for other in self.running:
            if not other.in_prefill or other.adapter_key != seq.adapter_key:
                continue
            shared = min(common_prefix_len(other.tokens[: other.num_prompt], seq.tokens), len(seq.tokens) - 1)
            if shared >= self.config.min_shared_prefix and shared > reusable:
                return True
        return False

    def _admit_one(self, seq: Sequence) -> Admission:
        limit = len(seq.tokens) - 1  # at least one token is computed to get logits
        match = self.slots.best_match(seq.tokens, limit, seq.adapter_key)
        reuse = match.length if match is not None else 0
        if self._should_wait_for_prefill(seq, reuse):
            return Admission.SHARE_WAIT
        if self.host is not None:
            hit = self.host.best_match(seq.tokens, limit, seq.adapter_key)
            if hit is not None and hit[1] >= reuse + HOST_MIN_GAIN:
                return self._admit_from_host(seq, *hit)
        src = match.slot if match is not None else -1
        headroom = len(self.running) + 1
        if not self.room.make_room(len(seq.tokens) - reuse + headroom, exclude=src):
            return Admission.NO_ROOM
        src_slot = self.slots.slots[src] if src >= 0 else None
        if src_slot is not None and src_slot.state is SlotState.CACHED and self.pool.length(src) == reuse:
            slot = src  # the cached prefix is exactly what we need: adopt it
        elif (
            self.pool.per_slot
            and src_slot is not None
            and src_slot.state is SlotState.CACHED
            and self.slots.free_slot() is None
        ):  # per-slot streams: adopting beats evicting another slot to copy into it
            self.room.offload(src_slot)
            self.room.truncate(src, reuse)
            slot = src
        else:
            free = self.room.take_slot(exclude=src)
            if free is None:
                if src_slot is None or src_slot.state is not SlotState.CACHED:
                    return Admission.NO_ROOM
                self.room.truncate(src, reuse)  # no spare slot: adopt the cached one, cut to fit
                slot = src
            else:
                slot = free
                if reuse:
                    self.pool.copy_prefix(src, slot, reuse)
                    self.room.ops.append(CopyPrefix(src, slot, reuse))
        self._activate(seq, slot, reuse)
        return Admission.ADMITTED

    def _admit_from_host(self, seq: Sequence, entry: HostEntry, reuse: int) -> Admission:
        """Start from a prefix kept in host RAM: restore it into a free slot, cut to fit."""
        stored = len(entry.tokens)
        headroom = len(self.running) + 1
        if not self.room.make_room(stored + len(seq.tokens) - reuse + headroom):
            return Admission.NO_ROOM
        slot = self.room.take_slot()
        if slot is None:
            return Admission.NO_ROOM
        self.room.ops.append(Restore(slot, entry))
        self.pool.append(slot, stored)
        self.room.truncate(slot, reuse)
        assert self.host is not None
        self.host.used(entry)
        self._activate(seq, slot, reuse)
        return Admission.ADMITTED

    def _activate(self, seq: Sequence, slot: int, reuse: int) -> None:
        target = self.slots.slots[slot]
        target.state = SlotState.ACTIVE
        target.tokens = seq.tokens
        target.last_used = self.slots.tick()
        target.adapter_key = seq.adapter_key
        seq.slot = slot
        seq.num_computed = reuse
        seq.num_cached = reuse if seq.stats.num_preemptions == 0 else seq.num_cached
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def _admit_pair(self, seq: Sequence) -> Admission:
        """Admit a sequence and its CFG shadow together, or neither."""
        outcome = self._admit_one(seq)
        if outcome is not Admission.ADMITTED or seq.group is None:
            return outcome
        partner_outcome = self._admit_one(seq.group.shadow)
        if partner_outcome is Admission.ADMITTED:
            return outcome
        self.running.remove(seq)
        self._release(seq, keep=True)
        seq.status = SeqStatus.WAITING
        return partner_outcome

    def _admit(self) -> None:
        if self.paused:
            return
        skipped: list[Sequence] = []
        admitted = False
        while self.waiting and len(self.running) < self.config.max_batch_size:
            seq = self.waiting.popleft()
            outcome = self._admit_pair(seq)
            admitted = admitted or outcome is Admission.ADMITTED
            if outcome is Admission.SHARE_WAIT:
                skipped.append(seq)  # later requests may go ahead meanwhile
            elif outcome is Admission.NO_ROOM:
                self.waiting.appendleft(seq)  # keep FIFO order
                break
        for seq in reversed(skipped):
            self.waiting.appendleft(seq)
        if admitted:  # the idle cache only changes on admissions and removals: not every step
            self.room.trim_idle_cache()

    # -- planning ---------------------------------------------------------------------------

    def _preempt_newest(self, keep: Sequence | None = None) -> bool:
        for seq in reversed(self.running):
            if seq is keep or (keep is not None and seq.group is not None and seq.group is keep.group):
                continue
            main = main_of(seq)
            for s in members(main):
                if s.status is SeqStatus.RUNNING:
                    self.running.remove(s)
                    self._release(s, keep=False)
                    s.num_computed = 0
                    s.status = SeqStatus.WAITING
            main.stats.num_preemptions += 1
            self.waiting.appendleft(main)
            self.num_preemptions += 1
            return True
        return False

    def _room_for_decoders(self, decoders: list[Sequence]) -> list[Sequence]:
        """A cell for each decoder (evicting idle prefixes, then preempting the newest running
        sequences); the decoders of that adapter set still running afterwards."""
        key = decoders[0].adapter_key if decoders else ()
        while decoders and not self.room.make_room(len(decoders)):
            if not self._preempt_newest():
                return []
            decoders = [s for s in caught_up(self.running) if s.adapter_key == key]
        return decoders

    def _out_of_cells(self) -> bool:
        return not self.pool.per_slot and self.pool.free_cells < 1

    def _reserve(self, cells: int) -> int:
        """Up to `cells` more KV cells for the step being planned (idle prefixes are evicted
        to find them); how many it got."""
        self.room.make_room(self._reserved + cells)
        if self.pool.per_slot:
            return cells  # each sequence fits its own stream
        got = max(0, min(cells, self.pool.free_cells - self._reserved))
        self._reserved += got
        return got

    def _plan_prefill(self, seq: Sequence) -> StepPlan | None:
        """A PREFILL step of one prompt's next chunk (batch invariance on)."""
        self._reserved = 0
        self.room.make_room(min(self.config.chunk_size, prompt_end(seq) - seq.num_computed))
        while self._out_of_cells() and self._preempt_newest(keep=seq):
            pass
        return step_of([], take_chunks([seq], self.config.chunk_size, self._reserve))

    def _plan_alone(self) -> StepPlan | None:
        """Batch invariance on: a DECODE step or one prompt's PREFILL chunk, taking turns."""
        # One LoRA set per decode (llama.cpp applies adapters to the whole batch); sets take
        # turns across steps, see engine/adapters.py.
        decoders = pick_group(caught_up(self.running), self._last_group)
        prefillers = [s for s in self.running if s.in_prefill]
        plan: StepPlan | None = None
        if decoders and (not prefillers or not self._prefill_next):
            plan = step_of(self._rows.pick(self._room_for_decoders(decoders)), [])
            self._prefill_next = True
            if plan is not None:
                self._last_group = plan.entries[0].seq.adapter_key
        if plan is None and prefillers:
            plan = self._plan_prefill(prefillers[0])
            self._prefill_next = False
        return plan

    def _plan_mixed(self) -> StepPlan | None:
        """Batch invariance off: the decode row of every caught-up sequence, then prompt
        chunks, first admitted first, in what is left of `chunk_size` (`engine/prompt_chunks.py`),
        all of one LoRA set (sets take turns). When that step would not be a small one
        (`fits_mixed`: the decode rows fill the budget, or rows and prompt tokens reach
        `MIXED_MAX_ROWS`), a decode-only step and a prompt-only step take turns."""
        prefilling = [s for s in self.running if s.in_prefill]
        work = pick_group(caught_up(self.running) + prefilling, self._last_group)
        if not work:
            return None
        key = work[0].adapter_key
        self._last_group = key
        decoders = self._rows.pick(self._room_for_decoders([s for s in work if not s.in_prefill]))
        prefillers = [s for s in self.running if s.in_prefill and s.adapter_key == key]  # after preemptions
        budget = self.config.chunk_size - len(decoders)
        if prefillers and decoders and not fits_mixed(len(decoders), prefillers, budget):
            # a decode-only step and a prompt-only step take turns
            if self._prefill_next:
                decoders, budget = [], self.config.chunk_size
            else:
                budget = 0
            self._prefill_next = not self._prefill_next
        self._reserved = len(decoders)
        if prefillers and not decoders:  # nothing else would free cells for the oldest prompt
            while self._out_of_cells() and self._preempt_newest(keep=prefillers[0]):
                pass
        return step_of(decoders, take_chunks(prefillers, budget, self._reserve))

    def schedule(self) -> StepPlan | None:
        """The next step (DECODE, PREFILL or MIXED), a KV-only plan when nothing can run but KV
        ops are queued, or None when there is nothing to do. The plan carries every queued op."""
        self._admit()
        plan = self._plan_alone() if self.config.batch_invariant else self._plan_mixed()
        if plan is None:
            return self.flush()
        plan.kv_ops = self.room.take_ops()
        return plan

    def commit(self, plan: StepPlan) -> None:
        """The plan's decode succeeded: its tokens are now in the KV cache."""
        for e in plan.entries:
            self.pool.append(e.seq.slot, e.num_tokens)
            e.seq.num_computed += e.num_tokens

    def rollback(self, seq: Sequence, length: int) -> None:
        """Drop KV positions >= length of a running sequence (rejected draft tokens)."""
        self.room.truncate(seq.slot, length)
        seq.num_computed = min(seq.num_computed, length)

    def accept_drafts(self, plan: StepPlan, drafts: DraftPlan) -> bool:
        """Speculation's one way in: make the draft plan's cells free for this DECODE `plan`
        by evicting cached prefixes only (never a running sequence). Accepted: the plan carries
        the draft plan. Either way the evictions' ops join the plan's KV ops."""
        ok = self.room.make_room(drafts.cells)
        plan.kv_ops += self.room.take_ops()
        if ok:
            plan.draft = drafts
        return ok
