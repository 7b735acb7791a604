"""Model load parameters: what a load asks for, and the pure rules that map it onto llama.cpp.

`ModelLoadParams` / `DraftParams` are the merged result of config, request and
`tabby_config.yml` (merging lives in `models/loading.py`); `LoadPlan` adds the resolved files.

* `cache_types(mode)` — TabbyAPI cache modes → llama.cpp KV types (k, v):

      FP16 → f16,f16     Q8 → q8_0,q8_0     Q6 → q8_0,q8_0     Q4 → q4_0,q4_0
      "K,V" bit pairs 2..8, per component: 8,7,6 → q8_0; 5 → q5_1; 4,3,2 → q4_0
      llama.cpp type names (f32 f16 bf16 q8_0 q5_1 q5_0 q4_1 q4_0 iq4_nl), also as "k,v"

  llama.cpp has no 6-bit cache type, so 6 (and 7) bits take the nearest type that is at
  least as precise: q8_0 (q5_1 holds only 5 value bits). Likewise 2 and 3 bits use q4_0.
  A quantised V cache needs flash attention in llama.cpp; `needs_flash_attention()` says when.
* `rope_settings()` — linear `rope_scale` → `rope_freq_scale = 1/scale`; NTK `rope_alpha` →
  `rope_freq_base = base · alpha^(d/(d-2))` (d = head dim), "auto"/null derived from the
  ratio of max_seq_len to the trained context with TabbyAPI's formula.
* `gpu_placement()` — the GPU fields of a load → llama.cpp split options, or a
  LoadParamError saying "no GPU in this build" when llama.cpp was built without one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kodkod.models.registry import ModelEntry

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_AUTOSPLIT_RESERVE_MB = (96.0,)

LLAMA_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
_UNQUANTISED = frozenset({"f32", "f16", "bf16"})
_MODES = {"FP16": ("f16", "f16"), "Q8": ("q8_0", "q8_0"), "Q6": ("q8_0", "q8_0"), "Q4": ("q4_0", "q4_0")}
_BACKENDS = frozenset({"", "auto", "llamacpp", "llama.cpp", "llama_cpp", "llama-cpp"})


class LoadParamError(ValueError):
    """A load parameter is invalid (message names the field; answered with 400)."""


@dataclass(slots=True)
class DraftParams:
    draft_model_name: str | None = None
    draft_rope_scale: float | None = None
    draft_rope_alpha: float | str | None = None
    draft_cache_mode: str = "FP16"
    draft_gpu_split: list[float] = field(default_factory=list)
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
    """llama.cpp split options for a GPU build (never built on a CPU-only build)."""

    split_mode: str  # "none" | "layer" | "row"
    tensor_split: tuple[float, ...] = ()  # proportions per device; () = by free memory


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
    output_chunking: bool = True  # accepted; llama.cpp's unified KV pool needs no output chunks
    placement: GpuPlacement | None = None
    draft: DraftParams | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # config-only keys (reasoning, ...)


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """Everything a load needs: the model file, its parameters and the draft file."""

    entry: ModelEntry
    params: ModelLoadParams
    draft_entry: ModelEntry | None = None


@dataclass(frozen=True, slots=True)
class RopeSettings:
    scale: float  # linear scale as asked (1.0 = none)
    alpha: float  # NTK alpha actually used (1.0 = none)
    freq_scale: float  # for llama.cpp; 0.0 = from the model
    freq_base: float  # for llama.cpp; 0.0 = from the model


def _bits_type(bits: int) -> str:
    if bits >= 6:
        return "q8_0"
    if bits == 5:
        return "q5_1"
    return "q4_0"


def cache_types(mode: str | None) -> tuple[str, str]:
    """KV cache types (k, v) for a cache mode string; LoadParamError if unknown."""
    text = (mode or "FP16").strip()
    if text.upper() in _MODES:
        return _MODES[text.upper()]
    if text.lower() in LLAMA_CACHE_TYPES:
        return text.lower(), text.lower()
    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 2:
        if all(p.isdigit() and 2 <= int(p) <= 8 for p in parts):
            return _bits_type(int(parts[0])), _bits_type(int(parts[1]))
        if all(p.lower() in LLAMA_CACHE_TYPES for p in parts):
            return parts[0].lower(), parts[1].lower()
    raise LoadParamError(
        f"cache_mode {mode!r} is not supported; use FP16, Q8, Q6, Q4, a 'K,V' pair of bit "
        f"widths 2-8 such as '8,4', or llama.cpp cache types ({', '.join(LLAMA_CACHE_TYPES)}) "
        "alone or as a 'k,v' pair"
    )


def normalise_cache_mode(mode: str | None) -> str:
    """The cache mode as reported back: FP16/Q8/Q6/Q4 upper-case, pairs without spaces."""
    text = (mode or "FP16").strip()
    cache_types(text)
    if text.upper() in _MODES:
        return text.upper()
    return ",".join(p.strip().lower() for p in text.split(","))


def needs_flash_attention(type_v: str) -> bool:
    """llama.cpp refuses a quantised V cache without flash attention."""
    return type_v not in _UNQUANTISED


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


def check_backend(backend: str | None) -> None:
    if backend is not None and str(backend).strip().lower() not in _BACKENDS:
        raise LoadParamError(
            f"backend {backend!r} is not available: this server runs GGUF models on llama.cpp "
            "only (leave backend unset)"
        )


def gpu_placement(
    *,
    gpu_available: bool,
    gpu_split_auto: bool = True,
    gpu_split: list[float] | None = None,
    tensor_parallel: bool = False,
    tensor_parallel_backend: str = "native",
    autosplit_reserve: list[float] | None = None,
    draft_gpu_split: list[float] | None = None,
) -> GpuPlacement | None:
    """Validate the GPU fields and map them onto llama.cpp's split options.

    Without a GPU in the llama.cpp build, anything that asks for GPU placement is refused
    (never silently ignored): a manual `gpu_split`, `tensor_parallel: true`, a non-default
    `autosplit_reserve` or a `draft_gpu_split`. `gpu_split_auto` (true or false) alone is
    fine: with no GPU there is nothing to split. With a GPU: tensor_parallel → row split,
    gpu_split → layer split in those proportions (GB per device), autosplit → layer split by
    free memory; `autosplit_reserve` has no llama.cpp counterpart and is refused.
    """
    if tensor_parallel_backend not in ("native", "nccl"):
        raise LoadParamError("tensor_parallel_backend must be 'native' or 'nccl'")
    split = [float(x) for x in (gpu_split or [])]
    reserve = tuple(float(x) for x in (autosplit_reserve or DEFAULT_AUTOSPLIT_RESERVE_MB))
    if any(x < 0 for x in split):
        raise LoadParamError("gpu_split values must not be negative")
    if not gpu_available:
        asked = [
            name
            for name, used in (
                ("gpu_split", bool(split)),
                ("tensor_parallel", tensor_parallel),
                ("autosplit_reserve", reserve != DEFAULT_AUTOSPLIT_RESERVE_MB),
                ("draft_gpu_split", bool(draft_gpu_split)),
            )
            if used
        ]
        if asked:
            raise LoadParamError(
                f"{', '.join(asked)}: no GPU in this build (llama.cpp was built for CPU only); "
                "remove these fields"
            )
        return None
    if reserve != DEFAULT_AUTOSPLIT_RESERVE_MB:
        raise LoadParamError(
            "autosplit_reserve is not supported by the llama.cpp backend (it splits by free "
            "memory); use gpu_split to set the share of each GPU"
        )
    if tensor_parallel:
        total = sum(split)
        return GpuPlacement("row", tuple(x / total for x in split) if total else ())
    if split:
        total = sum(split)
        if total <= 0:
            raise LoadParamError("gpu_split must give at least one GPU a positive amount")
        return GpuPlacement("layer", tuple(x / total for x in split))
    return GpuPlacement("layer" if gpu_split_auto else "none")
