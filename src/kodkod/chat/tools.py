"""Tool calling: formats, parsing generated calls, and telling a model about its tools.

A *tool format* (the model's `tool_format`) says how a model writes a call: the tags around
it and the syntax inside. The default, `hermes`, is the convention of Hermes, Qwen 2.5 and the
shipped ChatML template:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Also parsed: `qwen3_coder` (`<function=NAME><parameter=KEY>value</parameter></function>`),
`glm4_5` (`NAME<arg_key>k</arg_key><arg_value>v</arg_value>`), `minimax_m2`
(`<invoke name="NAME"><parameter name="k">v</parameter></invoke>`) and `mistral`
(`[TOOL_CALLS]` followed by a JSON list or `NAME[ARGS]{...}`, no end tag). Parameter values in
the XML-ish formats are decoded as JSON when they parse, else kept as strings. Unparseable tool
text yields no calls (the caller shows it as content instead). The formats of newer models, and
the registry that names them all, are in `kodkod.chat.tool_formats`.

When a chat template ignores `tools` / `tool_calls` (SmolLM2's own template does),
`tools_system_prompt()` describes the tools in the hermes format and `inline_tool_history()`
writes earlier calls and results into the message text, so the model still sees them.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kodkod.chat.channels import SplitterConfig, TextSplitter

log = logging.getLogger(__name__)

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


def new_tool_call_id() -> str:
    """An OpenAI-style tool call id: `call_` + 24 hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # a JSON text, as OpenAI sends it
    id: str

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            out["index"] = index
        return out


@dataclass(frozen=True, slots=True)
class ToolFormat:
    name: str
    start: str
    end: str | None  # None: the call runs to the end of the output
    parse: Callable[[str], list[tuple[str, Any]]]  # inner text → [(name, arguments)]
    # The format's own reasoning tags, used when reasoning is on with the default tags.
    reasoning: tuple[str, str] | None = None
    # Its tags are special (control) tokens, which only appear when output renders them.
    special_tokens: bool = False
    # A whole-reply format (harmony, muse_glimmer) splits the output with its own splitter
    # instead of looking for `start` / `end`; it also decides what is reasoning.
    splitter: Callable[[SplitterConfig], TextSplitter] | None = None


def json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _json_objects(text: str) -> list[Any]:
    """Every top-level JSON value in `text` (objects/arrays separated by anything)."""
    decoder = json.JSONDecoder()
    out: list[Any] = []
    i = 0
    while True:
        starts = [j for j in (text.find("{", i), text.find("[", i)) if j >= 0]
        if not starts:
            return out
        j = min(starts)
        try:
            value, end = decoder.raw_decode(text, j)
        except ValueError:
            i = j + 1
            continue
        out.append(value)
        i = end


def _calls_from_json(values: list[Any]) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []
    for value in values:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, Mapping):
                continue
            function = item.get("function")
            fn = function if isinstance(function, Mapping) else item
            name = fn.get("name")
            if not isinstance(name, str) or not name:
                continue
            args = fn.get("arguments", fn.get("parameters", {}))
            calls.append((name, args))
    return calls


def parse_hermes(inner: str) -> list[tuple[str, Any]]:
    return _calls_from_json(_json_objects(inner))


_QWEN3_FN = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", re.S)
_QWEN3_PARAM = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?(?:</parameter>|(?=<parameter=)|$)", re.S)


def parse_qwen3_coder(inner: str) -> list[tuple[str, Any]]:
    calls = []
    for m in _QWEN3_FN.finditer(inner):
        args = {k: json_value(v) for k, v in _QWEN3_PARAM.findall(m.group(2))}
        calls.append((m.group(1), args))
    return calls


_GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


def parse_glm(inner: str) -> list[tuple[str, Any]]:
    name = inner.split("<arg_key>", 1)[0].strip()
    if not name:
        return []
    return [(name, {k.strip(): json_value(v) for k, v in _GLM_ARG.findall(inner)})]


_MINIMAX_INVOKE = re.compile(r'<invoke name="([^"]+)">(.*?)</invoke>', re.S)
_MINIMAX_PARAM = re.compile(r'<parameter name="([^"]+)">(.*?)</parameter>', re.S)


def parse_minimax(inner: str) -> list[tuple[str, Any]]:
    return [
        (m.group(1), {k: json_value(v.strip()) for k, v in _MINIMAX_PARAM.findall(m.group(2))})
        for m in _MINIMAX_INVOKE.finditer(inner)
    ]


_MISTRAL_ARGS = re.compile(r"\s*([A-Za-z0-9_.\-]+)\[ARGS\]")


def parse_mistral(inner: str) -> list[tuple[str, Any]]:
    if "[ARGS]" not in inner:
        return _calls_from_json(_json_objects(inner))
    calls = []
    decoder = json.JSONDecoder()
    for chunk in inner.split("[TOOL_CALLS]"):
        m = _MISTRAL_ARGS.match(chunk)
        if m is None:
            continue
        try:
            args, _ = decoder.raw_decode(chunk[m.end() :].lstrip())
        except ValueError:
            continue
        calls.append((m.group(1), args))
    return calls


