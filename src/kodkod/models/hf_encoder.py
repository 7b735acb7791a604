"""Hugging Face sentence-transformers folder → GGUF that llama.cpp's BERT loader accepts.

`convert_folder(folder, out)` reads a BERT-family encoder as sentence-transformers saves it
(`config.json`, `model.safetensors`, `tokenizer.json` or `vocab.txt`, `modules.json`,
`1_Pooling/config.json`, `sentence_bert_config.json`) and writes one GGUF with the `gguf`
package: hyper-parameters under the `bert.*` keys, tensor names from `gguf.TensorNameMap`,
the WordPiece vocabulary spelled the way llama.cpp's WPM tokenizer reads it (continuations
lose their `##`, whole words gain a leading U+2581, control tokens stay as they are), the
pooling type from the pooling config, and two keys of our own (`kodkod.embedding.normalize`,
`kodkod.embedding.max_seq_length`) that the encoder reads back. Safetensors are parsed here
(an 8-byte header length, a JSON header, raw little-endian data), so the server needs no
extra package. The weight matrices are written as float16 (llama.cpp's CPU kernels run them
faster than float32, and the vectors stay within float32 rounding of the reference:
docs/measurements.md); norms, biases and the lookup tables stay float32.

`cached_gguf(folder)` does the conversion once and keeps the result in the private cache
folder, named by a hash of every source file (never in a model folder, where it would be
offered as a chat model).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kodkod.fsutil import private_cache_dir

__all__ = [
    "KNOWN_ARCHITECTURES",
    "MAX_SEQ_KEY",
    "NORMALIZE_KEY",
    "ConversionError",
    "EncoderFolder",
    "cached_gguf",
    "convert_folder",
    "read_folder",
]

CONVERTER_VERSION = "2"  # part of the cache key: bump when the written file changes
NORMALIZE_KEY = "kodkod.embedding.normalize"
MAX_SEQ_KEY = "kodkod.embedding.max_seq_length"
KNOWN_ARCHITECTURES = ("BertModel",)
_POOLING = {"mean": 1, "cls": 2, "last": 3}  # llama_pooling_type values
_SOURCE_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
)
_F32_TABLES = ("token_embd", "position_embd", "token_types")  # looked up by row, not multiplied
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class ConversionError(ValueError):
    """The folder is not an encoder this converter handles (one-line message)."""


@dataclass(frozen=True, slots=True)
class EncoderFolder:
    """What a sentence-transformers folder says about its model."""

    path: Path
    config: dict[str, Any]
    architecture: str
    pooling: str  # "mean" | "cls" | "last"
    normalize: bool
    max_seq_length: int


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read {path.name}: {exc}") from None


def _pooling_of(folder: Path, modules: list[dict[str, Any]]) -> str:
    pool_dir = next((m.get("path", "") for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
    if pool_dir is None:
        return "cls"  # a bare Transformer module: the CLS token (sentence-transformers' fallback)
    cfg = _read_json(folder / pool_dir / "config.json")
    mode = cfg.get("pooling_mode")
    if isinstance(mode, str) and mode in ("mean", "cls", "lasttoken"):
        return "last" if mode == "lasttoken" else mode
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_lasttoken"):
        return "last"
    raise ConversionError(f"{folder.name}: pooling {cfg} is not supported (mean, CLS or last token only)")


def read_folder(folder: Path) -> EncoderFolder:
    """The folder's model description (ConversionError when it is not a BERT encoder)."""
    config = _read_json(folder / "config.json")
    archs = list(config.get("architectures") or [])
    model_type = config.get("model_type")
    known = [a for a in archs if a in KNOWN_ARCHITECTURES]
    if not known and not (not archs and model_type == "bert"):
        named = ", ".join(archs) or f"model_type {model_type!r}"
        raise ConversionError(
            f"{folder.name}: architecture {named} is not supported for embeddings "
            f"(known: {', '.join(KNOWN_ARCHITECTURES)}; or give a GGUF embedding model)"
        )
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"{folder.name}: position_embedding_type must be 'absolute'")
    modules = _read_json(folder / "modules.json") if (folder / "modules.json").is_file() else []
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    positions = int(config.get("max_position_embeddings", 512))
    max_seq = positions
    st_path = folder / "sentence_bert_config.json"
    if st_path.is_file():
        max_seq = int(_read_json(st_path).get("max_seq_length") or positions)
    return EncoderFolder(
        path=folder,
        config=config,
        architecture=known[0] if known else "BertModel",
        pooling=_pooling_of(folder, modules),
        normalize=normalize,
        max_seq_length=min(max_seq, positions),
    )


# -- safetensors ----------------------------------------------------------------------------------


