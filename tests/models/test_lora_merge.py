"""LoRA through llama.cpp's adapter API, proven against merged models (real default model,
in process, adapters built here).

The merged model is the base GGUF with every tensor dequantised to F32 and
scale·(alpha/r)·B·A added to the adapted weights (`tests/lora_fixtures.write_f32_model`). The
adapter path is compared on the same dequantised F32 base, so the only differences are
floating-point order (W·x + s·B·(A·x) against (W + s·B·A)·x). Both run with an F32 KV cache and
flash attention off: with the default F16 cache, rounding K/V to half precision amplifies those
last-bit differences to ~1.5e-2 over 30 layers.

Tolerance: max |logit difference| over every position and the whole vocabulary ≤ 1e-4 (logits
here reach ~30; measured 5.4e-5, 4.1e-5 with two adapters), while the adapter itself moves
logits by ~10.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from kodkod.backends.llamacpp.backend import LlamaCppBackend
from kodkod.core.backend_types import BatchRow, ContextConfig, ModelSource
from kodkod.models.lora import LoraLibrary
from tests.lora_fixtures import (
    make_adapter,
    model_facts,
    write_f32_model,
    write_gguf_adapter,
    write_peft_adapter,
)

pytestmark = pytest.mark.model

TOL = 1e-4
PROMPT = "The lighthouse keeper looked at the grey sea and wrote in his journal that"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[dict]:
    d = tmp_path_factory.mktemp("lora_merge")
    facts = model_facts(default_gguf)
    style = make_adapter(default_gguf, seed=1, strength=0.1)
    terse = make_adapter(
        default_gguf,
        seed=2,
        rank=8,
        alpha=4.0,
        layers=range(0, 30, 3),
        targets=("attn_v", "ffn_up", "ffn_down"),
        strength=0.2,
    )
    out = {
        "style": write_gguf_adapter(d / "loras" / "style.gguf", style),
        "terse": write_gguf_adapter(d / "loras" / "terse.gguf", terse),
        "peft": write_peft_adapter(d / "loras" / "style_peft", style, (facts.n_head, facts.n_head_kv)),
        "base_f32": write_f32_model(default_gguf, d / "base-f32.gguf"),
        "merged": write_f32_model(default_gguf, d / "merged-style.gguf", [(style, 1.0)]),
        "merged_two": write_f32_model(default_gguf, d / "merged-two.gguf", [(style, 0.5), (terse, 1.5)]),
        "dir": d / "loras",
    }
    yield out
    for key in ("base_f32", "merged", "merged_two"):  # ~540 MB each
        out[key].unlink(missing_ok=True)


def logits(model: Path, steps: Sequence[Sequence[tuple[str, Path, float]] | None]) -> list[np.ndarray]:
    """The prompt's logits (every position) once per step; a step activates those adapters
    (None: clears them) on one context, between decodes, like the engine does."""
    backend = LlamaCppBackend.load(
        ModelSource(model, "m"),
        lambda info: ContextConfig(
            cache_size=256,
            num_slots=1,
            batch_tokens=64,
            n_threads=1,
            cache_type_k="f32",
            cache_type_v="f32",
            flash_attention=False,
        ),
    )
    try:
        host = backend.capabilities.adapters
        assert host is not None
        ids = backend.tokenize(PROMPT, add_bos=True, parse_special=True)
        out = []
        for step in steps:
            if step is None:
                host.clear()
            else:
                host.activate(step)
            host.use(host.key_for(None))
            backend.kv_clear()
            (idx,) = backend.decode([BatchRow(0, ids, 0, len(ids))])
            out.append(np.stack([backend.logits(i).copy() for i in idx]))
        return out
    finally:
        backend.close()


def test_an_adapter_at_scale_1_matches_the_merged_model(files: dict) -> None:
    base, lora = logits(files["base_f32"], [[], [("style", files["style"], 1.0)]])
    (merged,) = logits(files["merged"], [[]])
    diff = float(np.abs(lora - merged).max())
    effect = float(np.abs(lora - base).max())
    print(f"adapter vs merged: max |Δlogit| = {diff:.2e}; adapter effect {effect:.2f}")
    assert diff <= TOL
    assert effect > 1.0
    assert np.array_equal(lora.argmax(axis=1), merged.argmax(axis=1))


def test_two_adapters_with_their_scalings_match_their_merge(files: dict) -> None:
    (lora,) = logits(files["base_f32"], [[("style", files["style"], 0.5), ("terse", files["terse"], 1.5)]])
    (merged,) = logits(files["merged_two"], [[]])
    diff = float(np.abs(lora - merged).max())
    print(f"two adapters vs merged: max |Δlogit| = {diff:.2e}")
    assert diff <= TOL


def test_scaling_zero_and_unloading_give_exactly_the_base(files: dict, default_gguf: Path) -> None:
    base, zero, with_style, cleared = logits(
        default_gguf,
        [
            [],
            [("style", files["style"], 0.0)],
            [("style", files["style"], 1.0)],
            None,
        ],
    )
    assert np.array_equal(zero, base)
    assert not np.array_equal(with_style, base)
    assert np.array_equal(cleared, base)


def test_peft_and_gguf_forms_give_identical_logits(files: dict, default_gguf: Path) -> None:
    library = LoraLibrary(files["dir"], default_gguf)
    prepared = library.prepare("style_peft")
    assert prepared.path.parent == files["peft"]  # converted and cached beside the adapter
    gguf_form, peft_form = logits(
        default_gguf,
        [
            [("style", files["style"], 1.0)],
            [("style_peft", prepared.path, 1.0)],
        ],
    )
    assert np.array_equal(gguf_form, peft_form)


def test_on_the_quantised_model_the_adapter_stays_near_the_merge(files: dict, default_gguf: Path) -> None:
    """Informative: on the Q4_1 base the adapter rides on quantised weights, so the distance to
    the F32 merge is the base's quantisation error (measured ~1.1 max |Δlogit|), not LoRA's."""
    quant_base, quant_lora = logits(default_gguf, [[], [("style", files["style"], 1.0)]])
    (f32_base,) = logits(files["base_f32"], [[]])
    (merged,) = logits(files["merged"], [[]])
    lora_gap = float(np.abs(quant_lora - merged).max())
    quant_gap = float(np.abs(quant_base - f32_base).max())
    print(f"Q4_1+adapter vs merged F32: {lora_gap:.3f}; Q4_1 vs F32 base: {quant_gap:.3f}")
    assert lora_gap < 2 * quant_gap
    assert quant_lora[-1].argmax() == merged[-1].argmax()
