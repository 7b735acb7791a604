"""TabbyAPI cache modes → llama.cpp KV cache types.

    FP16 → f16,f16     Q8 → q8_0,q8_0     Q6 → q8_0,q8_0     Q4 → q4_0,q4_0
    "K,V" bit pairs 2..8, per component: 8,7,6 → q8_0; 5 → q5_1; 4,3,2 → q4_0
    llama.cpp type names (f32 f16 bf16 q8_0 q5_1 q5_0 q4_1 q4_0 iq4_nl), also as "k,v"

llama.cpp has no 6-bit cache type, so 6 (and 7) bits take the nearest type that is at least
as precise: q8_0 (q5_1 holds only 5 value bits). Likewise 2 and 3 bits use q4_0. A quantised
V cache needs flash attention in llama.cpp (`models.context` turns it on). The load-parameter
table checks `cache_mode` / `draft_cache_mode` with `normalise_cache_mode` on every surface.
"""

from __future__ import annotations

LLAMA_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
UNQUANTISED = frozenset({"f32", "f16", "bf16"})
_MODES = {"FP16": ("f16", "f16"), "Q8": ("q8_0", "q8_0"), "Q6": ("q8_0", "q8_0"), "Q4": ("q4_0", "q4_0")}


def _bits_type(bits: int) -> str:
    if bits >= 6:
        return "q8_0"
    if bits == 5:
        return "q5_1"
    return "q4_0"


def parse_cache_mode(mode: str | None) -> tuple[str, str]:
    """KV cache types (k, v) for a cache mode string; ValueError naming cache_mode if unknown."""
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
    raise ValueError(
        f"cache_mode {mode!r} is not supported; use FP16, Q8, Q6, Q4, a 'K,V' pair of bit "
        f"widths 2-8 such as '8,4', or llama.cpp cache types ({', '.join(LLAMA_CACHE_TYPES)}) "
        "alone or as a 'k,v' pair"
    )


def normalise_cache_mode(mode: str | None) -> str:
    """The cache mode as reported back: FP16/Q8/Q6/Q4 upper-case, pairs without spaces."""
    text = (mode or "FP16").strip()
    parse_cache_mode(text)
    if text.upper() in _MODES:
        return text.upper()
    return ",".join(p.strip().lower() for p in text.split(","))
