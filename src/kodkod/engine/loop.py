"""The engine loop: one thread that owns the backend and runs steps.

    step(): admit → plan (scheduler) → replay KV ops → decode → sample → emit

Everything else talks to it through a thread-safe command queue (submit, abort, exclusive
work, shutdown). When there is nothing to do the thread blocks on that queue. `llama_decode`
releases the GIL, so the HTTP event loop keeps serving while a step computes.

Lifetime rules: every sequence ends with exactly one FinishEvent or ErrorEvent; every sampler
is closed when its sequence ends; a failing step fails only the sequences in it... and since the
KV state may then be unknown, the cache is cleared and the others recompute (preemption). On
shutdown every pending request gets an ErrorEvent.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from kodkod.backends.base import Backend, BatchRow
from kodkod.engine.banned import BannedStringGuard, LoopDetector
from kodkod.engine.detokenizer import IncrementalDetokenizer
from kodkod.engine.healing import HealingMask, healing_candidates
from kodkod.engine.output import Finish, Rewind, emit, next_token
from kodkod.engine.scheduler import CopyPrefix, Scheduler, SchedulerConfig, StepPlan, Truncate
from kodkod.engine.sequence import EventSink, Sequence
from kodkod.engine.stopping import StopStringMatcher
from kodkod.engine.types import (
    EosReason,
    ErrorEvent,
    ErrorKind,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    Usage,
)

log = logging.getLogger(__name__)

MAX_REWINDS = 1000
PUBLISH_EVERY_S = 0.02  # banned-string rewinds per sequence before giving up


class _NullSink:
    def push(self, event: object) -> None:
        pass


_NULL_SINK = _NullSink()


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_seq_len: int
    max_batch_size: int
    chunk_size: int


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot published after every step (read from any thread without locks)."""

    running: int = 0
    waiting: int = 0
    cached_tokens: int = 0
    free_cells: int = 0
    kv_capacity: int = 0
    num_slots: int = 0
    active_slots: int = 0
    steps: int = 0
    decode_steps: int = 0
    prefill_steps: int = 0
    preemptions: int = 0
    generated_tokens: int = 0
    prompt_tokens_computed: int = 0
    decode_time_s: float = 0.0  # inside backend.decode()
    step_time_s: float = 0.0  # whole steps, decode included
    drafted_tokens: int = 0
    accepted_draft_tokens: int = 0


@dataclass(slots=True)
class _Submit:
    request: GenerationRequest
    sink: EventSink


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _Exclusive:
    fn: Callable[[Backend], Any]
    cancel_running: bool
    future: Future


@dataclass(slots=True)
class _Shutdown:
    message: str
    future: Future = field(default_factory=Future)


_Command = _Submit | _Abort | _Exclusive | _Shutdown


