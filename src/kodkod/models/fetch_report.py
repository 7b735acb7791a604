"""How `kodkod models fetch` shows its progress: a bar per file on a terminal, plain lines
otherwise (a log, CI, a pipe).

`reporter_for(stream)` picks one. Both get the same calls from `models/fetch.py`: a message, a
package being downloaded, a file started (its size in bytes once its parts are downloaded),
bytes of it written, and the file finished. The terminal reporter draws a tqdm bar per file
(tqdm comes with the `gguf` package the server needs anyway).
"""

from __future__ import annotations

import os
from typing import Protocol, TextIO

from tqdm import tqdm

DEFAULT_SIZE = os.terminal_size((80, 24))  # for a terminal that reports no size (a fresh pty)
PLAIN_STEPS = 4  # the plain reporter prints a line at every quarter of a file


class FetchReporter(Protocol):
    def say(self, text: str) -> None: ...

    def downloading(self, package: str) -> None: ...

    def file_started(self, name: str, total_bytes: int) -> None: ...

    def file_advanced(self, num_bytes: int) -> None: ...

    def file_done(self, name: str) -> None: ...


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB"


class PlainReporter:
    """Whole lines only: a file's start, each quarter of it, and its end."""

    def __init__(self, stream: TextIO) -> None:
        self._out = stream
        self._name = ""
        self._total = 0
        self._done = 0
        self._step = 0

    def _line(self, text: str) -> None:
        self._out.write(text + "\n")
        self._out.flush()

    def say(self, text: str) -> None:
        self._line(text)

    def downloading(self, package: str) -> None:
        self._line(f"  downloading {package}")

    def file_started(self, name: str, total_bytes: int) -> None:
        self._name, self._total, self._done, self._step = name, total_bytes, 0, 0
        self._line(f"  {name}: writing {_mb(total_bytes)}")

    def file_advanced(self, num_bytes: int) -> None:
        self._done += num_bytes
        if self._total <= 0:
            return
        reached = self._done * PLAIN_STEPS // self._total  # quarters written so far
        while self._step + 1 < PLAIN_STEPS and self._step + 1 <= reached:  # 100% is file_done's
            self._step += 1
            self._line(f"  {self._name}: {100 * self._step // PLAIN_STEPS}%")

    def file_done(self, name: str) -> None:
        self._line(f"  {name}: 100% ({_mb(self._done)})")


class BarReporter:
    """A tqdm bar per file, redrawn in place on the terminal."""

    def __init__(self, stream: TextIO) -> None:
        self._out = stream
        self._bar: tqdm | None = None

    def say(self, text: str) -> None:
        tqdm.write(text, file=self._out)

    def downloading(self, package: str) -> None:
        tqdm.write(f"  downloading {package}", file=self._out)

    def file_started(self, name: str, total_bytes: int) -> None:
        size = _terminal_size(self._out)
        self._bar = tqdm(
            total=total_bytes,
            desc=f"  {name}",
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=self._out,
            leave=True,
            ncols=size.columns,
            nrows=size.lines,  # tqdm hides bars below a screen height of 0
        )

    def file_advanced(self, num_bytes: int) -> None:
        if self._bar is not None:
            self._bar.update(num_bytes)

    def file_done(self, name: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _terminal_size(stream: TextIO) -> os.terminal_size:
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError):
        return DEFAULT_SIZE
    return os.terminal_size((size.columns or DEFAULT_SIZE.columns, size.lines or DEFAULT_SIZE.lines))


def reporter_for(stream: TextIO) -> FetchReporter:
    """Bars on a terminal, plain lines otherwise."""
    isatty = getattr(stream, "isatty", None)
    return BarReporter(stream) if isatty is not None and isatty() else PlainReporter(stream)