HERMES = ToolFormat("hermes", TOOL_CALL_START, TOOL_CALL_END, parse_hermes)
# The formats defined here; `kodkod.chat.tool_formats` adds the newer ones and looks names up.
BUILTIN_FORMATS: tuple[ToolFormat, ...] = (
    HERMES,
    ToolFormat("qwen3_coder", TOOL_CALL_START, TOOL_CALL_END, parse_qwen3_coder),
    ToolFormat("glm4_5", TOOL_CALL_START, TOOL_CALL_END, parse_glm),
    ToolFormat("minimax_m2", "<minimax:tool_call>", "</minimax:tool_call>", parse_minimax),
    ToolFormat("mistral", "[TOOL_CALLS]", None, parse_mistral),
)
BUILTIN_ALIASES: Mapping[str, str] = {
    "json": "hermes",
    "qwen": "hermes",
    "qwen2_5": "hermes",
    "qwen3": "hermes",
    "chatml": "hermes",
    "qwen3_5": "qwen3_coder",
    "step3_5": "qwen3_coder",
    "step3_7": "qwen3_coder",
    "glm4_6": "glm4_5",
    "glm4_7": "glm4_5",
    "laguna": "glm4_5",
    "poolside_v1": "glm4_5",
    "minimax_m2_1": "minimax_m2",
    "minimax_m2_5": "minimax_m2",
    "mistral_old": "mistral",
}


def parse_tool_calls(fmt: ToolFormat, inner: str) -> list[ToolCall]:
    """Calls found in the text between a format's tags ([] when nothing parses)."""
    try:
        found = fmt.parse(inner)
    except Exception:  # parse failures never become errors
        log.debug("tool call text did not parse: %r", inner[:200])
        return []
    calls = []
    for name, args in found:
        text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        calls.append(ToolCall(name=name, arguments=text, id=new_tool_call_id()))
    return calls


# -- prompting ------------------------------------------------------------------------------

_WORD = {"tools": re.compile(r"\btools\b"), "tool_calls": re.compile(r"\btool_calls\b")}


def template_renders(source: str, variable: str) -> bool:
    """Whether a template's source mentions `tools` / `tool_calls` at all."""
    return bool(_WORD[variable].search(source))


def tools_system_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """A system-prompt block that lists the tools and the hermes call syntax."""
    lines = "\n".join(json.dumps(dict(t), ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{lines}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def add_tools_system_prompt(
    messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Messages with the tools block appended to the system message (or a new one first)."""
    block = tools_system_prompt(tools)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        text = first.get("content") or ""
        text = text if isinstance(text, str) else _text_of(text)
        first["content"] = f"{text}\n\n{block}" if text else block
        return [first, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def _text_of(parts: Any) -> str:
    if isinstance(parts, list):
        return "".join(p.get("text", "") for p in parts if isinstance(p, Mapping))
    return str(parts)


def format_call_text(name: str, arguments: Any) -> str:
    """One call in hermes syntax (arguments given as a JSON text or an object)."""
    args = json_value(arguments) if isinstance(arguments, str) else arguments
    body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
    return f"{TOOL_CALL_START}\n{body}\n{TOOL_CALL_END}"


def inline_tool_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write assistant `tool_calls` into the text and wrap tool results, hermes style.

    For templates that only render `role` and `content`.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        calls = message.get("tool_calls")
        if role == "assistant" and calls:
            texts = []
            for call in calls:
                fn = call.get("function", call) if isinstance(call, Mapping) else {}
                texts.append(format_call_text(str(fn.get("name", "")), fn.get("arguments", {})))
            content = message.get("content") or ""
            content = content if isinstance(content, str) else _text_of(content)
            joined = "\n".join(texts)
            new = {k: v for k, v in message.items() if k != "tool_calls"}
            new["content"] = f"{content}\n{joined}" if content else joined
            out.append(new)
        elif role == "tool":
            content = message.get("content") or ""
            content = content if isinstance(content, str) else _text_of(content)
            out.append({**message, "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append(message)
    return out


def _closed(params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` with `additionalProperties: false` when it lists properties and says nothing.

    Every output of the closed schema is valid for the open one; without it a small model can
    invent extra keys until it runs out of tokens.
    """
    out = dict(params)
    if isinstance(out.get("properties"), Mapping) and not (
        {"additionalProperties", "patternProperties", "unevaluatedProperties"} & out.keys()
    ):
        out["additionalProperties"] = False
    return out


def call_schema(tools: Sequence[Mapping[str, Any]], name: str | None) -> dict[str, Any]:
    """JSON schema of one hermes call body: `{"name": ..., "arguments": {...}}`.

    `name` picks one tool; None allows any of them. Arguments follow the tool's `parameters`
    (a tool without parameters takes any object; listed properties are the only ones made).
    """
    options = []
    for tool in tools:
        fn = tool.get("function", tool)
        if name is not None and fn.get("name") != name:
            continue
        params = _closed(fn.get("parameters") or {"type": "object"})
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn.get("name")}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    if not options:
        raise ValueError(f"no tool named {name!r}")
    return options[0] if len(options) == 1 else {"anyOf": options}