class EngineLoop:
    def __init__(
        self,
        backend: Backend,
        config: EngineConfig,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.backend = backend
        self.config = config
        self.stats = EngineStats(kv_capacity=backend.kv_capacity, num_slots=backend.num_slots)
        self._on_fatal = on_fatal
        self._sched = Scheduler(
            SchedulerConfig(config.max_batch_size, config.chunk_size),
            backend.kv_capacity,
            backend.num_slots,
        )
        self._seqs: dict[str, Sequence] = {}
        self._healing_cache: dict[bytes, list[int]] = {}
        self._published_at = 0.0
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._exclusive: list[_Exclusive] = []
        self._stopping: _Shutdown | None = None
        self._counters = dict.fromkeys(
            ("steps", "decode_steps", "prefill_steps", "generated", "prompt_computed"), 0
        )
        self._decode_s = 0.0
        self._step_s = 0.0
        self._thread = threading.Thread(target=self._run, name="kodkod-engine", daemon=True)
        self._closed_lock = threading.Lock()
        self._closed_message: str | None = None  # set once the thread stops taking commands

    # -- public (any thread) ----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        with self._closed_lock:
            if self._closed_message is None:
                self._commands.put(_Submit(request, sink))
                return
        sink.push(ErrorEvent(self._closed_message, ErrorKind.UNLOADED))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def run_exclusive(self, fn: Callable[[Backend], Any], *, cancel_running: bool) -> Future:
        """Run fn(backend) on the engine thread once no sequence is running."""
        fut: Future = Future()
        with self._closed_lock:
            if self._closed_message is None:
                self._commands.put(_Exclusive(fn, cancel_running, fut))
                return fut
        fut.set_exception(RuntimeError(self._closed_message))
        return fut

    def shutdown(self, message: str) -> Future:
        cmd = _Shutdown(message)
        with self._closed_lock:
            if self._closed_message is None:
                self._commands.put(cmd)
                return cmd.future
        cmd.future.set_result(None)
        return cmd.future

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._stopping is None:
                self._drain(block=not self._sched.has_work and not self._exclusive)
                if self._stopping is not None:
                    break
                self._run_exclusive_if_ready()
                if self._sched.has_work:
                    self._safe_step()
        finally:
            self._close_all()

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                self._publish()
                return

    def _handle(self, cmd: _Command) -> None:
        if isinstance(cmd, _Submit):
            self._add(cmd.request, cmd.sink)
        elif isinstance(cmd, _Abort):
            seq = self._seqs.get(cmd.request_id)
            if seq is not None:
                self._finish(seq, Finish(FinishReason.ABORT, EosReason.ABORTED))
        elif isinstance(cmd, _Exclusive):
            self._exclusive.append(cmd)
            self._sched.paused = True
            if cmd.cancel_running:
                for seq in list(self._sched.running):
                    if not seq.is_shadow:
                        self._fail(seq, "cancelled by an administrative operation", ErrorKind.UNLOADED)
        else:
            self._stopping = cmd

    def _add(self, req: GenerationRequest, sink: EventSink) -> None:
        if req.request_id in self._seqs:
            sink.push(ErrorEvent(f"duplicate request id {req.request_id}", ErrorKind.BAD_REQUEST))
            return
        if req.max_tokens == 0:
            sink.push(FinishEvent(FinishReason.LENGTH, EosReason.MAX_NEW_TOKENS,
                                  Usage(len(req.prompt_ids), 0)))
            return
        try:
            seq = self._new_sequence(req, sink)
        except Exception as exc:  # bad sampler parameters and the like
            log.warning("request %s refused: %s", req.request_id, exc)
            sink.push(ErrorEvent(f"invalid generation settings: {exc}", ErrorKind.BAD_REQUEST))
            return
        self._seqs[req.request_id] = seq
        self._sched.add(seq)

    def _new_sequence(self, req: GenerationRequest, sink: EventSink) -> Sequence:
        backend = self.backend
        prompt = list(req.prompt_ids)
        strip = ""
        if req.token_healing and len(prompt) > 1:
            piece = backend.token_bytes(prompt[-1], special=False)
            allowed = healing_candidates(backend, piece, self._healing_cache)
            if piece and len(allowed) > 1:
                prompt.pop()
                strip = piece.decode("utf-8", errors="replace")
                req.processors = [HealingMask(allowed), *req.processors]
        limit = self.config.max_seq_len
        if req.max_tokens is not None:
            limit = min(limit, len(prompt) + req.max_tokens + (1 if strip else 0))
        stop_ids = frozenset(set(req.stop_token_ids) | backend.info.eos_ids)
        special = not req.skip_special_tokens

        def piece_of(t: int, _b: Backend = backend, _s: bool = special) -> bytes:
            return _b.token_bytes(t, special=_s)

        seq = Sequence(
            request=req, sink=sink, tokens=prompt, num_prompt=len(prompt),
            detok=IncrementalDetokenizer(piece_of), stops=StopStringMatcher(req.stop_strings),
            stop_ids=stop_ids, eos_ids=backend.info.eos_ids, max_len=limit,
            # like upstream, banned strings give way to a grammar (both would fight over tokens)
            guard=(BannedStringGuard(req.banned_strings)
                   if req.banned_strings and req.constraint is None else None),
            loops=LoopDetector(req.loop_detect_window) if req.loop_detect_window > 1 else None,
            strip_prefix=strip,
        )
        seq.sampler = backend.new_sampler(req.sampling, prompt)
        if req.cfg_scale != 1.0:
            neg = list(req.negative_prompt_ids or [])
            if not neg and req.negative_prompt:
                neg = backend.tokenize(req.negative_prompt, add_bos=True, parse_special=True)
            if not neg:
                neg = [backend.info.bos_id] if backend.info.bos_id is not None else prompt[:1]
            shadow = Sequence(
                request=req, sink=_NULL_SINK, tokens=neg, num_prompt=len(neg),
                detok=IncrementalDetokenizer(piece_of), stops=StopStringMatcher([]),
                stop_ids=stop_ids, eos_ids=backend.info.eos_ids, max_len=self.config.max_seq_len,
                is_shadow=True,
            )
            seq.partner, shadow.partner = shadow, seq
        return seq

    def _run_exclusive_if_ready(self) -> None:
        if not self._exclusive or self._sched.running:
            return
        self._apply_kv_ops(self._sched.drain_ops())
        while self._exclusive:
            cmd = self._exclusive.pop(0)
            try:
                cmd.future.set_result(cmd.fn(self.backend))
            except BaseException as exc:  # handed to the caller
                cmd.future.set_exception(exc)
        self._sched.paused = False

    def _apply_kv_ops(self, ops: list) -> None:
        backend = self.backend
        for op in ops:
            if isinstance(op, CopyPrefix):
                backend.kv_copy(op.src, op.dst, 0, op.length)
            elif isinstance(op, Truncate):
                backend.kv_remove(op.slot, op.length, -1)

    def _safe_step(self) -> None:
        try:
            self._step()
        except Exception as exc:
            log.exception("engine step failed")
            if self._on_fatal is not None:
                self._on_fatal(exc)
            for seq in list(self._sched.running):
                if not seq.is_shadow:
                    self._fail(seq, f"generation failed: {exc}", ErrorKind.INTERNAL)
            self._reset_cache()

    def _reset_cache(self) -> None:
        """After a failure the KV state is unknown: start from an empty cache."""
        self._sched.clear_cache()
        self._sched.drain_ops()
        self.backend.kv_clear()

    def _step(self) -> None:
        t0 = time.perf_counter()
        sched = self._sched
        plan = sched.schedule()
        self._apply_kv_ops(plan.kv_ops if plan is not None else sched.drain_ops())
        if plan is None:
            self._publish()
            time.sleep(0.001)  # nothing plannable right now (e.g. waiting for room)
            return
        rows = [
            BatchRow(e.seq.slot, e.seq.tokens[e.start : e.start + e.num_tokens], e.start, e.num_logits)
            for e in plan.entries
        ]
        t1 = time.perf_counter()
        indices = self.backend.decode(rows)
        t2 = time.perf_counter()
        sched.commit(plan)
        self._process(plan, indices)
        c = self._counters
        c["steps"] += 1
        if plan.kind.value == "decode":
            c["decode_steps"] += 1
        else:
            c["prefill_steps"] += 1
            c["prompt_computed"] += plan.num_tokens
        self._decode_s += t2 - t1
        self._step_s += time.perf_counter() - t0
        self._publish(force=not sched.has_work)

    def _process(self, plan: StepPlan, indices: list[list[int]]) -> None:
        backend = self.backend
        now = time.perf_counter()
        generated = 0
        cfg_rows: dict[int, int] | None = None
        if any(e.seq.partner is not None for e in plan.entries):
            cfg_rows = {id(e.seq): i[-1] for e, i in zip(plan.entries, indices) if i}
        for entry, idx in zip(plan.entries, indices):
            seq = entry.seq
            if not idx or seq.is_shadow or seq.request_id not in self._seqs:
                continue
            cfg_index = None
            if seq.partner is not None:
                assert cfg_rows is not None
                cfg_index = cfg_rows.get(id(seq.partner))
                if cfg_index is None:  # the partner is not caught up: sample next step
                    continue
            if seq.first_token_s == 0.0:
                seq.first_token_s = now
            token, info = next_token(seq, backend, idx[-1], cfg_index)
            generated += 1
            outcome = emit(seq, backend, token, info)
            if isinstance(outcome, Rewind):
                self._rewind(seq, outcome.output_index)
            elif outcome is not None:
                self._finish(seq, outcome)
            elif seq.partner is not None:
                seq.partner.tokens.append(token)
        self._counters["generated"] += generated

    def _rewind(self, seq: Sequence, keep: int) -> None:
        """A banned string began at output token `keep`: drop it and everything after, ban it
        there, and let the next step sample that position again."""
        seq.rewinds += 1
        if seq.rewinds > MAX_REWINDS:
            self._fail(seq, f"could not avoid the banned strings after {MAX_REWINDS} attempts",
                       ErrorKind.BAD_REQUEST)
            return
        banned_token = seq.tokens[seq.num_prompt + keep]
        seq.bans.setdefault(keep, set()).add(banned_token)
        new_len = seq.num_prompt + keep
        del seq.tokens[new_len:]
        self._sched.rollback(seq, new_len - 1)
        special = not seq.request.skip_special_tokens
        backend = self.backend
        seq.detok = IncrementalDetokenizer(lambda t, _b=backend, _s=special: _b.token_bytes(t, special=_s))
        if seq.loops is not None:
            seq.loops.reset(seq.output_ids)
        if seq.sampler is not None:
            seq.sampler.close()
        seq.sampler = backend.new_sampler(seq.request.sampling, seq.tokens, seq.num_prompt)
        req = seq.request
        for obj in (req.constraint, *req.processors):
            rollback = getattr(obj, "rollback_to", None)
            if rollback is not None:
                rollback(seq.output_ids)
        shadow = seq.partner
        if shadow is not None:
            del shadow.tokens[shadow.num_prompt + keep:]
            self._sched.rollback(shadow, len(shadow.tokens) - 1)

    # -- endings ----------------------------------------------------------------------------

    def _usage(self, seq: Sequence) -> Usage:
        now = time.perf_counter()
        first = seq.first_token_s or now
        return Usage(
            prompt_tokens=seq.num_prompt,
            completion_tokens=seq.num_output,
            cached_tokens=seq.num_cached,
            prompt_time_s=max(0.0, first - seq.arrival_s),
            completion_time_s=max(0.0, now - first),
            drafted_tokens=seq.drafted,
            accepted_draft_tokens=seq.accepted,
        )

    def _finish(self, seq: Sequence, finish: Finish) -> None:
        self._sched.remove(seq)
        if seq.partner is not None:
            self._sched.remove(seq.partner)
        self._seqs.pop(seq.request_id, None)
        seq.sink.push(FinishEvent(finish.reason, finish.eos_reason, self._usage(seq), finish.stop_str))
        seq.close()

    def _fail(self, seq: Sequence, message: str, kind: ErrorKind) -> None:
        self._sched.remove(seq)
        if seq.partner is not None:
            self._sched.remove(seq.partner)
        self._seqs.pop(seq.request_id, None)
        seq.sink.push(ErrorEvent(message, kind))
        seq.close()

    def _close_all(self) -> None:
        message = self._stopping.message if self._stopping else "the engine stopped"
        for seq in list(self._seqs.values()):
            self._fail(seq, message, ErrorKind.UNLOADED)
        for cmd in self._exclusive:
            cmd.future.set_exception(RuntimeError(message))
        self._exclusive.clear()
        with self._closed_lock:
            self._closed_message = message  # from now on submit() answers by itself
        while True:  # commands that arrived before that: answer them too
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Submit):
                cmd.sink.push(ErrorEvent(message, ErrorKind.UNLOADED))
            elif isinstance(cmd, _Exclusive):
                cmd.future.set_exception(RuntimeError(message))
        self._publish()
        if self._stopping is not None:
            self._stopping.future.set_result(None)

    def _publish(self, force: bool = True) -> None:
        """Publish a stats snapshot; during steps at most every PUBLISH_EVERY_S (cheap hot loop)."""
        now = time.perf_counter()
        if not force and now - self._published_at < PUBLISH_EVERY_S:
            return
        self._published_at = now
        sched, c = self._sched, self._counters
        self.stats = EngineStats(
            running=len(sched.running),
            waiting=len(sched.waiting),
            cached_tokens=sched.slots.num_cached_tokens,
            free_cells=sched.pool.free_cells,
            kv_capacity=self.backend.kv_capacity,
            num_slots=self.backend.num_slots,
            active_slots=len(sched.running),
            steps=c["steps"],
            decode_steps=c["decode_steps"],
            prefill_steps=c["prefill_steps"],
            preemptions=sched.num_preemptions,
            generated_tokens=c["generated"],
            prompt_tokens_computed=c["prompt_computed"],
            decode_time_s=self._decode_s,
            step_time_s=self._step_s,
        )
