"""A tiny random BERT sentence-transformers folder (config, safetensors, vocab, modules,
pooling) for converter and encoder tests: the same files as all-MiniLM-L6-v2, a few KB."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

HIDDEN = 16
LAYERS = 2
HEADS = 2
FFN = 32
POSITIONS = 64
MAX_SEQ = 24
WORDS = ["hello", "world", "the", "cat", "sat", "on", "mat", "a", "dog", ".", ",", "!", "lo", "##lo", "##s"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


def write_tiny_bert(
    folder: Path,
    *,
    seed: int = 0,
    pooling: str = "mean",
    normalize: bool = True,
    architectures: tuple[str, ...] = ("BertModel",),
) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": list(architectures),
        "model_type": "bert",
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": FFN,
        "max_position_embeddings": POSITIONS,
        "type_vocab_size": 2,
        "vocab_size": len(VOCAB),
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
    }
    (folder / "config.json").write_text(json.dumps(config))

    def mat(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    def norm(prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.weight": 1 + mat(HIDDEN), f"{prefix}.bias": mat(HIDDEN)}

    t: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": mat(len(VOCAB), HIDDEN),
        "embeddings.position_embeddings.weight": mat(POSITIONS, HIDDEN),
        "embeddings.token_type_embeddings.weight": mat(2, HIDDEN),
        "embeddings.position_ids": np.arange(POSITIONS, dtype=np.int64)[None, :],
        "pooler.dense.weight": mat(HIDDEN, HIDDEN),
        "pooler.dense.bias": mat(HIDDEN),
        **norm("embeddings.LayerNorm"),
    }
    for i in range(LAYERS):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            t[f"{p}.attention.self.{name}.weight"] = mat(HIDDEN, HIDDEN)
            t[f"{p}.attention.self.{name}.bias"] = mat(HIDDEN)
        t[f"{p}.attention.output.dense.weight"] = mat(HIDDEN, HIDDEN)
        t[f"{p}.attention.output.dense.bias"] = mat(HIDDEN)
        t.update(norm(f"{p}.attention.output.LayerNorm"))
        t[f"{p}.intermediate.dense.weight"] = mat(FFN, HIDDEN)
        t[f"{p}.intermediate.dense.bias"] = mat(FFN)
        t[f"{p}.output.dense.weight"] = mat(HIDDEN, FFN)
        t[f"{p}.output.dense.bias"] = mat(HIDDEN)
        t.update(norm(f"{p}.output.LayerNorm"))
    save_file(t, str(folder / "model.safetensors"))
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]"}
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "mask_token": "[MASK]"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, **special}))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        normalize_type = "sentence_transformers.models.Normalize"
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": normalize_type})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": HIDDEN,
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
            }
        )
    )
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_SEQ}))
    return folder
