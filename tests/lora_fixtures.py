"""Small LoRA adapters for the default model, built in tests (nothing is downloaded).

`make_adapter()` draws random A (r, in) and B (out, r) matrices for chosen GGUF weights of a
model. The same adapter can be written as a GGUF adapter (`write_gguf_adapter`, llama.cpp's
format: `<weight>.lora_a` / `.lora_b`, general.type adapter, adapter.lora.alpha), as a Hugging
Face PEFT adapter (`write_peft_adapter`: HF module names, and q/k rows put back into HF's
order, written here from the rotary layout's definition rather than with the server's code),
and merged into the model (`write_f32_model`: every tensor dequantised to F32, plus
scale·(alpha/r)·B·A on the adapted ones, every metadata field copied).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file

ALL_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
HF_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass
class Adapter:
    arch: str
    alpha: float
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]  # GGUF weight → (A (r, in), B (out, r))

    @property
    def rank(self) -> int:
        return next(iter(self.pairs.values()))[0].shape[0]


@dataclass
class ModelFacts:
    arch: str
    shapes: dict[str, tuple[int, ...]]  # numpy order (out, in)
    n_head: int
    n_head_kv: int
    n_layer: int


def model_facts(path: Path) -> ModelFacts:
    r = gguf.GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in r.tensors}
    get = lambda k: int(r.fields[f"{arch}.{k}"].contents())  # noqa: E731
    return ModelFacts(
        arch, shapes, get("attention.head_count"), get("attention.head_count_kv"), get("block_count")
    )


def make_adapter(
    model: Path,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    layers: Iterable[int] | None = None,
    targets: Sequence[str] = ALL_TARGETS,
    seed: int = 0,
    strength: float = 0.05,
    arch: str | None = None,
) -> Adapter:
    """Random A/B pairs; each delta entry is roughly N(0, strength·2·sqrt(r/in))·alpha/r."""
    facts = model_facts(model)
    rng = np.random.default_rng(seed)
    pairs = {}
    for layer in range(facts.n_layer) if layers is None else layers:
        for t in targets:
            name = f"blk.{layer}.{t}.weight"
            out_dim, in_dim = facts.shapes[name]
            a = rng.normal(0.0, 1.0 / np.sqrt(in_dim), (rank, in_dim)).astype(np.float32)
            b = rng.normal(0.0, strength, (out_dim, rank)).astype(np.float32)
            pairs[name] = (a, b)
    return Adapter(arch or facts.arch, alpha, pairs)


def write_gguf_adapter(path: Path, adapter: Adapter) -> Path:
    tensors = {}
    for name, (a, b) in sorted(adapter.pairs.items()):
        tensors[f"{name}.lora_a"] = a
        tensors[f"{name}.lora_b"] = b
    return write_gguf_tensors(path, adapter.arch, tensors, alpha=adapter.alpha)


def write_gguf_tensors(
    path: Path,
    arch: str,
    tensors: dict[str, np.ndarray],
    *,
    alpha: float = 8.0,
    general_type: str = "adapter",
    adapter_type: str = "lora",
) -> Path:
    """A GGUF with these tensors and adapter metadata (for malformed adapters too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, arch)
    w.add_type(general_type)
    w.add_string("adapter.type", adapter_type)
    w.add_float32("adapter.lora.alpha", alpha)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_row_order(out_dim: int, n_head: int) -> np.ndarray:
    """For each GGUF row of a q/k projection, the HF row it came from. HF keeps each head's
    rotary pairs as two halves; llama.cpp interleaves them: GGUF row h·d + 2i + j holds HF row
    h·d + j·d/2 + i (d = rows per head)."""
    d = out_dim // n_head
    src = np.empty(out_dim, dtype=np.int64)
    for h in range(n_head):
        for i in range(d // 2):
            for j in range(2):
                src[h * d + 2 * i + j] = h * d + j * (d // 2) + i
    return src


def write_peft_adapter(
    folder: Path,
    adapter: Adapter,
    heads: tuple[int, int],
    *,
    dtype: type = np.float32,
    extra_config: dict | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """The same adapter as a PEFT folder (adapter_config.json + adapter_model.safetensors);
    `heads` = the model's (attention heads, KV heads)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    modules = set()
    for name, (a, b) in adapter.pairs.items():
        _, layer, target, _ = name.split(".")
        hf = HF_MODULES[target]
        modules.add(hf.split(".")[1])
        if target in ("attn_q", "attn_k"):
            n = heads[0] if target == "attn_q" else heads[1]
            hf_b = np.empty_like(b)
            hf_b[hf_row_order(b.shape[0], n)] = b
            b = hf_b
        prefix = f"base_model.model.model.layers.{layer}.{hf}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a, dtype=dtype)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b, dtype=dtype)
    tensors.update(extra_tensors or {})
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "target_modules": sorted(modules),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        **(extra_config or {}),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return folder


def write_f32_model(src: Path, dst: Path, merges: Sequence[tuple[Adapter, float]] = ()) -> Path:
    """`src` with every tensor dequantised to F32 and scale·(alpha/r)·B·A of each adapter added
    to its weights; every metadata field (tokenizer included) is copied."""
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        if key == "general.file_type":
            value = int(gguf.LlamaFileType.ALL_F32)
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, vtype, sub)
    deltas: dict[str, np.ndarray] = {}
    for adapter, scale in merges:
        for name, (a, b) in adapter.pairs.items():
            d = (scale * adapter.alpha / adapter.rank) * (b.astype(np.float64) @ a.astype(np.float64))
            deltas[name] = deltas.get(name, 0.0) + d
    for t in r.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name in deltas:
            arr = (arr.astype(np.float64) + deltas[t.name]).astype(np.float32)
        w.add_tensor(t.name, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
