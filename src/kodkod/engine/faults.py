"""Decode failures: find the rows responsible, so only their sequences fail.

A batched `decode` that fails may have written KV for part of the batch (llama.cpp removes only
the failing ubatch's positions). `find_culprits()` restores a consistent cache and asks each row
on its own:

 1. every row's positions from its `start_pos` on are removed, so each slot again holds exactly
    the tokens the scheduler committed for it;
 2. each row is decoded alone, then its positions are removed again; a row that fails alone is a
    suspect;
 3. when every row failed alone, one known-valid token is decoded in the first suspect's place (a
    probe). If even that fails, the backend itself is broken: `EngineFault`. Otherwise the
    suspects are the culprits (their tokens, not the backend, are the problem).

A backend that lost its process (`BackendLostError`: an RPC-backed model's engine child ended)
has nothing left to ask, so that error is an `EngineFault` at once, wherever it surfaces.

`isolate_failure()` fails the culprits' sequences and decodes the remaining rows again as one
batch; the prefix cache is kept. `EngineFault` is the one failure the engine does not recover
from: it ends every request and the server reports itself unhealthy. `EngineHealth` holds what
`EngineLoop.problem()` and the watchdog read (fatal reason, failed steps, step start time).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Rows
from dataclasses import dataclass

from kodkod.core.backend_types import BackendLostError, BatchRow
from kodkod.engine.backend import Backend
from kodkod.engine.group import main_of
from kodkod.engine.plan import StepPlan
from kodkod.engine.sequence import SeqStatus, Sequence

log = logging.getLogger(__name__)

PROBE_TOKEN = 0  # any id inside the vocabulary works; 0 always is
MAX_FAILED_STEPS = 3  # steps failing in a row (none succeeding between) that are fatal


class EngineFault(Exception):
    """The engine cannot go on (the backend is unusable, or the engine thread died)."""


def _clear_rows(backend: Backend, rows: Rows[BatchRow]) -> None:
    """Drop whatever a failed decode of `rows` may have left in their slots."""
    for row in rows:
        backend.kv_remove(row.slot, row.start_pos, -1)


def _decodes_alone(backend: Backend, row: BatchRow) -> bool:
    try:
        backend.decode([row])
    except Exception as exc:
        log.warning(
            "decode of slot %d alone (%d tokens at %d) failed: %s",
            row.slot,
            len(row.tokens),
            row.start_pos,
            exc,
        )
        return False
    finally:
        _clear_rows(backend, [row])
    return True


def find_culprits(backend: Backend, rows: Rows[BatchRow], error: BaseException) -> list[int]:
    """Indices of the rows whose decode fails on its own; raises EngineFault when the backend
    cannot decode even a probe. On return every row's slot is back at its `start_pos`."""
    try:
        _clear_rows(backend, rows)
    except Exception as exc:
        raise EngineFault(
            f"the KV cache could not be repaired after a failed decode ({error}): {exc}"
        ) from exc
    suspects = [i for i, row in enumerate(rows) if not _decodes_alone(backend, row)]
    if len(suspects) < len(rows):
        return suspects
    first = rows[suspects[0]]
    if not _decodes_alone(backend, BatchRow(first.slot, [PROBE_TOKEN], first.start_pos, 0)):
        raise EngineFault(
            f"the model cannot decode any more (llama_decode fails even for one valid token): {error}"
        )
    return suspects


def isolate_failure(
    backend: Backend,
    plan: StepPlan,
    rows: list[BatchRow],
    error: Exception,
    fail: Callable[[Sequence, str], None],
    sync: Callable[[], None],
) -> tuple[StepPlan, list[list[int]]]:
    """A batched decode failed: `fail(seq, message)` each culprit's sequence (the main one of a
    CFG pair), `sync()` (replays the KV ops those removals caused), decode the remaining rows
    again as one batch and return the remaining plan with that decode's indices (EngineFault
    if it fails again)."""
    if isinstance(error, BackendLostError):  # no process left to ask about the rows
        raise EngineFault(str(error)) from error
    log.warning("a decode of %d rows failed (%s); looking for the rows responsible", len(rows), error)
    for i in find_culprits(backend, rows, error):
        seq = plan.entries[i].seq
        main = main_of(seq)
        if main.status is not SeqStatus.FINISHED:
            fail(
                main,
                f"the model could not evaluate this request's tokens ({error}); other "
                "requests were not affected",
            )
    keep = [i for i, e in enumerate(plan.entries) if e.seq.status is SeqStatus.RUNNING]
    sync()
    plan = StepPlan(plan.kind, [plan.entries[i] for i in keep])
    if not keep:
        return plan, []
    try:
        return plan, backend.decode([rows[i] for i in keep])
    except Exception as again:
        raise EngineFault(f"a batch failed again without the rows that failed: {again}") from again


@dataclass(slots=True)
class EngineHealth:
    """What another thread needs to tell whether an engine can serve: a fatal reason, steps
    failed in a row, and when the running step began (0.0: none; one write per step)."""

    stall_timeout_s: float
    fatal: str | None = None
    failed_steps: int = 0
    step_started_s: float = 0.0

    def problem(self, thread: threading.Thread, stopped: bool) -> str | None:
        """Why the engine cannot serve right now (None: it can); `stopped`: shut down on purpose."""
        if self.fatal is not None:
            return self.fatal
        if not thread.is_alive():
            started = thread.ident is not None
            return "the engine thread stopped unexpectedly" if started and not stopped else None
        began = self.step_started_s
        if began and time.monotonic() - began > self.stall_timeout_s:
            return (
                f"the engine has been stuck in one step for more than {self.stall_timeout_s:g} s "
                "(limits.engine_stall_timeout_s)"
            )
        return None

    def declare(self, fault: EngineFault, report: Callable[[BaseException], None] | None) -> None:
        """The engine cannot go on: remember why (the loop then stops) and report it."""
        log.error("engine fault: %s", fault)
        self.fatal = str(fault)
        if report is not None:
            try:
                report(fault)
            except Exception:  # never let the report stop the shutdown
                log.exception("reporting an engine fault failed")

    def step_failed(self, error: Exception, report: Callable[[BaseException], None] | None) -> None:
        """Count a failed step; too many in a row are fatal."""
        self.failed_steps += 1
        if self.failed_steps >= MAX_FAILED_STEPS:
            self.declare(
                EngineFault(f"{self.failed_steps} engine steps failed in a row, the last with: {error}"),
                report,
            )
