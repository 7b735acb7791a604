"""From a Kobold generate request to an engine request, through the shared conversion.

The sampler fields go through `api.convert.resolve_fields` (so sampler override presets apply to
Kobold requests too) and `api.convert.build_generation` (which refuses contradictory
combinations with a 400 naming the field). On top of that, the Kobold-only rules:

- the prompt is `memory + prompt`, used as-is (no chat template);
- `dynatemp_range` r > 0: `min_temp = max(0, temperature − r)`, `max_temp = temperature + r`,
  from the resolved temperature;
- `trim_stop: false` keeps the matched stop sequence in the output (KoboldCpp's meaning; the
  default, like KoboldCpp's, trims it);
- `singleline: true` stops at the first newline;
- `grammar` (mapped to `grammar_string` by the schema) is compiled by the shared
  `compile_grammar`, like the OpenAI endpoints' grammars;
- `nsigma` is `top_n_sigma` (an alias in the sampler table), as on the OpenAI endpoints.
"""

from __future__ import annotations

from typing import Any

from kodkod.api.convert import (
    build_generation,
    compile_grammar,
    grammar_spec,
    resolve_fields,
    run_sized,
    tokenize_prompt,
)
from kodkod.api.kobold.schemas import KoboldGenerateRequest
from kodkod.api.state import OverrideState
from kodkod.api.validation import check_generation_limits
from kodkod.core.types import FinishEvent, FinishReason, GenerationRequest
from kodkod.models.manager import LoadedModel
from kodkod.settings import LimitsSettings


def kobold_values(req: KoboldGenerateRequest, overrides: OverrideState) -> dict[str, Any]:
    """The resolved shared sampler values of a Kobold request."""
    values = resolve_fields(req, overrides)
    spread = req.dynatemp_range or 0.0
    if spread > 0:
        temperature = float(values["temperature"])
        values["min_temp"] = max(0.0, temperature - spread)
        values["max_temp"] = temperature + spread
    return values


async def kobold_generation(
    req: KoboldGenerateRequest,
    request_id: str,
    model: LoadedModel,
    overrides: OverrideState,
    limits: LimitsSettings,
) -> GenerationRequest:
    """One engine request for a Kobold generate call (Kobold has no `n`)."""
    values = kobold_values(req, overrides)
    check_generation_limits(values, limits)
    spec = grammar_spec(values)
    factory = await compile_grammar(model.grammar, spec) if spec is not None else None
    text = (req.memory or "") + req.prompt
    ids = await run_sized(
        len(text),
        limits.offload_tokenize_chars,
        lambda: tokenize_prompt(
            model.tokenizer, text, add_bos=values["add_bos_token"], bos_id=model.info.bos_id
        ),
    )
    gen = build_generation(
        request_id,
        ids,
        values,
        model.info.n_vocab,
        logprobs=None,
        extra_stop=["\n"] if req.singleline else None,
        constraint=factory.new() if factory is not None else None,
    )
    if req.trim_stop is False:
        gen.include_stop_str_in_output = True
    return gen


def finish_reason(ev: FinishEvent) -> str:
    """KoboldCpp's vocabulary: "length" when the token limit ended it, else "stop"."""
    return "length" if ev.reason is FinishReason.LENGTH else "stop"