def _safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file, as float32 arrays."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= _MAX_HEADER_BYTES:
            raise ConversionError(f"{path.name}: not a safetensors file")
        header = json.loads(f.read(size))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    out: dict[str, np.ndarray] = {}
    for name, meta in header.items():
        if name == "__metadata__" or name.endswith("position_ids"):
            continue  # metadata and integer buffers: not weights
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            raise ConversionError(f"{path.name}: tensor {name} has unsupported dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        raw = np.frombuffer(data[start:end], dtype=dtype).reshape(meta["shape"])
        if meta["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[name] = np.ascontiguousarray(raw, dtype=np.float32)
    return out


# -- vocabulary -----------------------------------------------------------------------------------


def _vocab(folder: Path) -> tuple[list[str], set[str]]:
    """(tokens by id, the special tokens' texts)."""
    special: set[str] = set()
    tj = folder / "tokenizer.json"
    if tj.is_file():
        doc = _read_json(tj)
        model = doc.get("model", {})
        if model.get("type") != "WordPiece":
            raise ConversionError(f"{folder.name}: tokenizer {model.get('type')!r} is not WordPiece")
        by_id = {int(i): str(t) for t, i in model["vocab"].items()}
        for added in doc.get("added_tokens", []):
            by_id[int(added["id"])] = str(added["content"])
            if added.get("special"):
                special.add(str(added["content"]))
        tokens = [by_id.get(i, f"[PAD{i}]") for i in range(max(by_id) + 1)]
    elif (folder / "vocab.txt").is_file():
        tokens = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    else:
        raise ConversionError(f"{folder.name}: neither tokenizer.json nor vocab.txt")
    special |= {t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in tokens}
    return tokens, special


def _wpm_spelling(token: str, is_control: bool) -> str:
    if is_control:
        return token
    return token[2:] if token.startswith("##") else "\u2581" + token


def _add_special_tokens(w: Any, folder: Path, tokens: list[str]) -> None:
    """BERT's frame: [CLS] text [SEP]. llama.cpp's WordPiece tokenizer adds its BOS first and
    its SEP last, so BOS is the CLS token and EOS/SEP the SEP token."""
    names: dict[str, str] = {"cls": "[CLS]", "sep": "[SEP]", "unk": "[UNK]", "pad": "[PAD]", "mask": "[MASK]"}
    cfg_path = folder / "special_tokens_map.json"
    if cfg_path.is_file():
        for key, value in _read_json(cfg_path).items():
            text = value.get("content") if isinstance(value, dict) else value
            if key.endswith("_token") and isinstance(text, str):
                names[key.removesuffix("_token")] = text
    ids = {k: tokens.index(v) for k, v in names.items() if v in tokens}
    if "cls" not in ids or "sep" not in ids:
        raise ConversionError(f"{folder.name}: the vocabulary has no CLS or SEP token")
    w.add_bos_token_id(ids["cls"])
    w.add_eos_token_id(ids["sep"])
    w.add_sep_token_id(ids["sep"])
    adders = {"unk": w.add_unk_token_id, "pad": w.add_pad_token_id, "mask": w.add_mask_token_id}
    for kind, add in adders.items():
        if kind in ids:
            add(ids[kind])
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)


# -- writing --------------------------------------------------------------------------------------


def convert_folder(folder: Path, out: Path, *, f16: bool = True) -> EncoderFolder:
    """Write the GGUF of the encoder in `folder` to `out` (`f16`: matrices as float16)."""
    import gguf  # lazily: only a conversion needs it

    desc = read_folder(folder)
    cfg = desc.config
    weights_path = folder / "model.safetensors"
    if not weights_path.is_file():
        raise ConversionError(f"{folder.name}: no model.safetensors")
    tensors = _safetensors(weights_path)
    n_layers = int(cfg["num_hidden_layers"])
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.BERT, n_layers)
    tokens, special = _vocab(folder)
    n_vocab = int(cfg.get("vocab_size", len(tokens)))
    if len(tokens) < n_vocab:
        tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT]

    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(folder.name)
    w.add_context_length(int(cfg.get("max_position_embeddings", 512)))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_block_count(n_layers)
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_layer_norm_eps(float(cfg.get("layer_norm_eps", 1e-12)))
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType(_POOLING[desc.pooling]))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    w.add_bool(NORMALIZE_KEY, desc.normalize)
    w.add_uint32(MAX_SEQ_KEY, desc.max_seq_length)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_type_count(int(cfg.get("type_vocab_size", 1)))
    w.add_token_list(
        [_wpm_spelling(t, k == gguf.TokenType.CONTROL) for t, k in zip(tokens, types, strict=True)]
    )
    w.add_token_types(types)
    _add_special_tokens(w, folder, tokens)

    for name, array in tensors.items():
        key = name.removeprefix("bert.")
        if key.startswith(("pooler.", "cls.")) or key.endswith("position_ids"):
            continue  # heads and buffers llama.cpp does not use
        mapped = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ConversionError(f"{folder.name}: unexpected tensor {name}")
        if f16 and array.ndim == 2 and not mapped.startswith(_F32_TABLES):
            array = array.astype(np.float16)
        w.add_tensor(mapped, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return desc


def _source_hash(folder: Path) -> str:
    h = hashlib.sha256(f"kodkod-encoder-{CONVERTER_VERSION}".encode())
    for rel in _SOURCE_FILES:
        path = folder / rel
        h.update(rel.encode() + b"\0")
        if path.is_file():
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def cached_gguf(folder: Path, env: dict[str, str] | None = None) -> Path:
    """The GGUF of `folder`, converted once into the private cache (keyed by the sources)."""
    read_folder(folder)  # refuse unknown architectures before hashing the weights
    cache = private_cache_dir(env, "encoders")
    target = cache / f"{_source_hash(folder)}.gguf"
    if target.is_file():
        return target
    partial = cache / f".{target.name}.{os.getpid()}.partial"
    try:
        convert_folder(folder, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
