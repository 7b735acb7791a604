"""Engine value types: what a request asks for and the typed events it gets back.

The API layer converts its pydantic schemas into these dataclasses; the engine never sees
pydantic. Events flow from the engine thread to the request's stream:

    TokenEvent*  then exactly one of  FinishEvent | ErrorEvent

`SamplingParams` holds every generation parameter in its normalised form (aliases resolved,
neutral values meaning "off"); `core.sampling.stages` turns it into the ordered stage list.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

AdapterKey = tuple[tuple[int, float], ...]
"""The LoRA set a sequence runs with: (adapter id, scale) pairs sorted by id, zero scales left
out; () is the base model. Equal keys mean identical weights, so the key also scopes the prefix
cache (KV computed under one adapter set is never reused under another)."""


@dataclass(slots=True)
class SamplingParams:
    """Normalised sampler settings. A neutral value disables its stage."""

    temperature: float = 1.0
    temperature_last: bool = False
    min_temp: float = 1.0
    max_temp: float = 1.0
    temp_exponent: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    top_a: float = 0.0
    typical: float = 1.0
    tfs: float = 1.0
    skew: float = 0.0
    smoothing_factor: float = 0.0
    smoothing_curve: float = 1.0
    top_n_sigma: float = 0.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_range: int = -1  # -1 = whole context
    repetition_decay: int = 0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_range: int = 0  # 0 = whole context
    dry_sequence_breakers: list[str] = field(default_factory=list)
    mirostat_mode: int = 0
    mirostat_tau: float = 1.5
    mirostat_eta: float = 0.3
    adaptive_target: float = 1.0
    adaptive_decay: float = 0.9
    logit_bias: dict[int, float] = field(default_factory=dict)
    banned_token_ids: list[int] = field(default_factory=list)
    allowed_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None  # None = random

    @property
    def is_greedy(self) -> bool:
        """True when the output is the argmax of the (biased, penalised) logits."""
        return self.temperature <= 0.0 or self.top_k == 1


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    ABORT = "abort"


class EosReason(str, enum.Enum):
    """Why generation ended, as reported in `eos_reason`."""

    STOP_TOKEN = "stop_token"
    STOP_STRING = "stop_string"
    MAX_NEW_TOKENS = "max_new_tokens"
    LOOP_DETECTED = "loop_detected"
    CONSTRAINT_DONE = "constraint_done"
    ABORTED = "aborted"


class ErrorKind(str, enum.Enum):
    CONTEXT_LENGTH = "context_length_exceeded"  # 400
    BAD_REQUEST = "invalid_request_error"  # 400
    UNLOADED = "model_unloaded"  # 503
    INTERNAL = "internal_error"  # 500/503


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]  # (token id, text, logprob), most likely first


@dataclass(slots=True)
class TokenEvent:
    """New output: text safe to show (complete UTF-8, no partial stop string)."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    prompt_time_s: float = 0.0
    completion_time_s: float = 0.0
    drafted_tokens: int = 0
    accepted_draft_tokens: int = 0
    queue_time_s: float = 0.0  # from reaching the engine to first running


@dataclass(slots=True)
class FinishEvent:
    reason: FinishReason
    eos_reason: EosReason
    usage: Usage
    stop_str: str | None = None


@dataclass(slots=True)
class ErrorEvent:
    message: str
    kind: ErrorKind = ErrorKind.INTERNAL


Event = TokenEvent | FinishEvent | ErrorEvent


class LogitsProcessor(Protocol):
    """A per-sequence stage that edits one logits row in place before sampling.

    `row` is a writable float32 view of the model's logits for this sequence; `output_ids`
    are the tokens generated so far. `accept` is told the token that was finally chosen.
    Used for token masks (grammars, min_tokens EOS bans) and stages llama.cpp lacks.
    """

    def process(self, row: object, output_ids: list[int]) -> None: ...

    def accept(self, token_id: int) -> None: ...


class Constraint(Protocol):
    """A grammar-like constraint: a processor that can also say the output is complete."""

    def process(self, row: object, output_ids: list[int]) -> None: ...

    def accept(self, token_id: int) -> None: ...

    def is_done(self) -> bool: ...


@dataclass(slots=True)
class GenerationRequest:
    """One sequence to generate (an API request with n choices submits n of these)."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None  # None = until the context is full
    min_tokens: int = 0
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to EOS
    ban_eos_token: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # None: no logprobs; N: the chosen token plus N alternatives
    include_stop_str_in_output: bool = False
    banned_strings: list[str] = field(default_factory=list)
    constraint: Constraint | None = None
    processors: list[LogitsProcessor] = field(default_factory=list)
    speculative_ngram: bool | None = None
    loop_detect_window: int = 0
    token_healing: bool = False
    cfg_scale: float = 1.0  # classifier-free guidance; != 1 decodes negative_prompt_ids alongside
    negative_prompt: str | None = None  # CFG negative prompt text; None: just BOS
    negative_prompt_ids: list[int] | None = None  # or already tokenized
    # LoRA adapters as (name, scale): None = the model's active adapters (/v1/lora/load),
    # () = none (the base model). See engine/adapters.py.
    adapters: tuple[tuple[str, float], ...] | None = None
