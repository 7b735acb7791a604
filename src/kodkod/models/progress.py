"""Load progress: llama.cpp's progress fractions → TabbyAPI's load progress events and a console bar.

llama.cpp reports the fraction of the weights read so far. Each component (`draft`, then
`model`) is reported as `modules` = 100 steps (percent): one `processing` event for every step
from 1 to the current one — steps are never skipped, even when llama.cpp jumps ahead (an mmap
load reports most of a file at once) — and when the component is completely ready (context
created, engine started) the last step once more as `finished`. So every component's events
are 1..100 `processing` then 100 `finished`, in order.

A note about the load (a GPU field ignored on this CPU build, an unknown key, …) is logged as a
warning and sent as an event with an optional `message` field (`note()`): `status`
"processing" and `module` = the steps the component has reached so far (0 before it starts),
so the step sequence above is unchanged and a client that does not know `message` sees one
more "processing" event and ignores it. The field is only present on such events.

The console gets a `\\r` progress bar when stderr is a terminal, else one log line per 10 %.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

log = logging.getLogger(__name__)

MODULES = 100
_BAR_WIDTH = 30


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    model_type: str  # "draft" | "model"
    module: int
    modules: int
    status: str  # "processing" | "finished"
    message: str | None = None  # a note about the load (kodkod extension)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_type": self.model_type,
            "module": self.module,
            "modules": self.modules,
            "status": self.status,
        }
        if self.message is not None:
            out["message"] = self.message
        return out


class ConsoleProgress:
    """The server console's view of a load (a bar on a TTY, else a line per 10 %)."""

    def __init__(self, name: str, stream: TextIO | None = None) -> None:
        self._name = name
        self._stream = stream if stream is not None else sys.stderr
        try:
            self._tty = self._stream.isatty()
        except (AttributeError, ValueError):
            self._tty = False
        self._last_decile: dict[str, int] = {}

    def update(self, model_type: str, module: int, modules: int) -> None:
        if self._tty:
            filled = _BAR_WIDTH * module // modules
            bar = "#" * filled + "." * (_BAR_WIDTH - filled)
            percent = 100 * module // modules
            self._stream.write(f"\rloading {self._name} ({model_type}) [{bar}] {percent:3d}%")
            self._stream.flush()
            return
        decile = 10 * module // modules
        if decile > self._last_decile.get(model_type, 0):
            self._last_decile[model_type] = decile
            log.info("loading %s (%s): %d%%", self._name, model_type, decile * 10)

    def done(self, model_type: str) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


class LoadProgress:
    """One load's progress. `callback(kind)` is called from the loader thread; `finish(kind)`
    from anywhere. `emit` receives the events (e.g. to put them on an SSE queue)."""

    def __init__(
        self,
        name: str,
        emit: Callable[[ProgressEvent], None] | None = None,
        console: ConsoleProgress | None = None,
        modules: int = MODULES,
    ) -> None:
        self._name = name
        self._emit = emit
        self._console = console if console is not None else ConsoleProgress(name)
        self._modules = modules
        self._reached: dict[str, int] = {}
        self._lock = threading.Lock()

    def _advance(self, model_type: str, module: int) -> None:
        with self._lock:
            last = self._reached.get(model_type, 0)
            if module <= last:
                return
            self._reached[model_type] = module
            for m in range(last + 1, module + 1):
                if self._emit is not None:
                    self._emit(ProgressEvent(model_type, m, self._modules, "processing"))
            self._console.update(model_type, module, self._modules)

    def note(self, message: str, model_type: str = "model") -> None:
        """Log `message` and send it as a progress event (see the module docstring)."""
        log.warning("loading %s: %s", self._name, message)
        with self._lock:
            reached = self._reached.get(model_type, 0)
        if self._emit is not None:
            self._emit(ProgressEvent(model_type, reached, self._modules, "processing", message))

    def callback(self, model_type: str) -> Callable[[float], None]:
        """A fraction callback for one component (0.0 .. 1.0)."""

        def on_fraction(fraction: float) -> None:
            module = max(1, min(self._modules, int(fraction * self._modules + 1e-9)))
            self._advance(model_type, module)

        return on_fraction

    def finish(self, model_type: str) -> None:
        """The component is ready: the remaining steps, then the last one as finished."""
        self._advance(model_type, self._modules)
        if self._emit is not None:
            self._emit(ProgressEvent(model_type, self._modules, self._modules, "finished"))
        self._console.done(model_type)
