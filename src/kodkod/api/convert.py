"""From API request fields to engine requests.

`resolve_fields()` applies the sampler override preset to the fields a request sent: a
non-forced override fills a field the request left out, a forced one replaces it (even when the
forced value is 0 or false — upstream skips falsy forced values, we don't:
docs/compatibility.md), an additive list is prepended to the request's list.
`build_generation()` turns the resolved values into a `GenerationRequest` for one prompt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

from kodkod.api.errors import ApiError
from kodkod.api.sampler_table import SAMPLER_TABLE, engine_kwargs
from kodkod.api.sampling import (
    FALLBACKS,
    SamplerRequest,
    apply_override,
    sampler_problem,
)
from kodkod.api.state import OverrideState
from kodkod.core.constraints import (
    ConstraintFactory,
    GrammarCompiler,
    GrammarError,
    GrammarKind,
    GrammarSpec,
)
from kodkod.core.types import (
    Constraint,
    GenerationRequest,
    LogitsProcessor,
    SamplingParams,
)
from kodkod.engine.backend import Tokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")


def new_request_id() -> str:
    return secrets.token_hex(16)


def resolve_fields(req: SamplerRequest, overrides: OverrideState) -> dict[str, Any]:
    """Every sampler field's effective value: request → preset override → fallback."""
    sent = req.model_fields_set
    rules = overrides.overrides  # one snapshot: a concurrent switch replaces the dict whole
    values: dict[str, Any] = {}
    for name, fallback in FALLBACKS.items():
        value = getattr(req, name) if name in sent else None
        rule = rules.get(name)
        if rule is not None and "override" in rule:
            value = apply_override(name, value, rule)
        values[name] = fallback if value is None else value
    return values


def split_stop(stop: Any) -> tuple[list[str], list[int]]:
    """The `stop` field → (stop strings, stop token ids)."""
    if stop is None:
        return [], []
    items = [stop] if isinstance(stop, str | int) else list(stop)
    strings = [s for s in items if isinstance(s, str) and s]
    ids = [int(s) for s in items if isinstance(s, int) and not isinstance(s, bool)]
    return strings, ids


def grammar_spec(values: dict[str, Any]) -> GrammarSpec | None:
    """The constraint asked for by `json_schema`, `regex_pattern` or `grammar_string`.

    A grammar string containing `::=` is llama.cpp GBNF, anything else Lark. At most one of
    the three may be set (400 otherwise).
    """
    specs: list[tuple[str, GrammarSpec]] = []
    schema = values.get("json_schema")
    if schema not in (None, {}, ""):
        specs.append(("json_schema", GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(schema))))
    regex = values.get("regex_pattern")
    if regex:
        specs.append(("regex_pattern", GrammarSpec(GrammarKind.REGEX, str(regex))))
    grammar = values.get("grammar_string")
    if grammar and str(grammar).strip():
        kind = GrammarKind.GBNF if "::=" in grammar else GrammarKind.LARK
        specs.append(("grammar_string", GrammarSpec(kind, str(grammar))))
    if len(specs) > 1:
        names = ", ".join(name for name, _ in specs)
        raise ApiError(400, f"only one output constraint may be set, got {names}", param=specs[1][0])
    return specs[0][1] if specs else None


async def compile_grammar(compiler: GrammarCompiler | None, spec: GrammarSpec) -> ConstraintFactory:
    """Compile `spec` with the model's compiler (None: its backend has none) in a worker
    thread (400 if it does not compile)."""
    if compiler is None:
        raise ApiError(400, "constrained decoding is not supported by this model backend")
    try:
        return await asyncio.to_thread(compiler.compile, spec)
    except GrammarError as exc:
        raise ApiError(400, str(exc), param=spec.kind.value) from None


def sampling_params(values: dict[str, Any], n_vocab: int) -> SamplingParams:
    """The engine's sampling parameters, field by field from the sampler table."""
    kwargs = engine_kwargs(values, SAMPLER_TABLE)
    allowed, banned = kwargs["allowed_token_ids"], kwargs["banned_token_ids"]
    if allowed and set(allowed) <= set(banned):
        raise ApiError(
            400, "allowed_tokens: every allowed token is also in banned_tokens", param="allowed_tokens"
        )
    return SamplingParams(**kwargs)


