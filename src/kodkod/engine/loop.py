"""The engine loop: one thread that owns the backend and runs steps.

    step(): plan (scheduler, speculation's draft plan) → run (model runner: KV ops, drafts,
            decode) → process (output processor: sample, verify, emit) → end what finished

The parts are `engine/scheduler.py`, `speculative/speculator.py`, `engine/runner.py` and
`engine/processor.py`; the loop itself handles commands, endings, health and stats.

Everything else talks to it through a thread-safe command queue (submit, abort, exclusive
work, shutdown). When there is nothing to do the thread blocks on that queue. `llama_decode`
releases the GIL, so the HTTP event loop keeps serving while a step computes.

Lifetime rules: every sequence ends with exactly one FinishEvent or ErrorEvent; every sampler
is closed when its sequence ends. A failed batched decode fails only the sequences whose rows
fail alone (`engine/faults.py`); the rest decode again, the prefix cache is kept. Any other step
failure fails the running sequences and clears the cache. What cannot recover (no decode works,
the thread dies, steps keep failing) is fatal: every request ends, the thread stops and
`problem()` says why. On shutdown every pending request gets an ErrorEvent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from kodkod.core.backend_types import BackendLostError
from kodkod.core.types import EosReason, ErrorEvent, ErrorKind, FinishEvent, FinishReason, GenerationRequest
from kodkod.engine.adapters import refresh_waiting
from kodkod.engine.backend import Backend
from kodkod.engine.build import accept_request
from kodkod.engine.commands import Abort, Command, Exclusive, Mailbox, Shutdown, Submit
from kodkod.engine.compaction import compact_if_due
from kodkod.engine.config import EngineConfig, build_parts
from kodkod.engine.detokenizer import TokenTexts
from kodkod.engine.faults import EngineFault, EngineHealth
from kodkod.engine.group import mains, members
from kodkod.engine.output import Finish
from kodkod.engine.scheduler import StepKind
from kodkod.engine.sequence import EventSink, Sequence
from kodkod.engine.slots import SlotsProbe
from kodkod.engine.stats import EngineStats, StepCounters, snapshot, step_line
from kodkod.engine.stream import LoopWaker

log = logging.getLogger(__name__)
# DEBUG: one line per step (kind, rows, tokens, decode and step wall, engine-thread CPU), for
# finding where step time goes (benchmarks/chat_sessions.py --step-log); off, one check a step
steplog = logging.getLogger("kodkod.engine.steps")

# Least time between stats snapshots while steps run (every state change publishes when the
# engine goes idle). Each snapshot walks the slot table, and it runs right after a decode, when
# little of it is still in the CPU's caches: at the usual step times a shorter interval would
# publish at every step.
PUBLISH_EVERY_S = 0.1


class EngineLoop:
    def __init__(
        self,
        backend: Backend,
        config: EngineConfig,
        on_fatal: Callable[[BaseException], None] | None = None,
        draft: Backend | None = None,
    ) -> None:
        """`draft`: the draft model's backend (same slots and cells), used when
        `config.speculative.mode` is "model"; the caller owns and frees it."""
        self.backend = backend
        self.config = config
        self.stats = EngineStats(
            kv_capacity=backend.kv_capacity, free_cells=backend.kv_capacity, num_slots=backend.num_slots
        )
        self._on_fatal = on_fatal
        parts = build_parts(backend, config, draft, lambda s, m: self._fail(s, m, ErrorKind.BAD_REQUEST))
        self._sched, self._spec = parts.sched, parts.spec
        self._runner, self._processor = parts.runner, parts.processor
        self._seqs: dict[str, Sequence] = {}
        self._healing: dict[bytes, list[int]] = {}  # token healing candidates by piece
        self._texts = TokenTexts()  # token texts, shared by every sequence's detokenizer
        self._published_at = 0.0
        self._mail = Mailbox()
        self._exclusive: list[Exclusive] = []
        self._stopping: Shutdown | None = None
        self._counters = StepCounters()
        self._thread = threading.Thread(target=self._run, name="kodkod-engine", daemon=True)
        self.health = EngineHealth(config.stall_timeout_s)  # read by the watchdog
        self._inflight: Command | None = None  # the command being handled (answered if we die)
        self._wakers: tuple[LoopWaker, ...] = ()  # consumers' loops, woken once per step

    # -- public (any thread) ----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        self._mail.put(Submit(request, sink))

    def abort(self, request_id: str) -> None:
        self._mail.put(Abort(request_id))

    def run_exclusive(self, fn: Callable[[Backend], Any], *, cancel_running: bool) -> Future:
        """Run fn(backend) on the engine thread once no sequence is running."""
        fut: Future = Future()
        self._mail.put(Exclusive(fn, cancel_running, fut))
        return fut

    def add_waker(self, waker: LoopWaker) -> None:
        """Wake `waker`'s loop once per step (after the step's events), not once per event."""
        self._wakers = (*(w for w in self._wakers if not w.loop.is_closed()), waker)

    def shutdown(self, message: str) -> Future:
        cmd = Shutdown(message)
        self._mail.put(cmd)
        return cmd.future

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def slots_probe(self) -> SlotsProbe:
        """Ask it for a `/slots` view; the engine thread answers at its next publish."""
        return self._counters.probe

    def problem(self) -> str | None:
        """Why this engine cannot serve requests right now (None: it can). Any thread."""
        return self.health.problem(self._thread, self._stopping is not None)

    # -- engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._stopping is None and self.health.fatal is None:
                idle = not self._sched.has_work and not self._exclusive
                if idle and compact_if_due(self.backend, self._sched, self._runner.sync, self._reset_cache):
                    self._counters.compactions += 1
                    self._publish()
                self._drain(block=idle)
                if self._stopping is not None:
                    break
                self._run_exclusive_if_ready()
                if self._sched.has_work:
                    self._safe_step()
        except BaseException as exc:  # outside the guarded step: the loop itself is broken
            log.exception("the engine thread failed")
            fault = EngineFault(f"the engine thread failed: {type(exc).__name__}: {exc}")
            fault.__cause__ = exc
            self.health.declare(fault, self._on_fatal)
        finally:
            self._close_all()

    def _drain(self, block: bool) -> None:
        cmd = self._mail.get(0.5 if block else 0)
        if cmd is None:
            return
        while cmd is not None:
            self._inflight = cmd
            self._handle(cmd)
            self._inflight = None
            cmd = self._mail.get(0)
        self._publish()

    def _handle(self, cmd: Command) -> None:
        if isinstance(cmd, Submit):
            req = cmd.request
            seq = accept_request(
                req, cmd.sink, self.backend, self.config.max_seq_len, self._seqs, self._healing, self._texts
            )
            if seq is not None:
                self._seqs[req.request_id] = seq
                self._spec.attach(seq)
                self._sched.add(seq)
        elif isinstance(cmd, Abort):
            seq = self._seqs.get(cmd.request_id)
            if seq is not None:
                self._finish(seq, Finish(FinishReason.ABORT, EosReason.ABORTED))
        elif isinstance(cmd, Exclusive):
            self._exclusive.append(cmd)
            self._sched.paused = True
            if cmd.cancel_running:
                for seq in mains(self._sched.running):
                    self._fail(seq, "cancelled by an administrative operation", ErrorKind.UNLOADED)
        else:
            self._stopping = cmd

    def _run_exclusive_if_ready(self) -> None:
        if not self._exclusive or self._sched.running:
            return
        self._runner.sync()
        while self._exclusive:
            cmd = self._exclusive.pop(0)
            try:
                cmd.future.set_result(cmd.fn(self.backend))
            except BaseException as exc:  # handed to the caller
                cmd.future.set_exception(exc)
        self._sched.paused = False
        self._spec.reset_costs()  # a swapped model or adapter costs what it costs: measure again
        # exclusive work may have swapped LoRA adapters: re-resolve requests not yet admitted
        refresh_waiting(
            self._sched.waiting, self.backend, lambda seq, msg: self._fail(seq, msg, ErrorKind.BAD_REQUEST)
        )

    def _safe_step(self) -> None:
        health = self.health
        health.step_started_s = time.monotonic()  # the watchdog's one cost per step
        wakers = self._wakers
        for w in wakers:
            w.hold()
        try:
            self._step()
            health.failed_steps = 0
        except EngineFault as fault:
            health.declare(fault, self._on_fatal)
        except BackendLostError as lost:  # nothing left to retry or reset
            gone = EngineFault(str(lost))
            gone.__cause__ = lost
            health.declare(gone, self._on_fatal)
        except Exception as exc:
            log.exception("engine step failed")
            for seq in mains(self._sched.running):
                self._fail(seq, f"generation failed: {exc}", ErrorKind.INTERNAL)
            self._reset_cache()
            health.step_failed(exc, self._on_fatal)
        finally:
            health.step_started_s = 0.0
            for w in wakers:
                w.release()

    def _reset_cache(self) -> None:
        """After a failure the KV state is unknown: start from an empty cache."""
        self._sched.room.clear_cache()
        self._sched.flush()  # its ops are moot: the backend's cache is cleared instead
        self.backend.kv_clear()
        self._spec.clear()

    def _step(self) -> None:
        clock = self.config.clock
        t0 = clock()
        trace = steplog.isEnabledFor(logging.DEBUG)
        cpu0 = time.thread_time() if trace else 0.0
        sched, spec = self._sched, self._spec
        plan = sched.schedule()
        if plan is not None and plan.kind is StepKind.DECODE and spec.active > 0:
            drafts = spec.propose(plan, sched.prefill_pending, sched.max_decode_rows)  # speculation
            if drafts is not None:
                sched.accept_drafts(plan, drafts)
        decoded = self._runner.run(plan) if plan is not None else None
        if decoded is None:  # nothing plannable right now (e.g. waiting for room)
            self._publish()
            time.sleep(0.001)
            return
        sched.commit(decoded.plan)
        out = self._processor.process(decoded.plan, decoded.indices)
        for seq, finish in out.finished:
            self._finish(seq, finish)
        for seq, message in out.failed:
            self._fail(seq, message, ErrorKind.BAD_REQUEST)
        step_s = clock() - t0
        if decoded.measured:  # what this step's rows cost, sampling and emitting included
            spec.observe_step(len(decoded.plan.entries), decoded.plan.num_tokens, step_s - decoded.draft_s)
        self._counters.record(decoded, out.generated, step_s)
        if trace:
            steplog.debug("%s", step_line(decoded, step_s, time.thread_time() - cpu0))
        self._publish(force=not sched.has_work)

    # -- endings ----------------------------------------------------------------------------

    def _finish(self, seq: Sequence, finish: Finish) -> None:
        self._end(seq, FinishEvent(finish.reason, finish.eos_reason, seq.usage(), finish.stop_str))

    def _fail(self, seq: Sequence, message: str, kind: ErrorKind) -> None:
        self._end(seq, ErrorEvent(message, kind))

    def _end(self, seq: Sequence, event: FinishEvent | ErrorEvent) -> None:
        """Every sequence ends here, once: out of the scheduler with its group, then its event."""
        self._spec.detach(seq)
        for s in members(seq):
            self._sched.remove(s)
        self._seqs.pop(seq.request_id, None)
        seq.close()  # before the final event: a client that saw its end holds nothing native
        seq.sink.push(event)

    def _close_all(self) -> None:
        message = self._stopping.message if self._stopping else (self.health.fatal or "the engine stopped")
        cmd = self._inflight  # the command the thread died handling: answer it below
        if cmd is not None and not (isinstance(cmd, Submit) and cmd.request.request_id in self._seqs):
            self._mail.put(cmd)
        for seq in list(self._seqs.values()):
            self._fail(seq, message, ErrorKind.UNLOADED)
        for cmd in self._exclusive:
            cmd.future.set_exception(RuntimeError(message))
        self._exclusive.clear()
        self._mail.close(message)  # from now on every command is answered at once
        self._publish()
        if self._stopping is not None:
            self._stopping.future.set_result(None)

    def _publish(self, force: bool = True) -> None:
        """Publish a stats snapshot; during steps at most every PUBLISH_EVERY_S (cheap hot loop)."""
        now = time.perf_counter()
        if not force and now - self._published_at < PUBLISH_EVERY_S:
            return
        self._published_at = now
        self.stats = snapshot(self._sched, self.backend, self._counters, self._spec)
