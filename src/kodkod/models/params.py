"""Model load parameters: what a load asks for, and how it maps onto llama.cpp.

`ModelLoadParams` is the merged result of config / request / `tabby_config.yml` (merging lives
in the manager). The mapping functions here are pure:

* `cache_types(mode)` — TabbyAPI cache modes → llama.cpp KV types. FP16→f16; Q8→q8_0; Q6→q8_0
  (llama.cpp has no 6-bit cache type, so the nearest type at least as precise); Q4→q4_0;
  "K,V" bit pairs (2..8) per component with the same rule (8,7,6→q8_0, 5→q5_1, ≤4→q4_0);
  llama.cpp type names (f16, q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl, bf16, f32) pass through,
  also as "k_type,v_type".
* `context_sizes()` — max_seq_len / cache_size rules of reference §11.8 (exl3 era): an unset
  max_seq_len is the model's trained context; cache_size defaults to max_seq_len and is rounded
  up to a multiple of 256; max_seq_len never exceeds cache_size.
* `rope_settings()` — linear `rope_scale` → llama.cpp `rope_freq_scale = 1/scale`; NTK
  `rope_alpha` → `rope_freq_base = base · alpha^(d/(d-2))`, with "auto" derived from the ratio
  of max_seq_len to the trained context.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

DEFAULT_MAX_BATCH_SIZE = 32

_LLAMA_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
_MODES = {"FP16": ("f16", "f16"), "Q8": ("q8_0", "q8_0"), "Q6": ("q8_0", "q8_0"), "Q4": ("q4_0", "q4_0")}


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
    dynamic_draft: bool = True
    ngram_match_min: int = 2


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
    vision: bool = False
    draft: DraftParams | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # config-only keys (reasoning, ...)

    def with_updates(self, **changes: Any) -> ModelLoadParams:
        return replace(self, **changes)


def _bits_type(bits: int) -> str:
    if bits >= 6:
        return "q8_0"
    if bits == 5:
        return "q5_1"
    return "q4_0"


def cache_types(mode: str) -> tuple[str, str]:
    """KV cache types (k, v) for a cache mode string; LoadParamError if unknown."""
    text = (mode or "FP16").strip()
    if text.upper() in _MODES:
        return _MODES[text.upper()]
    if text.lower() in _LLAMA_TYPES:
        return text.lower(), text.lower()
    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 2:
        if all(p.isdigit() and 2 <= int(p) <= 8 for p in parts):
            return _bits_type(int(parts[0])), _bits_type(int(parts[1]))
        if all(p.lower() in _LLAMA_TYPES for p in parts):
            return parts[0].lower(), parts[1].lower()
    raise LoadParamError(
        f"cache_mode {mode!r} is not supported; use FP16, Q8, Q6, Q4, a 'K,V' pair of bit "
        f"widths 2-8 such as '8,4', or a llama.cpp cache type ({', '.join(_LLAMA_TYPES)})"
    )


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def context_sizes(n_ctx_train: int, max_seq_len: int | None, cache_size: int | None) -> tuple[int, int]:
    """(max_seq_len, cache_size) for a model trained on n_ctx_train tokens."""
    native = n_ctx_train if n_ctx_train > 0 else 8192
    seq = native if max_seq_len in (None, 0, -1) else int(max_seq_len)  # type: ignore[arg-type]
    if seq < 16:
        raise LoadParamError(f"max_seq_len {seq} is too small (at least 16)")
    cache = seq if cache_size is None else int(cache_size)
    if cache <= 0:
        raise LoadParamError(f"cache_size {cache} must be positive")
    cache = round_up(cache, 256)
    return min(seq, cache), cache


def auto_rope_alpha(max_seq_len: int, n_ctx_train: int) -> float:
    """NTK alpha for stretching n_ctx_train to max_seq_len (1.0 when no stretch is needed)."""
    ratio = max_seq_len / n_ctx_train if n_ctx_train > 0 else 1.0
    if ratio <= 1.0:
        return 1.0
    return -0.13436 + 0.80541 * ratio + 0.28833 * ratio * ratio


def rope_settings(
    params: ModelLoadParams, *, max_seq_len: int, n_ctx_train: int, freq_base: float, head_dim: int
) -> tuple[float, float]:
    """(rope_freq_scale, rope_freq_base) to pass to llama.cpp; 0.0 means "from the model"."""
    scale = 0.0
    if params.rope_scale not in (None, 1.0):
        if params.rope_scale <= 0:  # type: ignore[operator]
            raise LoadParamError("rope_scale must be positive")
        scale = 1.0 / float(params.rope_scale)  # type: ignore[arg-type]
    alpha_value = params.rope_alpha
    if alpha_value is None or alpha_value == "auto":
        alpha = auto_rope_alpha(max_seq_len, n_ctx_train)
    else:
        try:
            alpha = float(alpha_value)
        except (TypeError, ValueError):
            raise LoadParamError(f"rope_alpha must be a number or 'auto', not {alpha_value!r}") from None
        if alpha <= 0:
            raise LoadParamError("rope_alpha must be positive")
    base = 0.0
    if alpha != 1.0 and head_dim > 2 and freq_base > 0:
        base = freq_base * alpha ** (head_dim / (head_dim - 2))
    return scale, base
