"""Hostile request bodies for the fuzz test and the soak benchmark.

`post_routes(openapi)` lists the app's POST routes with their request schemas (resolved from
the app's own OpenAPI document, so a new route is fuzzed without touching the tests).
`body_strategy(route)` is a hypothesis strategy for one route's body: a JSON value built from
the route's schema, where any value may be swapped for a hostile one (NaN/Infinity literals,
huge and negative integers, NUL bytes, long strings, deep nesting, wrong types, long lists),
or raw garbage bytes. Every size is capped so a run stays short.

`encode(value)` turns a drawn value into the bytes to send: Python's `json.dumps` writes NaN
and Infinity as bare literals, which is what a hostile client sends too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

# Routes that change (or download) the loaded model: the fuzz test must leave the model in place.
MODEL_CHANGING = frozenset(
    {
        "/v1/model/load",
        "/v1/model/unload",
        "/v1/lora/load",
        "/v1/lora/unload",
        "/v1/model/embedding/load",
        "/v1/model/embedding/unload",
        "/v1/download",
    }
)
# Fields that set a generation length (aliases of max_tokens)
LENGTH_FIELDS = ("max_tokens", "max_length", "max_completion_tokens")
MAX_LIST_LEN = 4
LONG_STRING_CHARS = 100_000
LONG_LIST_LEN = 5_000
DEEP_NESTING = 5_000
N_VOCAB_GUESS = 50_000  # ids drawn around the default model's vocabulary size


@dataclass(slots=True)
class PostRoute:
    path: str
    schema: dict[str, Any] | None  # the request body's JSON schema, refs resolved lazily
    defs: dict[str, Any] = field(default_factory=dict)
    raw_body: bool = False  # the handler reads the body itself (no declared schema)

    @property
    def generates(self) -> bool:
        """A request body with a length field: the route runs the model."""
        return "max_tokens" in _properties(self.schema, self.defs)


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    seen = 0
    while "$ref" in schema and seen < 20:
        schema = defs.get(schema["$ref"].rsplit("/", 1)[-1], {})
        seen += 1
    return schema


def _properties(schema: dict[str, Any] | None, defs: dict[str, Any]) -> dict[str, Any]:
    if schema is None:
        return {}
    return dict(_resolve(schema, defs).get("properties") or {})


def post_routes(openapi: dict[str, Any], *, exclude: frozenset[str] = MODEL_CHANGING) -> list[PostRoute]:
    """Every POST route of the OpenAPI document except `exclude`, sorted by path."""
    defs = dict((openapi.get("components") or {}).get("schemas") or {})
    out = []
    for path, ops in sorted((openapi.get("paths") or {}).items()):
        op = ops.get("post")
        if op is None or path in exclude:
            continue
        content = ((op.get("requestBody") or {}).get("content") or {}).get("application/json")
        schema = content.get("schema") if content else None
        out.append(PostRoute(path, schema, defs, raw_body=schema is None))
    return out


def encode(value: Any) -> bytes:
    """JSON text of `value` with NaN/Infinity as bare literals; bytes pass through."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, Deep):
        return value.text().encode()
    deep: dict[str, Deep] = {}

    def splice(obj: Any) -> str:
        if not isinstance(obj, Deep):
            raise TypeError(f"not JSON: {type(obj).__name__}")
        deep[obj.marker] = obj
        return obj.marker

    text = json.dumps(value, allow_nan=True, default=splice)
    for marker, obj in deep.items():
        text = text.replace(json.dumps(marker), obj.text())
    return text.encode("utf-8", errors="surrogatepass")


# -- hostile values -------------------------------------------------------------------------


def hostile_scalars() -> st.SearchStrategy[Any]:
    return st.sampled_from(
        [
            float("nan"),
            float("inf"),
            float("-inf"),
            1e308,
            -1e308,
            5e-324,
            -0.0,
            2**31,
            2**32 + 1,
            2**63,
            2**64 + 7,
            -(2**63),
            -(2**63) - 1,
            10**40,
            -1,
            -2,
            "\x00",
            "a\x00b",
            "\x00" * 64,
            "",
            " ",
            "\ud800",
            "\uffff",
            "<|im_start|>",
            "{{7*7}}",
            "../../../../etc/passwd",
            "%s%n",
            True,
            False,
            None,
            [],
            {},
            [None],
            {"": None},
        ]
    )


def long_string() -> st.SearchStrategy[str]:
    return st.sampled_from([1_000, 10_000, LONG_STRING_CHARS]).flatmap(
        lambda n: st.sampled_from(["x", "é", "\x00", "ab ", "🦀"]).map(lambda c: (c * n)[:n])
    )


def long_list() -> st.SearchStrategy[list[Any]]:
    return st.sampled_from([500, LONG_LIST_LEN]).flatmap(
        lambda n: st.sampled_from([0, -1, 2**40, 49151, "a", None, "\x00", 1.5]).map(lambda v: [v] * n)
    )


@dataclass(frozen=True, slots=True)
class Deep:
    """A list or dict nested `depth` levels, spliced in by `encode` (as a Python object it
    would overflow the recursion limit of json.dumps and of hypothesis' printer)."""

    depth: int
    kind: str  # "list" or "dict"

    @property
    def marker(self) -> str:
        return f"@@deep-{self.depth}-{self.kind}@@"

    def text(self) -> str:
        if self.kind == "list":
            return "[" * self.depth + "1" + "]" * self.depth
        return '{"a":' * self.depth + "1" + "}" * self.depth


