"""What the llama.cpp library in use was built with, as llama.cpp itself reports it."""

from __future__ import annotations

import llama_cpp as L


def system_info() -> str:
    """llama.cpp's own feature line (compiled CPU features per backend, e.g. `AVX2 = 1`)."""
    raw = L.llama_print_system_info()
    return (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)).strip()


def library_version() -> str:
    return str(getattr(L, "__version__", "unknown"))
