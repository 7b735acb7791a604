"""Which output constraint an OpenAI request asks for, and building one per choice.

Sources (at most one per request, else 400):
* `response_format`: `json_object` / `json` → any JSON object; `json_schema` → its schema, with
  OpenAI's `{name, description, schema, strict}` envelope unwrapped (a bare schema is used
  as-is, TabbyAPI style); `text` → none.
* TabbyAPI's `json_schema`, `regex_pattern`, `grammar_string` (`api.convert.grammar_spec`).
* a forced tool call (`tool_choice: "required"` or a named function): the output must be one
  hermes-style call, `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, whose
  arguments follow the tool's `parameters` schema (keywords the compiler lacks are ignored).

The grammar is compiled once per request in a worker thread; each choice gets a fresh parser.
When the reply starts inside a reasoning block, the constraint waits for the reasoning end tag.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kodkod.api.convert import compile_grammar, grammar_spec
from kodkod.api.errors import ApiError
from kodkod.api.openai.schemas import ResponseFormat, ToolSpec
from kodkod.chat.tools import TOOL_CALL_END, TOOL_CALL_START, call_schema
from kodkod.core.constraints import (
    ConstraintFactory,
    DelayedConstraint,
    GrammarCompiler,
    GrammarKind,
    GrammarSpec,
)
from kodkod.core.types import Constraint
from kodkod.engine.backend import Tokenizer

_ENVELOPE_KEYS = {"name", "description", "schema", "strict"}


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: str  # "auto" | "none" | "required" | "function"
    name: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")

    @property
    def parse(self) -> bool:
        return self.mode != "none"


def tool_choice(tools: list[ToolSpec] | None, value: str | dict[str, Any] | None) -> ToolChoice:
    """Normalise `tool_choice` (400 for values that cannot be honoured)."""
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise ApiError(
                400,
                f"tool_choice {value!r} is not one of auto, none, required or a function",
                param="tool_choice",
            )
        choice = ToolChoice(value)
    else:
        fn = value.get("function") if isinstance(value.get("function"), dict) else value
        name = fn.get("name") if isinstance(fn, dict) else None
        if value.get("type", "function") != "function" or not isinstance(name, str):
            raise ApiError(
                400,
                'tool_choice must name a function: {"type": "function", "function": {"name": ...}}',
                param="tool_choice",
            )
        choice = ToolChoice("function", name)
    if choice.forced and not tools:
        raise ApiError(400, f"tool_choice {choice.mode!r} needs tools", param="tool_choice")
    if choice.name is not None and all(t.function.name != choice.name for t in tools or []):
        raise ApiError(
            400, f"tool_choice names {choice.name!r}, which is not among the tools", param="tool_choice"
        )
    return choice


def response_format_spec(fmt: ResponseFormat | None) -> GrammarSpec | None:
    if fmt is None or fmt.type in ("text", ""):
        return None
    if fmt.type in ("json_object", "json"):
        return GrammarSpec(GrammarKind.JSON_SCHEMA, '{"type": "object"}')
    if fmt.type == "json_schema":
        schema = fmt.json_schema
        if isinstance(schema, dict) and "schema" in schema and set(schema) <= _ENVELOPE_KEYS:
            schema = schema["schema"] if schema["schema"] is not None else {"type": "object"}
        if not isinstance(schema, dict | bool):
            raise ApiError(400, "response_format json_schema needs a schema object", param="response_format")
        return GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(schema))
    raise ApiError(
        400,
        f"response_format type {fmt.type!r} is not supported (text, json_object, json_schema)",
        param="response_format",
    )


def forced_tool_spec(tools: list[ToolSpec], choice: ToolChoice) -> GrammarSpec:
    """A grammar for exactly one hermes-style call of the chosen (or any) tool."""
    schema = call_schema([t.model_dump(exclude_none=True) for t in tools], choice.name)
    # Compact JSON, no \uXXXX escapes (a small model's favourite junk), unknown keywords ignored.
    schema["x-guidance"] = {"lenient": True, "whitespace_flexible": False, "json_allowed_escapes": '"\\bfnrt'}
    start, end = json.dumps(TOOL_CALL_START + "\n"), json.dumps("\n" + TOOL_CALL_END)
    lark = f"start: {start} call {end}\ncall: %json {json.dumps(schema)}"
    return GrammarSpec(GrammarKind.LARK, lark)


def output_spec(
    values: dict[str, Any],
    fmt: ResponseFormat | None,
    forced_tools: tuple[list[ToolSpec], ToolChoice] | None = None,
) -> GrammarSpec | None:
    """The request's one output constraint, or None."""
    found: list[tuple[str, GrammarSpec]] = []
    spec = grammar_spec(values)
    if spec is not None:
        found.append((spec.kind.value, spec))
    spec = response_format_spec(fmt)
    if spec is not None:
        found.append(("response_format", spec))
    if forced_tools is not None:
        found.append(("tool_choice", forced_tool_spec(*forced_tools)))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise ApiError(
            400, f"only one output constraint may be used per request, got {names}", param=found[1][0]
        )
    return found[0][1] if found else None


@dataclass(slots=True)
class ConstraintPlan:
    """A compiled constraint and how to attach it to each choice."""

    factory: ConstraintFactory
    wait_for: str | None = None  # start only after this text (the reasoning end tag)
    piece: Callable[[int], bytes] | None = None

    def new(self) -> Constraint:
        inner = self.factory.new()
        if self.wait_for and self.piece is not None:
            return DelayedConstraint(inner, self.wait_for, self.piece)
        return inner


async def plan_constraint(
    tokenizer: Tokenizer,
    compiler: GrammarCompiler | None,
    spec: GrammarSpec | None,
    *,
    wait_for: str | None = None,
) -> ConstraintPlan | None:
    if spec is None:
        return None
    factory = await compile_grammar(compiler, spec)

    def piece(token_id: int) -> bytes:
        return tokenizer.token_bytes(token_id, special=True)

    return ConstraintPlan(factory, wait_for, piece if wait_for else None)
