"""The sandboxed Jinja2 environment that chat templates are compiled in.

`make_environment()` builds a fresh `ImmutableSandboxedEnvironment` with the conventions of
HuggingFace chat templates: `trim_blocks`, `lstrip_blocks`, loop controls, a plain-JSON `tojson`
filter, the `raise_exception` and `strftime_now` globals and transparent
`{% generation %}…{% endgeneration %}` blocks. It has no loader, so `include`, `import` and
`extends` cannot reach the file system.

Hardening beyond Jinja's sandbox: touching an unsafe attribute (``''.__class__``) raises at once
instead of yielding a silent undefined, and `*` / `**` refuse results that would be huge.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from kodkod.chat.errors import TemplateError

# Largest sequence (str/list/tuple) that `seq * n` may produce inside a template.
MAX_REPEAT_LEN = 1_000_000
# Largest integer (in bits) that `a ** b` may produce inside a template.
MAX_POWER_BITS = 65_536


class GenerationExtension(Extension):
    """`{% generation %}…{% endgeneration %}`: marks assistant text for training masks.

    Inference has no use for the mask, so the body is spliced into the template as if the
    tags were not there (variables set inside stay visible after it).
    """

    tags = {"generation"}  # noqa: RUF012 - the type jinja2.ext.Extension declares

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)  # the `generation` name token
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class ChatSandbox(ImmutableSandboxedEnvironment):
    """Immutable sandbox that fails loudly on unsafe access and bounds `*` and `**`."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            _check_repeat(left, right)
            _check_repeat(right, left)
        elif operator == "**":
            _check_power(left, right)
        return super().call_binop(context, operator, left, right)


def _check_repeat(seq: Any, count: Any) -> None:
    if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > MAX_REPEAT_LEN:
        raise SecurityError(f"repetition would build a sequence longer than {MAX_REPEAT_LEN} items")


def _check_power(base: Any, exponent: Any) -> None:
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and exponent > 0
        and abs(base) > 1
        and abs(base).bit_length() * exponent > MAX_POWER_BITS
    ):
        raise SecurityError(f"power would exceed {MAX_POWER_BITS} bits")


def raise_exception(message: object) -> NoReturn:
    """Template global: abort rendering with `message` (becomes a 400 for the client)."""
    raise TemplateError(str(message))


def strftime_now(fmt: str) -> str:
    """Template global: the current local time formatted with `fmt`."""
    return datetime.now().strftime(fmt)


def tojson(
    value: Any,
    indent: int | str | None = None,
    ensure_ascii: bool = False,
    separators: Sequence[str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Template filter: plain JSON text (no HTML escaping, unlike Jinja's built-in)."""
    seps = (separators[0], separators[1]) if separators is not None else None
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=seps, sort_keys=sort_keys)


def make_environment() -> ChatSandbox:
    """A fresh, loader-less sandbox configured for chat templates."""
    env = ChatSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", GenerationExtension],
        undefined=jinja2.Undefined,
        autoescape=False,
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
