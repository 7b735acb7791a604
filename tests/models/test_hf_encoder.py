"""The Hugging Face → GGUF converter for sentence encoders: what it writes (keys, WordPiece
spelling, tensor names and types), what it refuses (naming the architecture), and its cache
(keyed by the sources, in the private cache folder, never beside the model)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from kodkod.models.hf_encoder import (
    MAX_SEQ_KEY,
    NORMALIZE_KEY,
    ConversionError,
    cached_gguf,
    convert_folder,
    read_folder,
)
from kodkod.models.registry import discover
from tests.models.tiny_bert import LAYERS, MAX_SEQ, VOCAB, write_tiny_bert


def _fields(path: Path) -> tuple[dict[str, object], gguf.GGUFReader]:
    reader = gguf.GGUFReader(str(path))
    out: dict[str, object] = {}
    for key, f in reader.fields.items():
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        value = f.parts[f.data[0]]
        out[key] = bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else value[0].item()
    return out, reader


def test_conversion_writes_what_llama_cpps_bert_loader_reads(tmp_path: Path) -> None:
    folder = write_tiny_bert(tmp_path / "tiny")
    out = tmp_path / "tiny.gguf"
    convert_folder(folder, out)
    meta, reader = _fields(out)
    assert meta["general.architecture"] == "bert"
    assert meta["bert.block_count"] == LAYERS
    assert meta["bert.attention.causal"] is False
    assert meta["bert.pooling_type"] == 1  # mean
    assert meta["tokenizer.ggml.model"] == "bert"
    assert meta[NORMALIZE_KEY] is True and meta[MAX_SEQ_KEY] == MAX_SEQ
    assert meta["tokenizer.ggml.bos_token_id"] == VOCAB.index("[CLS]")
    assert meta["tokenizer.ggml.seperator_token_id"] == VOCAB.index("[SEP]")
    tokens_field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(tokens_field.parts[i]).decode() for i in tokens_field.data]
    assert tokens[: len(VOCAB)][:3] == ["[PAD]", "[UNK]", "[CLS]"]
    assert tokens[VOCAB.index("hello")] == "\u2581hello" and tokens[VOCAB.index("##lo")] == "lo"
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "pooler.dense.weight" not in types and not any("position_ids" in n for n in types)
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.1.layer_output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F32
    assert {"token_types.weight", "position_embd.weight", "token_embd_norm.bias"} <= set(types)


def test_pooling_and_normalisation_follow_the_sentence_transformers_modules(tmp_path: Path) -> None:
    folder = write_tiny_bert(tmp_path / "cls", pooling="cls", normalize=False)
    desc = read_folder(folder)
    assert (desc.pooling, desc.normalize) == ("cls", False)
    convert_folder(folder, tmp_path / "cls.gguf")
    meta, _ = _fields(tmp_path / "cls.gguf")
    assert meta["bert.pooling_type"] == 2 and meta[NORMALIZE_KEY] is False


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "XLMRobertaModel"])
def test_unknown_architectures_are_refused_by_name(tmp_path: Path, arch: str) -> None:
    folder = write_tiny_bert(tmp_path / "x", architectures=(arch,))
    with pytest.raises(ConversionError, match=arch):
        cached_gguf(folder, {"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert not list((tmp_path / "cache").rglob("*.gguf"))


def test_the_cache_is_private_keyed_by_the_sources_and_never_in_model_dir(tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    folder = write_tiny_bert(model_dir / "tiny")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = cached_gguf(folder, env)
    assert tmp_path / "cache" in first.parents and first.is_file()
    assert (first.parent.stat().st_mode & 0o077) == 0  # private folder
    stamp = first.stat().st_mtime_ns
    assert cached_gguf(folder, env) == first and first.stat().st_mtime_ns == stamp  # not converted again
    config = json.loads((folder / "config.json").read_text())
    config["layer_norm_eps"] = 1e-5
    (folder / "config.json").write_text(json.dumps(config))
    assert cached_gguf(folder, env) != first
    assert not list(model_dir.rglob("*.gguf"))
    assert discover(model_dir) == []  # an encoder folder is never offered as a chat model
