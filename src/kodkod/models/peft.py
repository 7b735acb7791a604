"""Hugging Face PEFT LoRA adapters → GGUF LoRA adapters llama.cpp applies (gguf package, numpy).

A PEFT adapter folder holds `adapter_config.json` and `adapter_model.safetensors`; a tensor is
named after the HF module it adapts (`base_model.model.model.layers.3.self_attn.q_proj.
lora_A.weight`): A has shape (r, in) and B (out, r). llama.cpp wants `<GGUF tensor>.lora_a` /
`.lora_b` with the same numpy shapes (GGUF lists dimensions innermost first, so that is ne
[in, r] and [r, out], which is what `llama-adapter.cpp` checks against the base weight).

Module names map to GGUF tensors for the architectures in `ARCHS` (q/k/v/o_proj → attn_q/k/v/
output, gate/up/down_proj → ffn_gate/up/down, lm_head → output). Llama-family converters
permute the rows of q_proj/k_proj into llama.cpp's rotary layout (`convert_hf_to_gguf.py`,
`LlamaModel.permute`); an adapter's output rows are B's rows, so B gets the same permutation.

Scaling: PEFT adds (alpha/r)·B·A — alpha/√r with `use_rslora`, per-module alpha with
`alpha_pattern`. The GGUF carries `adapter.lora.alpha` = lora_alpha and llama.cpp divides by
each tensor's rank; where PEFT's factor differs, the ratio is folded into B, so the converted
adapter computes exactly PEFT's update at scale 1.

Not supported, with a LoraError saying so: DoRA, trained biases, `modules_to_save` weights,
embedding targets, `fan_in_fan_out` (Conv1D) models, architectures outside `ARCHS` (convert
with llama.cpp's convert_lora_to_gguf.py and use the GGUF instead).

The GGUF is cached beside the adapter as `adapter_model.<arch>.gguf` (or, when the folder is
read-only, in the user's private cache folder `~/.cache/kodkod/lora`, see `kodkod.fsutil`;
never a shared temp folder) with a fingerprint of its sources and of the model's
head layout, and is rebuilt when they change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from kodkod.fsutil import fsync_file, private_cache_dir

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
FINGERPRINT_KEY = "kodkod.peft.fingerprint"
CONVERTER_VERSION = "1"

# GGUF architecture → whether its HF converter permutes q_proj/k_proj rows.
ARCHS: dict[str, bool] = {
    "llama": True,
    "smollm3": True,
    "qwen2": False,
    "qwen3": False,
    "gemma": False,
    "gemma2": False,
    "gemma3": False,
}
MODULES: dict[str, str] = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
_LAYER = re.compile(r"(?:^|\.)layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<module>\w+)$")
_TENSOR = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.\w+)?\.weight$")
_NP_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


class LoraError(ValueError):
    """An adapter that cannot be used with the loaded model (the message is user-facing)."""


@dataclass(frozen=True, slots=True)
class BaseFacts:
    """What adapter checks need to know about the model."""

    arch: str
    shapes: dict[str, tuple[int, ...]]  # GGUF tensor → ne (innermost first)
    n_head: int
    n_head_kv: int


# -- reading --------------------------------------------------------------------------------


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a numpy array (F32/F16/F64 as stored, BF16 → F32)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, 100 << 20):
            raise LoraError(f"{path.name} is not a safetensors file")
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        raw = data[start:end]
        if end > len(data) or start > end:
            raise LoraError(f"{path.name}: tensor {name} lies outside the file (truncated?)")
        if dtype == "BF16":
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dtype in _NP_TYPES:
            arr = raw.view(_NP_TYPES[dtype])
        else:
            raise LoraError(f"{path.name}: tensor {name} has unsupported type {dtype}")
        out[name] = arr.reshape(shape)
    return out


def read_config(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LoraError(f"{folder.name}/{PEFT_CONFIG} could not be read: {exc}") from None
    if not isinstance(cfg, dict):
        raise LoraError(f"{folder.name}/{PEFT_CONFIG} is not a JSON object")
    peft_type = str(cfg.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        raise LoraError(f"{folder.name} is a {peft_type} adapter; only LoRA adapters are supported")
    if cfg.get("use_dora"):
        raise LoraError(f"{folder.name} is a DoRA adapter, which llama.cpp cannot apply")
    if cfg.get("fan_in_fan_out"):
        raise LoraError(f"{folder.name} uses fan_in_fan_out (Conv1D models), which is not supported")
    if str(cfg.get("bias") or "none") != "none":
        raise LoraError(f"{folder.name} trains biases (bias={cfg['bias']!r}), which llama.cpp cannot apply")
    return cfg


# -- mapping --------------------------------------------------------------------------------


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row order for a q/k projection's output rows (`LlamaModel.permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pattern(patterns: Any, module: str, default: float) -> float:
    """PEFT's rank/alpha_pattern lookup: a key matches a module name ending in it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return default


def target_name(module: str, base: BaseFacts, folder: str) -> str:
    """The GGUF weight a PEFT module path adapts ("model.layers.3.self_attn.q_proj")."""
    short = module.rsplit(".", 1)[-1]
    m = _LAYER.search(module)
    if m is not None and m["module"] in MODULES:
        name = f"blk.{int(m['layer'])}.{MODULES[m['module']]}.weight"
    elif short == "lm_head":
        name = "output.weight"
        if name not in base.shapes:
            raise LoraError(
                f"{folder} adapts lm_head, but the model ties its output to the token embeddings "
                "(no separate output weight to adapt)"
            )
    else:
        raise LoraError(
            f"{folder}: target module {short!r} ({module}) is not supported; supported: "
            + ", ".join([*MODULES, "lm_head"])
        )
    if name not in base.shapes:
        raise LoraError(f"{folder} adapts {module}, which the loaded model does not have")
    return name


