"""`ConfigError`: the one exception the configuration system raises for bad user input."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem; `str()` is one line naming the source, line and dotted key."""

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\r", " ").replace("\n", " "))