def deep_json() -> st.SearchStrategy[Deep]:
    return st.builds(Deep, st.sampled_from([50, 500, DEEP_NESTING]), st.sampled_from(["list", "dict"]))


def hostile_value() -> st.SearchStrategy[Any]:
    return st.one_of(
        hostile_scalars(),
        long_string(),
        long_list(),
        deep_json(),
        st.dictionaries(st.text(max_size=5), hostile_scalars(), max_size=3),
    )


def garbage_body() -> st.SearchStrategy[bytes]:
    """Bytes that are not a JSON object of the right shape."""
    deep = st.sampled_from([1_000, 100_000]).map(lambda n: b"[" * n + b"]" * n)
    deep_open = st.sampled_from([1_000, 100_000]).map(lambda n: b'{"a":' * n)
    return st.one_of(
        st.binary(max_size=64),
        st.sampled_from(
            [
                b"",
                b"null",
                b"[]",
                b"{",
                b"}",
                b'"x"',
                b"NaN",
                b"-Infinity",
                b"1e999",
                b'{"prompt": NaN}',
                b'{"a":1,"a":2}',
                b"\xff\xfe\x00",
                b'{"\\ud800": 1}',
                b"\x00" * 16,
            ]
        ),
        deep,
        deep_open,
    )


def _weighted(
    valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any], one_in: int
) -> st.SearchStrategy[Any]:
    return st.integers(0, one_in - 1).flatmap(lambda i: hostile if i == 0 else valid)


# -- schema-driven values -------------------------------------------------------------------


def _string(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    return st.text(max_size=min(int(schema.get("maxLength", 24)), 24))


def _integer(schema: dict[str, Any]) -> st.SearchStrategy[int]:
    lo = schema.get("minimum", schema.get("exclusiveMinimum", -3))
    hi = schema.get("maximum", schema.get("exclusiveMaximum", N_VOCAB_GUESS))
    return st.integers(int(max(lo, -(2**31))), int(min(hi, 2**31)))


def _number(schema: dict[str, Any]) -> st.SearchStrategy[float]:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    return st.floats(
        min_value=lo, max_value=hi if hi is not None else 100.0, allow_nan=False, allow_infinity=False
    )


def value_strategy(
    schema: dict[str, Any], defs: dict[str, Any], depth: int = 0, hostile_one_in: int = 5
) -> st.SearchStrategy[Any]:
    """A value of `schema`, swapped for a hostile one about once in `hostile_one_in`."""
    valid = _valid_strategy(_resolve(schema, defs), defs, depth, hostile_one_in)
    return _weighted(valid, hostile_value(), hostile_one_in)


def _valid_strategy(
    schema: dict[str, Any], defs: dict[str, Any], depth: int, one_in: int
) -> st.SearchStrategy[Any]:
    if depth > 4:
        return st.none()
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of(
                *(_valid_strategy(_resolve(s, defs), defs, depth + 1, one_in) for s in schema[key])
            )
    if "allOf" in schema:
        return _valid_strategy(_resolve(schema["allOf"][0], defs), defs, depth + 1, one_in)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        return object_strategy(schema, defs, depth + 1, one_in)
    if kind == "array":
        items = _resolve(schema.get("items") or {}, defs)
        return st.lists(value_strategy(items, defs, depth + 1, one_in), max_size=MAX_LIST_LEN)
    simple = {"string": _string, "integer": _integer, "number": _number}
    if kind in simple:
        return simple[kind](schema)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return st.one_of(st.none(), st.booleans(), st.integers(-5, 100), st.text(max_size=12))


def object_strategy(
    schema: dict[str, Any], defs: dict[str, Any], depth: int = 0, one_in: int = 5, max_optional: int = 5
) -> st.SearchStrategy[dict[str, Any]]:
    """An object with every required property and a few optional ones (a handful, so that a
    body is often valid enough to reach the handler), sometimes with unknown keys."""
    props = dict(schema.get("properties") or {})
    required = [k for k in schema.get("required", []) if k in props]
    optional = sorted(k for k in props if k not in required)
    req = st.fixed_dictionaries({k: value_strategy(props[k], defs, depth, one_in) for k in required})
    picks = (
        st.lists(st.sampled_from(optional), max_size=max_optional, unique=True) if optional else st.just([])
    )

    def with_optional(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries({k: value_strategy(props[k], defs, depth, one_in) for k in keys})

    extra = st.dictionaries(st.text(max_size=8), hostile_scalars(), max_size=2)
    return st.tuples(req, picks.flatmap(with_optional), _weighted(st.just({}), extra, 4)).map(
        lambda parts: {**parts[2], **parts[1], **parts[0]}
    )


def body_strategy(route: PostRoute, *, max_tokens: int = 4) -> st.SearchStrategy[Any]:
    """A request body for `route`: mostly schema-shaped, sometimes any JSON or raw garbage.
    A generation body without a length field gets `max_tokens` so requests stay short."""
    if route.schema is None:
        shaped: st.SearchStrategy[Any] = st.one_of(
            st.fixed_dictionaries({}, optional={"genkey": st.one_of(st.text(max_size=12), hostile_value())}),
            hostile_value(),
        )
    else:
        shaped = value_strategy(route.schema, route.defs, hostile_one_in=12)
    if route.generates:
        shaped = shaped.map(lambda b: _clamp_length(b, max_tokens))
    return _weighted(shaped, st.one_of(garbage_body(), hostile_value()), 6)


def _clamp_length(body: Any, max_tokens: int) -> Any:
    if isinstance(body, dict) and not any(k in body for k in LENGTH_FIELDS):
        return {**body, "max_tokens": max_tokens}
    return body
