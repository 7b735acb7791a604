"""Speculative decoding settings (engine-wide) and per-sequence state.

`SpecConfig` comes from the model's `draft_model` section (config.yml, or a load request):

* `mode` — "model": every request drafts with the loaded draft model; "ngram": every request
  drafts from n-gram lookups in its own tokens; "off": only requests that ask
  (`speculative_ngram: true`) draft, with n-grams.
* `num_tokens` — draft_num_tokens, the most tokens drafted per step (None: a default per kind).
* `dynamic` — adapt the draft length to measured acceptance and cost, and back off when
  drafting does not pay (dynamic_draft; also on when draft_num_tokens is not set); off:
  static speculation, every sequence drafts `num_tokens` every step (length permitting).
* `ngram_match_min` — the shortest tail that n-gram drafting follows.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kodkod.engine.speculative.ngram import NgramIndex
from kodkod.engine.speculative.policy import Acceptance

DEFAULT_MODEL_TOKENS = 16
DEFAULT_NGRAM_TOKENS = 12
NGRAM_SPAN = 2  # n-gram lengths tried: ngram_match_min .. ngram_match_min + NGRAM_SPAN


class SpecMode(str, enum.Enum):
    MODEL = "model"
    NGRAM = "ngram"
    OFF = "off"


@dataclass(frozen=True, slots=True)
class SpecConfig:
    mode: SpecMode = SpecMode.OFF
    num_tokens: int | None = None
    dynamic: bool = True
    ngram_match_min: int = 2

    def max_tokens(self, uses_model: bool) -> int:
        if self.num_tokens is not None:
            return self.num_tokens
        return DEFAULT_MODEL_TOKENS if uses_model else DEFAULT_NGRAM_TOKENS


@dataclass(slots=True)
class SpecState:
    """How one sequence drafts, and how well its drafts have done."""

    uses_model: bool  # draft model; else n-gram lookups
    max_tokens: int
    acceptance: Acceptance
    ngram: NgramIndex | None = None
    proposal: list[int] = field(default_factory=list)  # this step's n-gram proposal
    buckets: list[int] = field(default_factory=list)  # this step's draft confidence buckets
    want: int = 0  # tokens to draft this step (decided by the policy)
