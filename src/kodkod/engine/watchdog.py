"""The engine watchdog: a thread that notices an engine which died or is stuck in one step.

It reads `EngineLoop.problem()` every `poll_s` seconds (the engine pays one timestamp write per
step for it, nothing more) and reports each new problem once through `report` (the server's
health record: /health answers 503 with the description). Faults the engine thread declares
itself are reported by it; the watchdog covers what the thread cannot report: a step that never
returns and a thread that ends without saying why. New requests are refused by
`EngineClient.check`, which asks `problem()` directly, so they never wait for a poll.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kodkod.engine.faults import EngineFault
from kodkod.engine.loop import EngineLoop

log = logging.getLogger(__name__)

MAX_POLL_S = 1.0


class Watchdog:
    def __init__(
        self,
        engine: EngineLoop,
        report: Callable[[BaseException], None] | None,
        poll_s: float | None = None,
    ) -> None:
        self._engine = engine
        self._report = report
        self._poll_s = poll_s if poll_s is not None else min(MAX_POLL_S, engine.config.stall_timeout_s / 4)
        self._stop = threading.Event()
        self._reported: str | None = None
        self._thread = threading.Thread(target=self._run, name="kodkod-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> None:
        """Look once (the thread does this every poll)."""
        engine = self._engine
        problem = engine.problem()
        if problem is None or problem == engine.health.fatal:
            self._reported = None  # healthy, or the engine thread reported it itself
            return
        if problem == self._reported:
            return
        self._reported = problem
        log.error("engine watchdog: %s", problem)
        if self._report is not None:
            try:
                self._report(EngineFault(problem))
            except Exception:
                log.exception("reporting an engine fault failed")

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            alive = self._engine.alive
            self.check()
            if not alive:
                return