def build_generation(
    request_id: str,
    prompt_ids: list[int],
    values: dict[str, Any],
    n_vocab: int,
    *,
    logprobs: int | None,
    extra_stop: list[str] | None = None,
    constraint: Constraint | None = None,
    processors: list[LogitsProcessor] | None = None,
    choice: int = 0,
) -> GenerationRequest:
    """One engine request. A grammar field in `values` needs its compiled `constraint`
    (see `grammar_spec` / `compile_grammar`); without one the request is refused. With a
    seed, choice k of n uses seed + k, so n choices differ yet each is reproducible."""
    if constraint is None and grammar_spec(values) is not None:
        raise ApiError(
            400, "json_schema / regex_pattern / grammar_string are not supported on this endpoint yet"
        )
    problem = sampler_problem(values)
    if problem is not None:
        raise ApiError(400, problem[1], param=problem[0])
    strings, ids = split_stop(values["stop"])
    if extra_stop:
        strings = strings + [s for s in extra_stop if s not in strings]
    max_tokens = values["max_tokens"]
    sampling = sampling_params(values, n_vocab)
    if choice and sampling.seed is not None:
        sampling.seed = (sampling.seed + choice) & 0xFFFFFFFF
    return GenerationRequest(
        request_id=request_id,
        prompt_ids=prompt_ids,
        sampling=sampling,
        max_tokens=int(max_tokens) if max_tokens else None,
        min_tokens=int(values["min_tokens"] or 0),
        stop_strings=strings,
        stop_token_ids=ids,
        ban_eos_token=bool(values["ban_eos_token"]),
        skip_special_tokens=bool(values["skip_special_tokens"]),
        logprobs=logprobs,
        speculative_ngram=values["speculative_ngram"],
        loop_detect_window=int(values["loop_detect_window"] or 0),
        constraint=constraint,
        processors=list(processors or []),
        banned_strings=_string_list(values["banned_strings"]),
        token_healing=bool(values["token_healing"]),
        cfg_scale=float(values["cfg_scale"]),
        negative_prompt=values["negative_prompt"] or None,
        adapters=request_adapters(values["loras"]),
    )


def request_adapters(value: Any) -> tuple[tuple[str, float], ...] | None:
    """The `loras` field (a request's, or a preset's plain dicts) as (name, scaling) pairs;
    None when absent (the active adapters apply)."""
    if value is None:
        return None
    out = []
    for item in value:
        name = item.get("name") if isinstance(item, dict) else getattr(item, "name", None)
        scaling = item.get("scaling", 1.0) if isinstance(item, dict) else getattr(item, "scaling", 1.0)
        if not name:
            raise ApiError(422, "loras: every entry needs a name", param="loras")
        try:
            scale = float(1.0 if scaling is None else scaling)
        except (TypeError, ValueError):
            raise ApiError(422, f"loras: the scaling of {name!r} must be a number", param="loras") from None
        out.append((str(name), scale))
    return tuple(out)


def _string_list(value: Any) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value if v]


def tokenize_prompt(
    tokenizer: Tokenizer, text: str, *, add_bos: bool | None, bos_id: int | None
) -> list[int]:
    """Tokenize a raw prompt. add_bos None/True: the tokenizer adds BOS if its model uses one;
    False: never. A BOS already written in the text is not doubled."""
    ids = tokenizer.tokenize(text, add_bos=add_bos is not False, parse_special=True)
    if bos_id is not None and len(ids) >= 2 and ids[0] == bos_id and ids[1] == bos_id:
        ids = ids[1:]
    return ids


async def run_sized(size_chars: int, offload_chars: int, fn: Callable[[], T]) -> T:
    """Run `fn` (tokenizing, chat templating) in a worker thread when its input is bigger than
    `offload_chars` (`limits.offload_tokenize_chars`), so a big prompt never stalls the event
    loop and every stream on it; small inputs run inline (a thread hop costs more). The caller
    must hold the model's lease (nothing is closed under the worker)."""
    if size_chars > offload_chars:
        return await asyncio.to_thread(fn)
    return fn()