def convert(folder: Path, base: BaseFacts, out: Path, fingerprint: str) -> None:
    """Write the GGUF form of the PEFT adapter in `folder` to `out`."""
    if base.arch not in ARCHS:
        raise LoraError(
            f"PEFT adapters cannot be converted for architecture {base.arch!r} yet (supported: "
            f"{', '.join(ARCHS)}); convert with llama.cpp's convert_lora_to_gguf.py and use the GGUF"
        )
    cfg = read_config(folder)
    alpha = float(cfg.get("lora_alpha") or 0.0)
    rslora = bool(cfg.get("use_rslora"))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    modules: dict[str, str] = {}
    for key, arr in read_safetensors(folder / PEFT_WEIGHTS).items():
        m = _TENSOR.match(key)
        if m is None:
            if "lora_embedding" in key:
                raise LoraError(f"{folder.name}: target module 'embed_tokens' is not supported")
            raise LoraError(
                f"{folder.name}: unexpected tensor {key!r} (modules_to_save or other full weights "
                "cannot be applied as a LoRA)"
            )
        module = m["path"].removeprefix("base_model.model.")
        target = target_name(module, base, folder.name)
        if arr.ndim != 2:
            raise LoraError(f"{folder.name}: {key} is not a matrix")
        pairs.setdefault(target, {})[m["ab"]] = arr
        modules[target] = module
    if not pairs:
        raise LoraError(f"{folder.name}/{PEFT_WEIGHTS} holds no LoRA tensors")
    permute = ARCHS[base.arch]
    tensors: list[tuple[str, np.ndarray]] = []
    for target in sorted(pairs):
        a, b = pairs[target].get("A"), pairs[target].get("B")
        if a is None or b is None:
            raise LoraError(f"{folder.name}: {modules[target]} has only one of lora_A / lora_B")
        if a.shape[0] != b.shape[1]:
            raise LoraError(f"{folder.name}: lora_A and lora_B of {modules[target]} differ in rank")
        rank = a.shape[0]
        module_alpha = _pattern(cfg.get("alpha_pattern"), modules[target], alpha)
        wanted = module_alpha / (math.sqrt(rank) if rslora else rank)
        applied = alpha / rank if alpha else 1.0  # what llama.cpp will multiply by
        factor = wanted / applied
        keep_f16 = a.dtype == np.float16 and b.dtype == np.float16 and factor == 1.0
        dtype = np.float16 if keep_f16 else np.float32
        a, b = np.ascontiguousarray(a, dtype=dtype), np.array(b, dtype=dtype)
        if permute and target.endswith(("attn_q.weight", "attn_k.weight")):
            heads = base.n_head if target.endswith("attn_q.weight") else base.n_head_kv
            if b.shape[0] % (2 * heads):
                raise LoraError(f"{folder.name}: {modules[target]} does not fit {heads} heads")
            b = permute_rows(b, heads)
        if factor != 1.0:
            b = b * np.float32(factor)
        tensors += [(f"{target}.lora_a", a), (f"{target}.lora_b", np.ascontiguousarray(b))]
    writer = gguf.GGUFWriter(out, base.arch)
    writer.add_type("adapter")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_string(FINGERPRINT_KEY, fingerprint)
    for name, arr in tensors:
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# -- the cache ------------------------------------------------------------------------------


def fingerprint(folder: Path, base: BaseFacts) -> str:
    h = hashlib.sha256(CONVERTER_VERSION.encode())
    h.update((folder / PEFT_CONFIG).read_bytes())
    st = (folder / PEFT_WEIGHTS).stat()
    h.update(f"{st.st_size}:{st.st_mtime_ns}:{base.arch}:{base.n_head}:{base.n_head_kv}".encode())
    return h.hexdigest()[:32]


def _cached(path: Path, want: str) -> bool:
    if not path.is_file():
        return False
    try:
        f = gguf.GGUFReader(path).fields.get(FINGERPRINT_KEY)
        return f is not None and f.contents() == want
    except Exception:
        return False


def ensure_gguf(folder: Path, base: BaseFacts, name: str) -> Path:
    """The GGUF form of the PEFT adapter in `folder`: the cached one when it is current,
    otherwise converted now (written to a temporary name, then renamed)."""
    try:
        fp = fingerprint(folder, base)
    except OSError as exc:
        raise LoraError(f"LoRA {name!r} could not be read: {exc}") from None
    candidates = [folder / f"adapter_model.{base.arch}.gguf"]
    try:
        candidates.append(private_cache_dir(None, "lora") / f"{fp}.gguf")
    except OSError as exc:
        log.warning("the private cache folder is unusable: %s", exc)
    for path in candidates:
        if _cached(path, fp):
            return path
    for path in candidates:
        try:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
            try:
                convert(folder, base, tmp, fp)
                fsync_file(tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not write the converted LoRA %s to %s: %s", name, path, exc)
            continue
        log.info("converted PEFT adapter %s to %s", name, path)
        return path
    raise LoraError(f"LoRA {name!r}: nowhere to write its converted GGUF")
