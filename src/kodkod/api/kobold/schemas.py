"""Request schemas of the KoboldAI endpoints.

`KoboldGenerateRequest` is the shared sampler schema (`api.sampling.SamplerRequest`, which
already accepts Kobold's aliases `max_length`, `rep_pen`, `rep_pen_range`, `stop_sequence`,
`sampler_seed`, `dynatemp_exponent`, …) plus the Kobold-only fields. Kobold names whose meaning
differs from the shared field are mapped onto it here, on the request itself, so the sampler
override preset sees them exactly like the OpenAI fields:

- `banned_tokens`: KoboldCpp/KoboldAI Lite send phrases (strings) → `banned_strings`; integer
  ids stay token bans.
- `use_default_badwordsids` / `bypass_eos` true → `ban_eos_token` true.
- `rep_pen_range` (any `penalty_range` alias) 0 → −1, "the whole context".
- `grammar` (KoboldCpp's GBNF grammar) → `grammar_string`.
- `render_special` → `skip_special_tokens = not render_special`.

Fields that need the resolved temperature (`dynatemp_range`) or a whole-request decision
(`memory`, `trim_stop`, `singleline`) are applied in `kobold.convert`. The Kobold-only
generation fields are declared in `api.sampler_table` (surface KOBOLD) like the shared ones;
`nsigma` is the shared `top_n_sigma` under its Kobold name, on every surface. Fields Kobold
clients send that have no effect here (`max_context_length`: the prompt is not truncated to it;
`sampler_order`, `rep_pen_slope`, `n` (one result), `logprobs` (no Kobold logprobs are
returned), `use_story`, `quiet`, …) are ignored like any unknown field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from kodkod.api.sampler_table import Surface, request_fields, shared_names
from kodkod.api.sampling import SamplerRequest

if TYPE_CHECKING:
    _KoboldFields = SamplerRequest
else:  # the Kobold-only rows of the sampler table
    _KoboldFields = create_model(
        "_KoboldFields",
        __base__=SamplerRequest,
        **request_fields(Surface.KOBOLD, exclude=shared_names()),
    )


class KoboldGenerateRequest(_KoboldFields):
    """Body of /api/v1/generate and /api/extra/generate/stream."""

    prompt: str
    memory: str | None = None
    genkey: str | None = None
    if TYPE_CHECKING:  # read and rewritten below (the field itself comes from the table)
        penalty_range: int | None

    @model_validator(mode="before")
    @classmethod
    def _phrase_bans(cls, data: Any) -> Any:
        """Kobold's `banned_tokens` holds phrases: move strings to `banned_strings`."""
        if not isinstance(data, dict):
            return data
        bans = data.get("banned_tokens")
        if not isinstance(bans, list) or not any(isinstance(b, str) for b in bans):
            return data
        phrases = [b for b in bans if isinstance(b, str) and b]
        ids = [b for b in bans if not isinstance(b, str)]
        current = data.get("banned_strings")
        if isinstance(current, str):
            current = [current] if current else []
        data = dict(data)
        data["banned_tokens"] = ids
        if phrases:
            data["banned_strings"] = list(current or []) + phrases
        return data

    @model_validator(mode="after")
    def _kobold_meanings(self) -> KoboldGenerateRequest:
        sent = self.model_fields_set
        if self.use_default_badwordsids or self.bypass_eos:
            self.ban_eos_token = True  # assignment marks the field as sent
        if "penalty_range" in sent and self.penalty_range == 0:
            self.penalty_range = -1
        if self.grammar and "grammar_string" not in sent:
            self.grammar_string = self.grammar
        if self.render_special is not None and "skip_special_tokens" not in sent:
            self.skip_special_tokens = not self.render_special
        return self


class TokenCountRequest(BaseModel):
    """Body of /api/extra/tokencount. `special` (KoboldCpp) decides whether BOS is added."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = ""
    special: bool = Field(True, description="add the model's BOS token like a prompt would")
