"""Compiled chat templates: rendering, continuation, metadata and BOS handling.

A `ChatTemplate` is a named Jinja2 source compiled once (lazily, or eagerly through
`ChatTemplate.compile`) in the sandbox from `kodkod.chat.environment`. `render()` prepares the
messages (`prepare_messages`), builds TabbyAPI's template variables and returns the
prompt text. Every failure while compiling or rendering -- syntax errors, `raise_exception`,
sandbox violations, undefined variables, type errors -- surfaces as `TemplateError` with a
message meant for the client (callers answer 400 with ``TemplateError: <message>``).

`render_continuation()` implements `continue_final_message`, `metadata()` reads the
exl2-era `stop_strings` / `tool_start` declarations, and `strip_leading_bos()` removes the
BOS text that the tokenizer will add again.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2

from kodkod.chat.environment import make_environment
from kodkod.chat.errors import TemplateError, TemplateFileError
from kodkod.chat.messages import prepare_messages

__all__ = [
    "ChatTemplate",
    "TemplateError",
    "TemplateFileError",
    "TemplateMetadata",
    "strip_leading_bos",
]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class TemplateMetadata:
    """Values a template declares at top level with `{% set ... %}`."""

    stop_strings: list[str] = field(default_factory=list)
    tool_start: str | None = None
    tool_start_token: int | None = None


@dataclass(slots=True)
class ChatTemplate:
    """A named chat template; the Jinja source is compiled on first use and kept."""

    name: str
    source: str
    _compiled: jinja2.Template | None = field(default=None, init=False, repr=False, compare=False)
    _metadata: TemplateMetadata | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def compile(cls, name: str, source: str) -> ChatTemplate:
        """Build and compile a template now; raises `TemplateError` on a syntax error."""
        template = cls(name=name, source=source)
        template._jinja()
        return template

    def _jinja(self) -> jinja2.Template:
        if self._compiled is None:
            try:
                self._compiled = make_environment().from_string(self.source)
            except jinja2.TemplateSyntaxError as exc:
                raise TemplateError(
                    f"syntax error in chat template {self.name!r} at line {exc.lineno}: {exc.message}"
                ) from None
            except Exception as exc:  # any compile failure is a template error
                raise TemplateError(
                    f"chat template {self.name!r} could not be compiled: {type(exc).__name__}: {exc}"
                ) from None
        return self._compiled

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool,
        bos_token: str,
        eos_token: str,
        pad_token: str | None = None,
        unk_token: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        functions: list[dict[str, Any]] | None = None,
        template_vars: Mapping[str, object] | None = None,
    ) -> str:
        """Render the prompt for `messages` (prepared here; see `prepare_messages`)."""
        variables = _variables(
            prepare_messages(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            unk_token=unk_token,
            tools=tools,
            functions=functions,
            template_vars=template_vars,
        )
        return self._render(variables)

    def render_continuation(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        bos_token: str,
        eos_token: str,
        pad_token: str | None = None,
        unk_token: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        functions: list[dict[str, Any]] | None = None,
        template_vars: Mapping[str, object] | None = None,
    ) -> str:
        """Render for `continue_final_message`: the prompt ends inside the final message.

        The final message's text gets a unique sentinel appended; the output is cut right
        before the sentinel, so whatever the template writes after the message (end-of-turn
        tokens, a new turn) is left out and the model continues the unterminated text.
        Trailing whitespace of the final text is kept unless the template itself trims it.
        Rendering uses `add_generation_prompt=False`. Raises `TemplateError` when there is no
        final message with text or the template dropped or rewrote it.
        """
        prepared = prepare_messages(messages)
        final_text = prepared[-1].get("content") if prepared else None
        if not isinstance(final_text, str) or not final_text:
            raise TemplateError("continue_final_message needs a final message with text content")
        sentinel = f"<<kodkod-continue-{uuid.uuid4().hex}>>"
        common: dict[str, Any] = {
            "add_generation_prompt": False,
            "bos_token": bos_token,
            "eos_token": eos_token,
            "pad_token": pad_token,
            "unk_token": unk_token,
            "tools": tools,
            "functions": functions,
            "template_vars": template_vars,
        }
        marked = [*prepared[:-1], {**prepared[-1], "content": final_text + sentinel}]
        rendered = self._render(_variables(marked, **common))
        cut = rendered.rfind(sentinel)
        if cut < 0:
            raise TemplateError(
                f"continue_final_message: chat template {self.name!r} dropped or rewrote "
                "the final message, so its text cannot be continued"
            )
        prompt = rendered[:cut]
        # The sentinel shields trailing whitespace from a template's `trim`; when the plain
        # rendering shows the template drops it, drop it here too.
        trailing = final_text[len(final_text.rstrip()) :]
        if trailing and prompt.endswith(trailing):
            plain = self._render(_variables(prepared, **common))
            if not plain.startswith(prompt) and plain.startswith(prompt[: -len(trailing)]):
                prompt = prompt[: -len(trailing)]
        return prompt

    def metadata(self) -> TemplateMetadata:
        """`stop_strings` / `tool_start` / `tool_start_token` set at the template's top level.

        The template module is evaluated with harmless variables (first no messages, then one
        empty user message); a template that fails both ways declares nothing.
        """
        if self._metadata is None:
            self._metadata = self._read_metadata()
        return self._metadata

    def _read_metadata(self) -> TemplateMetadata:
        module: Any = None
        for sample in ([], [{"role": "user", "content": ""}]):
            try:
                module = self._jinja().make_module(
                    _variables(
                        sample,
                        add_generation_prompt=False,
                        bos_token="",
                        eos_token="",
                        pad_token=None,
                        unk_token=None,
                        tools=None,
                        functions=None,
                        template_vars=None,
                    )
                )
                break
            except Exception as exc:  # metadata is best effort
                logger.debug("template %r: metadata evaluation failed: %s", self.name, exc)
        if module is None:
            return TemplateMetadata()
        return TemplateMetadata(
            stop_strings=_string_list(getattr(module, "stop_strings", None)),
            tool_start=_optional_str(getattr(module, "tool_start", None)),
            tool_start_token=_optional_int(getattr(module, "tool_start_token", None)),
        )

    def _render(self, variables: dict[str, Any]) -> str:
        template = self._jinja()
        try:
            return template.render(variables)
        except TemplateError:
            raise
        except RecursionError:
            raise TemplateError(f"chat template {self.name!r} failed: recursion too deep") from None
        except Exception as exc:  # every render failure is the template's
            raise TemplateError(f"chat template {self.name!r} failed: {type(exc).__name__}: {exc}") from None


def strip_leading_bos(prompt: str, bos_token: str, *, add_bos_token: bool = True) -> str:
    """Remove one leading BOS string, because the tokenizer will add the BOS token itself.

    Pass the model's `add_bos_token` (GGUF `tokenizer.ggml.add_bos_token`, absent = true):
    when the tokenizer does not add BOS the prompt is returned unchanged. This matters:
    SmolLM2's BOS is `<|im_start|>`, which every ChatML prompt legitimately starts with.
    """
    if add_bos_token and bos_token and prompt.startswith(bos_token):
        return prompt[len(bos_token) :]
    return prompt


def _variables(
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    bos_token: str,
    eos_token: str,
    pad_token: str | None,
    unk_token: str | None,
    tools: list[dict[str, Any]] | None,
    functions: list[dict[str, Any]] | None,
    template_vars: Mapping[str, object] | None,
) -> dict[str, Any]:
    """Template variables: `template_vars` first, the protected names set on top."""
    variables: dict[str, Any] = dict(template_vars or {})
    variables.update(
        add_generation_prompt=add_generation_prompt,
        tools=tools,
        functions=functions,
        messages=messages,
        bos_token=bos_token,
        eos_token=eos_token,
    )
    # Tokens the model lacks stay undefined (not a request-supplied value, not "None").
    for name, token in (("pad_token", pad_token), ("unk_token", unk_token)):
        if token is None:
            variables.pop(name, None)
        else:
            variables[name] = token
    return variables


def _string_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, Sequence):
        return [item for item in value if isinstance(item, str) and item]
    return []


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _optional_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
