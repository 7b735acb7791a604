"""Sizing the llama.cpp context of a model (and of its draft) from load parameters + metadata.

`plan_context(params, info, n_threads)` decides once, from the model's GGUF metadata, every
number the engine and the backend need: max_seq_len / cache_size, batch and
chunk sizes, KV types with flash attention forced on when the V cache is quantised, and RoPE.
A draft model shares the main model's pool geometry (`draft_context`): the same number of slots,
cells and KV layout, so a drafted sequence can always mirror its target.

`kv_layout: per_slot` gives each of `max_batch_size` slots its own KV stream of
`cache_size / max_batch_size` cells, rounded up to 256 as llama.cpp does (`slot_cells`). A
request can then be at most that long: an unset max_seq_len (the trained context) is capped to
it, one set explicitly above it is refused with the numbers that would make it fit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kodkod.core.backend_types import ContextConfig, ModelInfo
from kodkod.models.params import (
    DEFAULT_MAX_BATCH_SIZE,
    DraftParams,
    LoadParamError,
    ModelLoadParams,
    RopeSettings,
    cache_types,
    clamp_chunk_size,
    context_sizes,
    needs_flash_attention,
    rope_settings,
)
from kodkod.settings.cache_mode import normalise_cache_mode

log = logging.getLogger(__name__)

MAX_SLOTS = 256


@dataclass(frozen=True, slots=True)
class ContextPlan:
    max_seq_len: int
    cache_size: int
    cache_mode: str  # as reported (normalised)
    max_batch_size: int
    chunk_size: int
    num_slots: int
    rope: RopeSettings
    config: ContextConfig
    cells_per_slot: int = 0  # per-slot KV streams: each slot's cells; 0: one shared pool


def round_up_256(n: int) -> int:
    return -(-n // 256) * 256


def slot_cells(cache_size: int, num_slots: int) -> int:
    """Cells of each slot's stream as llama.cpp sizes it (n_ctx and each stream padded to 256)."""
    return round_up_256(round_up_256(cache_size) // num_slots)


def tiled_attention(config: ContextConfig) -> bool:
    """Whether llama.cpp's CPU flash attention may run its tiled kernel in this context: flash
    attention on, K and V of one type, f32 or f16 (the engine then keeps decode steps in the
    shared pool under its row threshold, engine/decode_rows.py)."""
    return config.flash_attention and config.cache_type_k == config.cache_type_v in ("f32", "f16")


def per_slot_max_seq_len(params: ModelLoadParams, max_seq_len: int, cells: int, num_slots: int) -> int:
    """max_seq_len under per-slot streams: capped to a slot's cells when it was not set,
    refused when it was set above them."""
    if max_seq_len <= cells:
        return max_seq_len
    if params.max_seq_len not in (None, 0):
        raise LoadParamError(
            f"kv_layout per_slot gives each of the {num_slots} slots (max_batch_size) "
            f"{cells} KV cells, so max_seq_len {max_seq_len} cannot fit one request: set "
            f"max_seq_len <= {cells}, or cache_size >= {round_up_256(max_seq_len) * num_slots}, "
            "or fewer slots (max_batch_size), or kv_layout unified"
        )
    log.info("kv_layout per_slot: max_seq_len capped to the %d cells of each of %d slots", cells, num_slots)
    return cells


def n_ctx_train(info: ModelInfo) -> int:
    """The trained context; read from metadata when llama.cpp did not load hparams (vocab-only)."""
    if info.n_ctx_train > 0:
        return info.n_ctx_train
    try:
        return int(info.metadata.get(f"{info.architecture}.context_length", "0") or 0)
    except ValueError:
        return 0


def _rope_geometry(info: ModelInfo) -> tuple[float, int]:
    arch, meta = info.architecture, info.metadata

    def num(key: str, default: float) -> float:
        try:
            return float(meta.get(f"{arch}.{key}", "") or default)
        except ValueError:
            return default

    heads = int(num("attention.head_count", 0))
    embd = int(num("embedding_length", 0))
    head_dim = int(num("attention.key_length", 0)) or (embd // heads if heads else 0)
    return num("rope.freq_base", 10000.0), head_dim


def _kv(cache_mode: str, flash_attention: bool, who: str) -> tuple[str, str, bool]:
    type_k, type_v = cache_types(cache_mode)
    if needs_flash_attention(type_v) and not flash_attention:
        log.info(
            "%s: cache_mode %s quantises the V cache, which needs flash attention; turning it on",
            who,
            cache_mode,
        )
        flash_attention = True
    return type_k, type_v, flash_attention


def plan_context(params: ModelLoadParams, info: ModelInfo, n_threads: int) -> ContextPlan:
    trained = n_ctx_train(info)
    max_seq_len, cache_size = context_sizes(trained, params.max_seq_len, params.cache_size)
    type_k, type_v, flash = _kv(params.cache_mode, params.flash_attention, info.name)
    batch = params.max_batch_size or DEFAULT_MAX_BATCH_SIZE
    per_slot = params.kv_layout == "per_slot"
    # per-slot streams: one slot per running request, like llama-server's -np (every extra slot
    # would take its share of the cells); one pool: spare slots keep finished prefixes cached
    num_slots = min(MAX_SLOTS, batch) if per_slot else min(MAX_SLOTS, batch + max(8, batch))
    cells = slot_cells(cache_size, num_slots) if per_slot else 0
    if per_slot:
        max_seq_len = per_slot_max_seq_len(params, max_seq_len, cells, num_slots)
    chunk = clamp_chunk_size(params.chunk_size, max_seq_len)
    freq_base, head_dim = _rope_geometry(info)
    rope = rope_settings(
        params.rope_scale,
        params.rope_alpha,
        max_seq_len=max_seq_len,
        n_ctx_train=trained,
        freq_base=freq_base,
        head_dim=head_dim,
    )
    config = ContextConfig(
        cache_size=cache_size,
        num_slots=num_slots,
        batch_tokens=max(chunk, batch * 8),
        n_threads=n_threads,
        cache_type_k=type_k,
        cache_type_v=type_v,
        flash_attention=flash,
        rope_freq_scale=rope.freq_scale,
        rope_freq_base=rope.freq_base,
        kv_unified=not per_slot,
    )
    return ContextPlan(
        max_seq_len,
        cache_size,
        normalise_cache_mode(params.cache_mode),
        batch,
        chunk,
        num_slots,
        rope,
        config,
        cells,
    )


def draft_context(
    draft: DraftParams, info: ModelInfo, main: ContextPlan, flash_attention: bool
) -> ContextPlan:
    """The draft's context: the main model's slots, cells and KV layout, its own cache mode
    and RoPE."""
    trained = n_ctx_train(info)
    type_k, type_v, flash = _kv(draft.draft_cache_mode, flash_attention, info.name)
    freq_base, head_dim = _rope_geometry(info)
    rope = rope_settings(
        draft.draft_rope_scale,
        draft.draft_rope_alpha,
        max_seq_len=main.max_seq_len,
        n_ctx_train=trained,
        freq_base=freq_base,
        head_dim=head_dim,
    )
    config = ContextConfig(
        cache_size=main.cache_size,
        num_slots=main.num_slots,
        batch_tokens=main.config.batch_tokens,
        n_threads=main.config.n_threads,
        cache_type_k=type_k,
        cache_type_v=type_v,
        flash_attention=flash,
        rope_freq_scale=rope.freq_scale,
        rope_freq_base=rope.freq_base,
        kv_unified=main.config.kv_unified,
    )
    return ContextPlan(
        main.max_seq_len,
        main.cache_size,
        normalise_cache_mode(draft.draft_cache_mode),
        main.max_batch_size,
        main.chunk_size,
        main.num_slots,
        rope,
        config,
        main.cells_per_slot,
    )
