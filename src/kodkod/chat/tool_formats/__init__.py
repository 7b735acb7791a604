"""Every tool-call format by name, and finding a whole-reply format from the vocabulary.

`tool_format(name)` looks a model's `tool_format` up (aliases included; an unknown name logs
and falls back to hermes). The formats of `kodkod.chat.tools` (hermes, qwen3_coder, glm4_5,
minimax_m2, mistral) are joined here by one module per newer format:

| name | aliases | module |
|------|---------|--------|
| `deepseek_v4` | `dsv4` | `deepseek_v4` |
| `hy3` | `hy_v3` | `hy3` |
| `gemma4` | | `gemma4` |
| `harmony` | | `harmony` (whole reply, gpt-oss) |
| `muse_glimmer` | `glimmer` | `muse_glimmer` (whole reply) |

Each module names the published source of its syntax. `reply_format()` decides whether a model
writes its whole reply in harmony or muse_glimmer: the model's `harmony` / `muse_glimmer`
setting when given, else whether the tokenizer has that format's special tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from kodkod.chat.tool_formats import deepseek_v4, gemma4, harmony, hy3, muse_glimmer
from kodkod.chat.tools import BUILTIN_ALIASES, BUILTIN_FORMATS, HERMES, ToolFormat
from kodkod.engine.backend import Tokenizer

__all__ = ["REPLY_FORMATS", "ToolFormat", "has_special_token", "reply_format", "tool_format"]

log = logging.getLogger(__name__)

_FORMATS: Mapping[str, ToolFormat] = {
    fmt.name: fmt
    for fmt in (
        *BUILTIN_FORMATS,
        deepseek_v4.FORMAT,
        hy3.FORMAT,
        gemma4.FORMAT,
        harmony.FORMAT,
        muse_glimmer.FORMAT,
    )
}
_ALIASES: Mapping[str, str] = {
    **BUILTIN_ALIASES,
    "dsv4": "deepseek_v4",
    "hy_v3": "hy3",
    "glimmer": "muse_glimmer",
}
# Whole-reply formats, each with the special tokens that identify its vocabulary.
REPLY_FORMATS: Mapping[str, tuple[str, ...]] = {
    "harmony": harmony.SIGNATURE,
    "muse_glimmer": muse_glimmer.SIGNATURE,
}


def tool_format(name: str | None) -> ToolFormat:
    """The format called `name` (None → hermes); an unknown name logs and falls back to hermes."""
    if not name:
        return HERMES
    key = name.strip().lower()
    fmt = _FORMATS.get(_ALIASES.get(key, key))
    if fmt is None:
        log.warning("tool_format %r is not supported here; parsing hermes-style calls", name)
        return HERMES
    return fmt


def has_special_token(tokenizer: Tokenizer, text: str) -> bool:
    """Whether the vocabulary has `text` as one token of its own.

    Tags such as `<|channel|>` are never ordinary merges: a single token means an added
    (special or user-defined) token, so this is true for exactly the tags a format needs.
    """
    return len(text) > 1 and len(tokenizer.tokenize(text, add_bos=False, parse_special=True)) == 1


def reply_format(settings: Mapping[str, object], is_special: Callable[[str], bool]) -> str | None:
    """`harmony`, `muse_glimmer` or None for a model.

    `settings` holds the model's `harmony` / `muse_glimmer` booleans (true forces the format,
    false rules it out, absent/None detects it); `is_special(text)` says whether the tokenizer
    has `text` as a special token. Harmony is checked first.
    """
    for name in REPLY_FORMATS:
        if settings.get(name) is True:
            return name
    for name, signature in REPLY_FORMATS.items():
        if settings.get(name) is None and all(is_special(token) for token in signature):
            return name
    return None
