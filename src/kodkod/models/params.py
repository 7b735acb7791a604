"""Model load parameters: what a load asks for, and the pure rules that map it onto llama.cpp.

`ModelLoadParams` / `DraftParams` are the merged result of config, request and
`tabby_config.yml` (merging lives in `models/loading.py`); `LoadPlan` adds the resolved files.

* `cache_types(mode)` — TabbyAPI cache modes → llama.cpp KV types (k, v); the mapping lives in
  `settings.cache_mode` (the load-parameter table checks it on every surface).
* `rope_settings()` — linear `rope_scale` → `rope_freq_scale = 1/scale`; NTK `rope_alpha` →
  `rope_freq_base = base · alpha^(d/(d-2))` (d = head dim), "auto"/null derived from the
  ratio of max_seq_len to the trained context with TabbyAPI's formula.

Which fields exist, their types and bounds are declared in `settings.load_table`; the
dataclasses below hold the rows whose `use` is PARAM (a test checks that they match). GPU
placement is `models.placement`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kodkod.models.registry import ModelEntry
from kodkod.settings.cache_mode import UNQUANTISED, parse_cache_mode

DEFAULT_MAX_BATCH_SIZE = 32


class LoadParamError(ValueError):
    """A load parameter is invalid (message names the field; answered with 400)."""


@dataclass(slots=True)
class DraftParams:
    draft_model_name: str | None = None
    draft_rope_scale: float | None = None
    draft_rope_alpha: float | str | None = None
    draft_cache_mode: str = "FP16"
    draft_mode: str = "model"
    draft_num_tokens: int | None = None
    dynamic_draft: bool = False
    ngram_match_min: int = 2

    @property
    def wants_model(self) -> bool:
        """A separate draft model is to be loaded (draft_mode model with a name)."""
        return self.draft_mode == "model" and bool(self.draft_model_name)


@dataclass(frozen=True, slots=True)
class GpuPlacement:
    """llama.cpp split options for a GPU build or RPC workers (else never built)."""

    split_mode: str  # "none" | "layer" | "row"
    tensor_split: tuple[float, ...] = ()  # proportions per device; () = by free memory
    rpc_servers: tuple[str, ...] = ()  # RPC workers: tensor_split is then local CPU first


@dataclass(slots=True)
class ModelLoadParams:
    max_seq_len: int | None = None
    cache_size: int | None = None
    cache_mode: str = "FP16"
    chunk_size: int = 2048
    max_batch_size: int | None = None
    rope_scale: float | None = None
    rope_alpha: float | str | None = None
    prompt_template: str | None = None
    n_threads: int | None = None
    flash_attention: bool = True
    batch_invariant: bool = False  # prompts prefilled alone (engine/scheduler.py)
    kv_layout: str = "unified"  # "unified" | "per_slot" (models/context.py)
    vision: bool = False
    placement: GpuPlacement | None = None
    draft: DraftParams | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # config-only keys (reasoning, ...)


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """Everything a load needs: the model file, its parameters and the draft file."""

    entry: ModelEntry
    params: ModelLoadParams
    draft_entry: ModelEntry | None = None
    notes: tuple[str, ...] = ()  # what the load does instead of what was asked (log + progress)


@dataclass(frozen=True, slots=True)
class RopeSettings:
    scale: float  # linear scale as asked (1.0 = none)
    alpha: float  # NTK alpha actually used (1.0 = none)
    freq_scale: float  # for llama.cpp; 0.0 = from the model
    freq_base: float  # for llama.cpp; 0.0 = from the model


def cache_types(mode: str | None) -> tuple[str, str]:
    """KV cache types (k, v) for a cache mode string; LoadParamError if unknown."""
    try:
        return parse_cache_mode(mode)
    except ValueError as exc:
        raise LoadParamError(str(exc)) from None


def needs_flash_attention(type_v: str) -> bool:
    """llama.cpp refuses a quantised V cache without flash attention."""
    return type_v not in UNQUANTISED


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def context_sizes(n_ctx_train: int, max_seq_len: int | None, cache_size: int | None) -> tuple[int, int]:
    """(max_seq_len, cache_size) by TabbyAPI's current (exllamav3) rules.

    Unset (or -1) max_seq_len is the model's trained context (8192 if unknown); cache_size
    defaults to max_seq_len and is rounded up to a multiple of 256; max_seq_len never
    exceeds cache_size.
    """
    native = n_ctx_train if n_ctx_train > 0 else 8192
    seq = native if max_seq_len in (None, 0, -1) else int(max_seq_len)
    if seq < 16:
        raise LoadParamError(f"max_seq_len {seq} is too small (at least 16)")
    cache = seq if cache_size is None else int(cache_size)
    if cache <= 0:
        raise LoadParamError(f"cache_size {cache} must be positive")
    cache = round_up(cache, 256)
    return min(seq, cache), cache


def clamp_chunk_size(chunk_size: int, max_seq_len: int) -> int:
    """Prompt chunk: clamped to [16, max_seq_len] (the [24] rule; llama.cpp needs no 256s)."""
    if chunk_size <= 0:
        raise LoadParamError("chunk_size must be positive")
    return max(16, min(int(chunk_size), max_seq_len))


def auto_rope_alpha(max_seq_len: int, n_ctx_train: int) -> float:
    """NTK alpha for stretching n_ctx_train to max_seq_len (1.0 when no stretch is needed)."""
    ratio = max_seq_len / n_ctx_train if n_ctx_train > 0 else 1.0
    if ratio <= 1.0:
        return 1.0
    return -0.13436 + 0.80541 * ratio + 0.28833 * ratio * ratio


def rope_settings(
    rope_scale: float | None,
    rope_alpha: float | str | None,
    *,
    max_seq_len: int,
    n_ctx_train: int,
    freq_base: float,
    head_dim: int,
) -> RopeSettings:
    """What to pass to llama.cpp for the asked linear scale and NTK alpha."""
    scale = 1.0 if rope_scale is None else float(rope_scale)
    if scale <= 0:
        raise LoadParamError("rope_scale must be positive")
    freq_scale = 0.0 if scale == 1.0 else 1.0 / scale
    if rope_alpha is None or (isinstance(rope_alpha, str) and rope_alpha.strip().lower() == "auto"):
        alpha = auto_rope_alpha(max_seq_len, n_ctx_train)
    else:
        try:
            alpha = float(rope_alpha)
        except (TypeError, ValueError):
            raise LoadParamError(f"rope_alpha must be a number or 'auto', not {rope_alpha!r}") from None
        if alpha <= 0:
            raise LoadParamError("rope_alpha must be positive")
    freq_base_out = 0.0
    if alpha != 1.0 and head_dim > 2 and freq_base > 0:
        freq_base_out = freq_base * alpha ** (head_dim / (head_dim - 2))
    return RopeSettings(scale, alpha, freq_scale, freq_base_out)
