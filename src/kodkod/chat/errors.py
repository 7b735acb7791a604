"""Errors raised by the chat-template layer.

`TemplateError` carries a message fit for a 400 response (callers prefix it with
``TemplateError: ``); `TemplateFileError` is the "no such template file" case of it.
"""

from __future__ import annotations


class TemplateError(Exception):
    """A chat template could not be compiled, evaluated or rendered."""


class TemplateFileError(TemplateError):
    """A named template file is missing, unreadable or its name is not allowed."""
