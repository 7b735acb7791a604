"""`kodkod models derive`: another precision of a GGUF model, via llama.cpp's quantize API.

    kodkod models derive SmolLM2-135M-Instruct --type f32        → SmolLM2-135M-Instruct-F32/

Tests and benchmarks need a target/draft pair that shares a vocabulary, offline: the F32 (or
F16 / Q8_0) copy of the default Q4_1 model is a slower, more precise target for which the
original is a natural draft. `llama_model_quantize` converts every tensor; a quantised source
tensor is dequantised to F32 first (which llama.cpp only does with `allow_requantize`), and
`pure` applies the one requested type to every weight matrix (no per-tensor k-quant mixes).
The result is written to a temporary file and moved into `<model_dir>/<name>/` atomically, so
a file that exists is complete; deriving again when it exists is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kodkod.fsutil import fsync_file
from kodkod.models.registry import ModelEntry, resolve

# llama_ftype values (llama.h) and the name part each derived file gets
Quantizer = Callable[[Path, Path, int, int], int]
"""(source GGUF, destination, LLAMA_FTYPE_*, threads) → the library's status code (0 = done)."""

FTYPES: dict[str, tuple[int, str]] = {
    "f32": (0, "F32"),  # LLAMA_FTYPE_ALL_F32
    "f16": (1, "F16"),  # LLAMA_FTYPE_MOSTLY_F16
    "q8_0": (7, "Q8_0"),  # LLAMA_FTYPE_MOSTLY_Q8_0
}


class DeriveError(Exception):
    """The model could not be derived (one-line message)."""


@dataclass(frozen=True, slots=True)
class Derived:
    name: str
    path: Path
    created: bool  # False: it already existed


def derived_name(source: str, kind: str) -> str:
    return f"{Path(source).name}-{FTYPES[kind][1]}"


def _file_name(entry: ModelEntry, kind: str) -> str:
    stem = entry.gguf.stem  # SmolLM2-135M-Instruct.Q4_1 → SmolLM2-135M-Instruct.F32
    base = stem.rsplit(".", 1)[0] if "." in stem else stem
    return f"{base}.{FTYPES[kind][1]}.gguf"


def derive(
    model_dir: Path,
    source: str,
    kind: str,
    name: str | None = None,
    n_threads: int = 0,
    *,
    quantize: Quantizer,
) -> Derived:
    """Write `<model_dir>/<name>/<file>.gguf` with every weight in `kind` (f32, f16, q8_0);
    `quantize` is the inference library's converter, chosen by the caller
    (`backends.llamacpp.quantize.quantize_model`)."""
    kind = kind.lower()
    if kind not in FTYPES:
        raise DeriveError(f"unknown type {kind!r}; choose one of {', '.join(FTYPES)}")
    try:
        entry = resolve(model_dir, source)
    except ValueError as exc:
        raise DeriveError(str(exc)) from None
    if "-00001-of-" in entry.gguf.name:
        raise DeriveError("split GGUF sources are not supported")
    name = name or derived_name(source, kind)
    if not name or name != Path(name).name or name in (".", "..") or name.startswith("."):
        raise DeriveError(f"invalid model name {name!r}: a folder name inside the model directory")
    folder = model_dir / name
    out = folder / _file_name(entry, kind)
    if out.is_file():
        return Derived(name, out, False)
    if folder.exists() and any(p.suffix.lower() == ".gguf" for p in folder.iterdir()):
        raise DeriveError(f"{folder} already holds another GGUF file")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{out.name}.part"
    _quantize(quantize, entry.gguf, tmp, FTYPES[kind][0], n_threads)
    fsync_file(tmp)  # the whole file is on disk before it takes the final name
    os.replace(tmp, out)
    return Derived(name, out, True)


def _quantize(quantize: Quantizer, src: Path, dst: Path, ftype: int, n_threads: int) -> None:
    try:
        rc = quantize(src, dst, ftype, n_threads)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    if rc != 0:
        dst.unlink(missing_ok=True)
        raise DeriveError(f"llama.cpp could not convert {src.name} (status {rc})")
