"""LoRA adapters without a model: discovery in lora_dir, validation of GGUF adapters against a
model's tensors, PEFT → GGUF conversion (names, q/k row order, scaling, unsupported modules)
and its cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from kodkod.engine.client import RequestError
from kodkod.models.lora import LoraLibrary, check_adapter, discover_loras, resolve_lora
from kodkod.models.peft import BaseFacts, LoraError, ensure_gguf, permute_rows, read_safetensors
from tests.lora_fixtures import (
    Adapter,
    hf_row_order,
    write_gguf_adapter,
    write_gguf_tensors,
    write_peft_adapter,
)

# A tiny "llama" model: hidden 8, 2 heads of 4, 1 KV head (shapes are GGUF ne: in, out).
BASE = BaseFacts(
    "llama",
    {
        "token_embd.weight": (8, 32),
        "blk.0.attn_q.weight": (8, 8),
        "blk.0.attn_k.weight": (8, 4),
        "blk.0.attn_v.weight": (8, 4),
        "blk.0.attn_output.weight": (8, 8),
        "blk.0.ffn_up.weight": (8, 16),
        "blk.0.ffn_down.weight": (16, 8),
        "blk.0.attn_norm.weight": (8,),
    },
    n_head=2,
    n_head_kv=1,
)
HEADS = (2, 1)


def adapter(
    seed: int = 0,
    rank: int = 2,
    alpha: float = 4.0,
    targets: tuple[str, ...] = ("attn_q", "attn_k", "attn_v", "ffn_down"),
) -> Adapter:
    rng = np.random.default_rng(seed)
    pairs = {}
    for t in targets:
        name = f"blk.0.{t}.weight"
        n_in, n_out = BASE.shapes[name]
        pairs[name] = (
            rng.normal(size=(rank, n_in)).astype(np.float32),
            rng.normal(size=(n_out, rank)).astype(np.float32),
        )
    return Adapter("llama", alpha, pairs)


def tensors_of(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}


# -- discovery ------------------------------------------------------------------------------


def test_discovery_follows_the_model_rules(tmp_path: Path) -> None:
    write_gguf_adapter(tmp_path / "folder_one" / "weights.gguf", adapter())
    write_peft_adapter(tmp_path / "peft", adapter(), HEADS)
    (tmp_path / "peft" / "adapter_model.llama.gguf").write_bytes(b"cache")  # a cache: still PEFT
    write_gguf_adapter(tmp_path / "bare.gguf", adapter())
    write_gguf_adapter(tmp_path / "two" / "a.gguf", adapter())
    write_gguf_adapter(tmp_path / "two" / "b.gguf", adapter())
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    found = {e.name: e for e in discover_loras(tmp_path)}
    assert sorted(found) == ["bare", "folder_one", "peft"]
    assert found["peft"].kind == "peft" and found["peft"].path == tmp_path / "peft"
    assert found["folder_one"].path.name == "weights.gguf"
    assert found["bare"].kind == "gguf"
    assert discover_loras(tmp_path / "missing") == []


def test_resolve_refuses_names_outside_and_unknown(tmp_path: Path) -> None:
    write_gguf_adapter(tmp_path / "bare.gguf", adapter())
    assert resolve_lora(tmp_path, "bare").path == tmp_path / "bare.gguf"
    assert resolve_lora(tmp_path, "bare.gguf").name == "bare.gguf"
    for bad, text in [("../x", "invalid"), ("/etc", "invalid"), ("nope", "not found"), ("", "required")]:
        with pytest.raises(LoraError, match=text):
            resolve_lora(tmp_path, bad)
    with pytest.raises(LoraError, match="does not exist"):
        resolve_lora(tmp_path / "missing", "bare")


# -- validation -----------------------------------------------------------------------------


def test_a_fitting_adapter_passes(tmp_path: Path) -> None:
    path = write_gguf_adapter(tmp_path / "ok.gguf", adapter(rank=3, alpha=6.0))
    alpha, ranks, count = check_adapter(path, BASE, "ok")
    assert (alpha, ranks, count) == (6.0, (3,), 4)


@pytest.mark.parametrize(
    ("kwargs", "tensors", "message"),
    [
        ({"arch": "gemma3"}, None, "made for architecture 'gemma3', but the loaded model is 'llama'"),
        ({"general_type": "model"}, None, "not an adapter"),
        ({"adapter_type": "control_vector"}, None, "not a LoRA adapter"),
        ({}, {"blk.0.attn_q.weight.lora_a": np.zeros((2, 8), np.float32)}, "only one of lora_a"),
        (
            {},
            {
                "blk.9.attn_q.weight.lora_a": np.zeros((2, 8), np.float32),
                "blk.9.attn_q.weight.lora_b": np.zeros((8, 2), np.float32),
            },
            "does not have",
        ),
        (
            {},
            {
                "blk.0.attn_q.weight.lora_a": np.zeros((2, 6), np.float32),
                "blk.0.attn_q.weight.lora_b": np.zeros((8, 2), np.float32),
            },
            "do not fit",
        ),
        (
            {},
            {
                "blk.0.attn_k.weight.lora_a": np.zeros((2, 8), np.float32),
                "blk.0.attn_k.weight.lora_b": np.zeros((8, 2), np.float32),
            },
            "do not fit",
        ),
        (
            {},
            {
                "blk.0.attn_q.weight.lora_a": np.zeros((2, 8), np.float32),
                "blk.0.attn_q.weight.lora_b": np.zeros((8, 3), np.float32),
            },
            "do not fit",
        ),
        ({}, {"blk.0.attn_q.weight": np.zeros((8, 8), np.float32)}, "unexpected tensor"),
        (
            {},
            {
                "blk.0.attn_norm.weight.lora_a": np.zeros((2, 8), np.float32),
                "blk.0.attn_norm.weight.lora_b": np.zeros((8, 2), np.float32),
            },
            "not a matrix",
        ),
        ({}, {}, "no LoRA tensors"),
    ],
)
def test_wrong_adapters_are_refused_with_the_reason(
    tmp_path: Path, kwargs: dict, tensors: dict | None, message: str
) -> None:
    arch = kwargs.pop("arch", "llama")
    if tensors is None:
        tensors = {
            "blk.0.attn_v.weight.lora_a": np.zeros((2, 8), np.float32),
            "blk.0.attn_v.weight.lora_b": np.zeros((4, 2), np.float32),
        }
    path = write_gguf_tensors(tmp_path / "bad.gguf", arch, tensors, **kwargs)
    with pytest.raises(LoraError, match=message):
        check_adapter(path, BASE, "bad")


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(LoraError, match="not a readable GGUF"):
        check_adapter(tmp_path / "junk.gguf", BASE, "junk")


# -- PEFT conversion ------------------------------------------------------------------------


def test_peft_converts_to_the_gguf_form_exactly(tmp_path: Path) -> None:
    ad = adapter()
    write_peft_adapter(tmp_path / "p", ad, HEADS)
    out = ensure_gguf(tmp_path / "p", BASE, "p")
    assert out == tmp_path / "p" / "adapter_model.llama.gguf"
    direct = tensors_of(write_gguf_adapter(tmp_path / "g.gguf", ad))
    converted = tensors_of(out)
    assert converted.keys() == direct.keys()
    for name in direct:
        assert np.array_equal(converted[name], direct[name]), name
    assert check_adapter(out, BASE, "p") == (4.0, (2,), 4)


def test_q_and_k_rows_follow_the_rotary_layout() -> None:
    # the converter's permutation (reshape form) agrees with the layout written row by row
    b = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    assert np.array_equal(permute_rows(b, 2), b[hf_row_order(8, 2)])
    assert np.array_equal(permute_rows(b, 1), b[hf_row_order(8, 1)])


def test_rslora_and_alpha_pattern_fold_into_b(tmp_path: Path) -> None:
    ad = adapter(rank=4, alpha=8.0, targets=("attn_v", "ffn_down"))
    write_peft_adapter(
        tmp_path / "p",
        ad,
        HEADS,
        extra_config={
            "use_rslora": True,
            "alpha_pattern": {"down_proj": 2.0},
        },
    )
    got = tensors_of(ensure_gguf(tmp_path / "p", BASE, "p"))
    # llama.cpp applies alpha/r = 2; PEFT wants alpha/sqrt(r) = 4 (v) and 2/sqrt(r) = 1 (down)
    v_b = ad.pairs["blk.0.attn_v.weight"][1]
    down_b = ad.pairs["blk.0.ffn_down.weight"][1]
    assert np.allclose(got["blk.0.attn_v.weight.lora_b"], v_b * 2.0)
    assert np.allclose(got["blk.0.ffn_down.weight.lora_b"], down_b * 0.5)
    assert np.array_equal(got["blk.0.attn_v.weight.lora_a"], ad.pairs["blk.0.attn_v.weight"][0])


def test_bf16_and_f16_sources_are_read(tmp_path: Path) -> None:
    x = np.array([[1.5, -2.25], [0.0, 3.0]], np.float32)
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)
    path = tmp_path / "t.safetensors"
    header = {
        "a": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
        "b": {"dtype": "F16", "shape": [2, 2], "data_offsets": [8, 16]},
    }
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + bf16.tobytes() + x.astype(np.float16).tobytes())
    got = read_safetensors(path)
    assert np.array_equal(got["a"], x) and got["b"].dtype == np.float16


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        ({"use_dora": True}, {}, "DoRA"),
        ({"bias": "all"}, {}, "trains biases"),
        ({"fan_in_fan_out": True}, {}, "fan_in_fan_out"),
        ({"peft_type": "IA3"}, {}, "only LoRA"),
        (
            {},
            {"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((2, 32), np.float32)},
            "embed_tokens",
        ),
        (
            {},
            {"base_model.model.model.layers.0.self_attn.rotary.lora_A.weight": np.zeros((2, 8), np.float32)},
            "target module 'rotary'",
        ),
        ({}, {"base_model.model.lm_head.lora_A.weight": np.zeros((2, 8), np.float32)}, "ties its output"),
        ({}, {"base_model.model.lm_head.weight": np.zeros((32, 8), np.float32)}, "modules_to_save"),
    ],
)
def test_unsupported_peft_adapters_say_why(tmp_path: Path, config: dict, tensors: dict, message: str) -> None:
    write_peft_adapter(tmp_path / "p", adapter(), HEADS, extra_config=config, extra_tensors=tensors)
    with pytest.raises(LoraError, match=message):
        ensure_gguf(tmp_path / "p", BASE, "p")


def test_unsupported_architecture_points_to_llama_cpp_converter(tmp_path: Path) -> None:
    write_peft_adapter(tmp_path / "p", adapter(), HEADS)
    other = BaseFacts("phi3", BASE.shapes, 2, 1)
    with pytest.raises(LoraError, match="convert_lora_to_gguf"):
        ensure_gguf(tmp_path / "p", other, "p")


def test_gemma_keeps_q_and_k_rows(tmp_path: Path) -> None:
    write_peft_adapter(tmp_path / "p", adapter(), HEADS)
    peft = read_safetensors(tmp_path / "p" / "adapter_model.safetensors")
    gemma = BaseFacts("gemma3", BASE.shapes, 2, 1)
    got = tensors_of(ensure_gguf(tmp_path / "p", gemma, "p"))
    for module, target in (("q_proj", "attn_q"), ("k_proj", "attn_k")):
        hf_b = peft[f"base_model.model.model.layers.0.self_attn.{module}.lora_B.weight"]
        assert np.array_equal(got[f"blk.0.{target}.weight.lora_b"], hf_b)  # no rotary reorder


def test_the_conversion_is_cached_and_redone_when_the_source_changes(tmp_path: Path) -> None:
    write_peft_adapter(tmp_path / "p", adapter(seed=1), HEADS)
    first = ensure_gguf(tmp_path / "p", BASE, "p")
    stamp = first.stat().st_mtime_ns
    assert ensure_gguf(tmp_path / "p", BASE, "p") == first
    assert first.stat().st_mtime_ns == stamp  # not rewritten
    write_peft_adapter(tmp_path / "p", adapter(seed=2), HEADS)
    os.utime(tmp_path / "p" / "adapter_model.safetensors", ns=(1, stamp + 10**9))
    second = ensure_gguf(tmp_path / "p", BASE, "p")
    assert np.array_equal(
        tensors_of(second)["blk.0.attn_v.weight.lora_a"], adapter(seed=2).pairs["blk.0.attn_v.weight"][0]
    )


def test_an_unwritable_adapter_folder_caches_in_the_private_user_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write_peft_adapter(tmp_path / "p", adapter(seed=3), HEADS)
    # A folder where the beside-the-adapter file would go: that write fails (as in a
    # read-only folder), so the conversion lands in ~/.cache/kodkod/lora, private to the user.
    (tmp_path / "p" / f"adapter_model.{BASE.arch}.gguf").mkdir()
    path = ensure_gguf(tmp_path / "p", BASE, "p")
    assert path.parent == tmp_path / "cache" / "kodkod" / "lora"
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert ensure_gguf(tmp_path / "p", BASE, "p") == path  # found again in the cache
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp left


def test_library_checks_request_adapters(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    write_gguf_tensors(
        model,
        "llama",
        {n: np.zeros(tuple(reversed(s)), np.float32) for n, s in BASE.shapes.items()},
        general_type="model",
    )
    loras = tmp_path / "loras"
    write_gguf_adapter(loras / "good.gguf", adapter())
    write_gguf_adapter(loras / "gemma.gguf", Adapter("gemma3", 4.0, adapter().pairs))
    library = LoraLibrary(loras, model)
    library.check_request((("good", 1.0),))
    assert library.prepare("good") is library.prepare("good")  # cached
    for adapters, message in [
        ((("good", 1.0), ("good", 0.5)), "listed twice"),
        ((("missing", 1.0),), "not found"),
        ((("gemma", 1.0),), "architecture 'gemma3'"),
    ]:
        with pytest.raises(RequestError, match=message):
            library.check_request(adapters)


def test_safetensors_written_by_the_library_round_trip(tmp_path: Path) -> None:
    x = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_file(x, str(tmp_path / "x.safetensors"))
    assert np.array_equal(read_safetensors(tmp_path / "x.safetensors")["w"], x["w"])
