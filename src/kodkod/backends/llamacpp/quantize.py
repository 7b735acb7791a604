"""llama.cpp's model quantize API, for `kodkod models derive` (models/derive.py)."""

from __future__ import annotations

from pathlib import Path

import llama_cpp as L

from kodkod.backends.llamacpp.model import init_llama


def quantize_model(src: Path, dst: Path, ftype: int, n_threads: int) -> int:
    """Write `src` converted to `ftype` (a `LLAMA_FTYPE_*`) to `dst`; llama.cpp's status code.

    Quantised source tensors are dequantised first (`allow_requantize`), and `pure` applies the
    one type to every weight matrix (no per-tensor k-quant mixes)."""
    init_llama()
    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads
    params.allow_requantize = True
    params.pure = True
    return int(L.llama_model_quantize(str(src).encode(), str(dst).encode(), params))
