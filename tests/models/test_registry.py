"""Model discovery in model_dir and safe name → path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from kodkod.models.registry import ModelNameError, discover, resolve


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    (root / "folder-model").mkdir(parents=True)
    (root / "folder-model" / "weights.Q4.gguf").write_bytes(b"GGUF")
    (root / "folder-model" / "mmproj-f16.gguf").write_bytes(b"GGUF")  # a projector: ignored
    (root / "split").mkdir()
    for i in (1, 2):
        (root / "split" / f"big-0000{i}-of-00002.gguf").write_bytes(b"GGUF")
    (root / "bare.gguf").write_bytes(b"GGUF")
    (root / "two").mkdir()
    (root / "two" / "a.gguf").write_bytes(b"GGUF")
    (root / "two" / "b.gguf").write_bytes(b"GGUF")
    (root / "empty").mkdir()
    (root / "family" / "small").mkdir(parents=True)
    (root / "family" / "small" / "s.gguf").write_bytes(b"GGUF")
    (root / "notes.txt").write_text("hi")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "x.gguf").write_bytes(b"GGUF")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    return root


def test_discover(model_dir: Path) -> None:
    names = [e.name for e in discover(model_dir)]
    assert names == ["bare", "folder-model", "split"]  # not the link leading outside
    split = next(e for e in discover(model_dir) if e.name == "split")
    assert split.gguf.name == "big-00001-of-00002.gguf"


def test_resolve(model_dir: Path) -> None:
    assert resolve(model_dir, "folder-model").gguf.name == "weights.Q4.gguf"
    assert resolve(model_dir, "bare").folder is None
    assert resolve(model_dir, "bare.gguf").name == "bare.gguf"
    nested = resolve(model_dir, "family/small")
    assert nested.name == "family/small" and nested.gguf.name == "s.gguf"


@pytest.mark.parametrize(
    "name",
    ["../../etc", "..", "/etc/passwd", "~/models", "folder-model/../../x", "C:\\x", "escape", ""],
)
def test_resolve_refuses_paths_outside(model_dir: Path, name: str) -> None:
    with pytest.raises(ModelNameError):
        resolve(model_dir, name)


@pytest.mark.parametrize("name", ["missing", "two", "empty", "notes.txt"])
def test_resolve_refuses_non_models(model_dir: Path, name: str) -> None:
    with pytest.raises(ModelNameError):
        resolve(model_dir, name)


def _write_gguf(path: Path, arch: str, *, pooling: int | None = None, causal: bool | None = None) -> None:
    import numpy as np
    from gguf import GGUFWriter, PoolingType

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    if pooling is not None:
        writer.add_pooling_type(PoolingType(pooling))
    if causal is not None:
        writer.add_causal_attention(causal)
    writer.add_tokenizer_model("gpt2")
    writer.add_tensor("t", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_encoder_ggufs_are_never_chat_models(tmp_path: Path) -> None:
    from kodkod.models.gguf_header import read_architecture

    root = tmp_path / "models"
    (root / "minilm").mkdir(parents=True)
    _write_gguf(root / "minilm" / "minilm.gguf", "bert")
    _write_gguf(root / "loose-encoder.gguf", "nomic-bert")
    _write_gguf(root / "chat.gguf", "llama")
    (root / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")  # unreadable header: still listed
    assert read_architecture(root / "chat.gguf") == "llama"
    assert read_architecture(root / "minilm" / "minilm.gguf") == "bert"
    assert read_architecture(root / "truncated.gguf") is None
    assert [e.name for e in discover(root)] == ["chat", "truncated"]
    for name, arch in (
        ("minilm", "bert"),
        ("loose-encoder", "nomic-bert"),
        ("loose-encoder.gguf", "nomic-bert"),
    ):
        # found, but refused with the reason and where it loads instead
        with pytest.raises(ModelNameError, match=rf"embedding model \(architecture {arch}\).*embedding/load"):
            resolve(root, name)
    assert resolve(root, "chat").gguf == root / "chat.gguf"
    st = root / "st-folder"
    st.mkdir()
    (st / "config.json").write_text("{}")
    (st / "modules.json").write_text("[]")
    with pytest.raises(ModelNameError, match="sentence-transformers folder"):
        resolve(root, "st-folder")


def test_header_roles_tell_text_generators_from_embedding_models(tmp_path: Path) -> None:
    from kodkod.models.gguf_header import read_roles

    cases = {
        "chat": ("llama", None, None, True),  # causal, no pooling: a chat model
        "qwen-embed": ("qwen3", 3, None, False),  # causal with last-token pooling: embeds
        "bert": ("bert", 1, False, False),
        "bidirectional": ("llama", None, False, False),  # non-causal: pools by mean
    }
    for name, (arch, pooling, causal, generator) in cases.items():
        _write_gguf(tmp_path / f"{name}.gguf", arch, pooling=pooling, causal=causal)
        roles = read_roles(tmp_path / f"{name}.gguf")
        assert roles is not None and roles.architecture == arch
        assert (roles.pooling_type, roles.text_generator) == (pooling, generator), name
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    assert read_roles(tmp_path / "junk.gguf") is None
    assert read_roles(tmp_path / "missing.gguf") is None
