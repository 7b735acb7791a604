"""Turn API chat messages into the plain dicts chat templates expect.

`prepare_messages()` returns new dicts (the input is never modified) where:
* `content` is always a string: a list of content parts becomes the concatenation of its text
  parts (image parts are dropped: this backend has no vision support); `None` becomes "".
* keys whose value is `None` are removed, so `message.tool_calls is defined` means what a
  template author expects.
* assistant `tool_calls[].function.arguments` JSON strings are parsed into objects (templates
  iterate them as mappings); a string that is not a JSON object is kept as it is.
* a run of consecutive `tool` messages is put in the order of the ids in the preceding
  assistant message's `tool_calls` (unknown ids keep their relative order, at the end).
The function is idempotent, so preparing prepared messages changes nothing.

`dropped_parts()` counts, by type, the content parts that flattening leaves out (images,
audio, …), so the caller can say so in the log instead of dropping them silently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Normalise messages for rendering (see the module docstring)."""
    prepared = [_prepare_message(message) for message in messages]
    return _reorder_tool_results(prepared)


def flatten_content(content: Any) -> Any:
    """A message `content` as text: parts are concatenated, `None` is ""."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts: list[str] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text":
                text = part.get("text")
                if isinstance(text, str):
                    texts.append(text)
        return "".join(texts)
    return content


def dropped_parts(messages: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many non-text content parts of each type `flatten_content` would drop."""
    counts: dict[str, int] = {}
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) or not isinstance(content, Sequence):
            continue
        for part in content:
            if isinstance(part, Mapping) and part.get("type", "text") != "text":
                kind = str(part.get("type"))[:40]
                counts[kind] = counts.get(kind, 0) + 1
    return counts


def _prepare_message(message: Mapping[str, Any]) -> dict[str, Any]:
    prepared = {key: value for key, value in message.items() if value is not None}
    prepared["content"] = flatten_content(message.get("content"))
    tool_calls = prepared.get("tool_calls")
    if isinstance(tool_calls, Sequence) and not isinstance(tool_calls, str):
        prepared["tool_calls"] = [_prepare_tool_call(call) for call in tool_calls]
    return prepared


def _prepare_tool_call(call: Any) -> Any:
    if not isinstance(call, Mapping):
        return call
    prepared = dict(call)
    function = prepared.get("function")
    if isinstance(function, Mapping):
        function = dict(function)
        function["arguments"] = _parse_arguments(function.get("arguments"))
        prepared["function"] = function
    return prepared


def _parse_arguments(arguments: Any) -> Any:
    if not isinstance(arguments, str):
        return arguments
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return arguments
    return parsed if isinstance(parsed, dict) else arguments


def _reorder_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sort each run of `tool` messages by the preceding assistant's tool-call order."""
    result: list[dict[str, Any]] = []
    i = 0
    while i < len(messages):
        if messages[i].get("role") != "tool":
            result.append(messages[i])
            i += 1
            continue
        end = i
        while end < len(messages) and messages[end].get("role") == "tool":
            end += 1
        run = messages[i:end]
        call_ids = _tool_call_ids(result[-1]) if result else []
        if call_ids:
            position = {call_id: k for k, call_id in enumerate(call_ids)}
            unknown = len(call_ids)

            def rank(tool_message: dict[str, Any]) -> int:
                call_id = tool_message.get("tool_call_id")
                # sorted() below calls rank() within this iteration, so the loop variables are current.
                return position.get(call_id, unknown) if isinstance(call_id, str) else unknown  # noqa: B023

            # sorted() is stable: unknown ids keep their order behind the known ones.
            run = sorted(run, key=rank)
        result.extend(run)
        i = end
    return result


def _tool_call_ids(message: Mapping[str, Any]) -> list[str]:
    if message.get("role") != "assistant":
        return []
    calls = message.get("tool_calls")
    if not isinstance(calls, Sequence) or isinstance(calls, str):
        return []
    ids = [call.get("id") for call in calls if isinstance(call, Mapping)]
    return [call_id for call_id in ids if isinstance(call_id, str)]
