"""Load parameters: cache modes, context sizes, RoPE, GPU fields, precedence, tabby_config.yml,
and load progress events."""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import pytest

from kodkod.core.backend_types import ModelInfo
from kodkod.models.context import plan_context
from kodkod.models.loading import build_params, build_plan_params, plan_load, read_tabby_config
from kodkod.models.params import (
    LoadParamError,
    ModelLoadParams,
    auto_rope_alpha,
    cache_types,
    clamp_chunk_size,
    context_sizes,
    needs_flash_attention,
    rope_settings,
)
from kodkod.models.placement import gpu_placement, tensor_split
from kodkod.models.progress import ConsoleProgress, LoadProgress, ProgressEvent
from kodkod.models.registry import ModelEntry
from kodkod.settings import Settings
from kodkod.settings.cache_mode import normalise_cache_mode


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("FP16", ("f16", "f16")),
        ("fp16", ("f16", "f16")),
        ("Q8", ("q8_0", "q8_0")),
        ("Q6", ("q8_0", "q8_0")),  # no 6-bit type: the nearest at least as precise
        ("Q4", ("q4_0", "q4_0")),
        ("8,8", ("q8_0", "q8_0")),
        ("4,6", ("q4_0", "q8_0")),
        ("8, 5", ("q8_0", "q5_1")),
        ("2,3", ("q4_0", "q4_0")),
        ("q8_0", ("q8_0", "q8_0")),
        ("q8_0,q4_0", ("q8_0", "q4_0")),
        ("F16,Q5_0", ("f16", "q5_0")),
        ("iq4_nl", ("iq4_nl", "iq4_nl")),
    ],
)
def test_cache_types(mode: str, expected: tuple[str, str]) -> None:
    assert cache_types(mode) == expected


@pytest.mark.parametrize("mode", ["Q3", "9,9", "1,4", "8,8,8", "q7_0", "", "banana"])
def test_cache_types_refuses_unknown(mode: str) -> None:
    if mode == "":
        assert cache_types(mode) == ("f16", "f16")  # empty means the default
        return
    with pytest.raises(LoadParamError, match="cache_mode"):
        cache_types(mode)


def test_normalised_mode_and_flash_attention() -> None:
    assert normalise_cache_mode("q6") == "Q6"
    assert normalise_cache_mode(" 8, 4 ") == "8,4"
    assert normalise_cache_mode("Q8_0,F16") == "q8_0,f16"
    assert needs_flash_attention("q4_0") and not needs_flash_attention("f16")


def test_context_sizes() -> None:
    assert context_sizes(8192, None, None) == (8192, 8192)
    assert context_sizes(8192, -1, None) == (8192, 8192)
    assert context_sizes(0, None, None) == (8192, 8192)  # unknown trained context
    assert context_sizes(8192, 1000, None) == (1000, 1024)  # cache rounded up to 256
    assert context_sizes(8192, 4096, 2048) == (2048, 2048)  # max_seq_len clamped to the cache
    assert context_sizes(2048, 8192, 16384) == (8192, 16384)  # beyond training: allowed (RoPE)
    with pytest.raises(LoadParamError):
        context_sizes(8192, 8, None)
    assert clamp_chunk_size(2048, 1024) == 1024 and clamp_chunk_size(4, 1024) == 16


def test_rope() -> None:
    assert auto_rope_alpha(4096, 8192) == 1.0
    assert auto_rope_alpha(16384, 8192) == pytest.approx(-0.13436 + 0.80541 * 2 + 0.28833 * 4)
    plain = rope_settings(None, None, max_seq_len=4096, n_ctx_train=8192, freq_base=1e4, head_dim=64)
    assert (plain.freq_scale, plain.freq_base, plain.alpha, plain.scale) == (0.0, 0.0, 1.0, 1.0)
    linear = rope_settings(2.0, 1.0, max_seq_len=4096, n_ctx_train=8192, freq_base=1e4, head_dim=64)
    assert linear.freq_scale == 0.5 and linear.freq_base == 0.0
    ntk = rope_settings(None, 2.0, max_seq_len=4096, n_ctx_train=8192, freq_base=1e4, head_dim=64)
    assert ntk.freq_base == pytest.approx(1e4 * 2 ** (64 / 62))
    auto = rope_settings(None, "auto", max_seq_len=16384, n_ctx_train=8192, freq_base=1e4, head_dim=64)
    assert auto.alpha == pytest.approx(auto_rope_alpha(16384, 8192))
    assert math.isclose(auto.freq_base, 1e4 * auto.alpha ** (64 / 62))
    with pytest.raises(LoadParamError, match="rope_alpha"):
        rope_settings(None, "big", max_seq_len=1, n_ctx_train=1, freq_base=1e4, head_dim=64)


GPU_EXAMPLE = {  # TabbyAPI's documented load example, less the name
    "max_seq_len": 8192,
    "tensor_parallel": True,
    "gpu_split_auto": False,
    "gpu_split": [20.0, 25.0],
    "cache_mode": "Q8",
}


def test_gpu_fields_without_devices_are_noted_once_each() -> None:
    assert gpu_placement({}, {}, devices_available=False) == (None, [])
    defaults = {"gpu_split_auto": True, "autosplit_reserve": [96.0], "gpu_split": []}
    assert gpu_placement(defaults, {}, devices_available=False) == (None, [])
    asked = {**GPU_EXAMPLE, "autosplit_reserve": [512.0], "tensor_parallel_backend": "nccl"}
    placement, notes = gpu_placement(asked, {"draft_gpu_split": [1.0]}, devices_available=False)
    assert placement is None
    named = [n.split(":")[0] for n in notes]
    assert named == [
        "tensor_parallel",
        "tensor_parallel_backend",
        "gpu_split_auto",
        "autosplit_reserve",
        "gpu_split",
        "draft_gpu_split",
    ]
    assert all("ignored" in n and "runs on the CPU" in n for n in notes)
    assert "gpu_split: [20, 25] ignored" in notes[4]


def test_gpu_fields_with_devices() -> None:
    auto, notes = gpu_placement({}, {}, devices_available=True)
    assert auto is not None and auto.split_mode == "layer" and auto.tensor_split == () and notes == []
    manual, _ = gpu_placement({"gpu_split": [20.0, 10.0]}, {}, devices_available=True)
    assert manual is not None and manual.split_mode == "layer"
    assert manual.tensor_split == pytest.approx((2 / 3, 1 / 3))
    tp, _ = gpu_placement({"tensor_parallel": True}, {}, devices_available=True)
    assert tp is not None and tp.split_mode == "row"
    single, _ = gpu_placement({"gpu_split_auto": False}, {}, devices_available=True)
    assert single is not None and single.split_mode == "none"
    reserve, notes = gpu_placement({"autosplit_reserve": [1024.0]}, {}, devices_available=True)
    assert reserve is not None and reserve.split_mode == "layer"
    assert len(notes) == 1 and notes[0].startswith("autosplit_reserve: [1024] ignored")


def test_tensor_split_is_proportional_to_the_gb_per_device() -> None:
    assert tensor_split([20, 25]) == pytest.approx((20 / 45, 25 / 45))
    assert tensor_split([0, 8, 8]) == pytest.approx((0.0, 0.5, 0.5))  # 0: that device unused
    assert tensor_split([3.5]) == (1.0,)
    assert sum(tensor_split([1e-6, 7, 1e6])) == pytest.approx(1.0)
    for bad in ([], [0, 0], [-1, 2]):
        with pytest.raises(LoadParamError, match="gpu_split"):
            tensor_split(bad)


def test_the_documented_gpu_example_plans_with_notes(tmp_path: Path) -> None:
    entry = _model_folder(tmp_path, "model:\n  autosplit_reserve: [512]\n  gpu_splitt: [1]\n")
    params, notes = build_plan_params(Settings(), entry, GPU_EXAMPLE, startup=False)
    assert params.max_seq_len == 8192 and params.cache_mode == "Q8" and params.placement is None
    assert notes[0] == (
        "tabby_config.yml in m: model: unknown key 'gpu_splitt' ignored; did you mean 'gpu_split'?"
    )
    assert [n.split(":")[0] for n in notes[1:]] == [
        "tensor_parallel",
        "gpu_split_auto",
        "autosplit_reserve",
        "gpu_split",
    ]


# -- precedence ------------------------------------------------------------------------------


def _model_folder(tmp_path: Path, tabby: str | None) -> ModelEntry:
    folder = tmp_path / "models" / "m"
    folder.mkdir(parents=True)
    (folder / "m.gguf").write_bytes(b"GGUF")
    if tabby is not None:
        (folder / "tabby_config.yml").write_text(tabby, encoding="utf-8")
    return ModelEntry("m", folder / "m.gguf", folder)


def _settings(**model: object) -> Settings:
    return Settings.model_validate({"model": model})


def test_precedence_use_as_default_request_tabby_config(tmp_path: Path) -> None:
    entry = _model_folder(
        tmp_path, "model:\n  cache_mode: Q4\n  chunk_size: 256\ndraft_model:\n  draft_model_name: d\n"
    )
    settings = _settings(
        use_as_default=["max_seq_len", "cache_mode", "chunk_size", "max_batch_size"],
        max_seq_len=2048,
        cache_mode="Q8",
        chunk_size=512,
        max_batch_size=3,
    )
    p = build_params(settings, entry, {"max_seq_len": 1024, "chunk_size": 1024}, startup=False)
    assert p.max_seq_len == 1024  # request beats use_as_default
    assert p.cache_mode == "Q4"  # tabby_config beats use_as_default
    assert p.chunk_size == 256  # tabby_config beats the request (2026-07-18+ order)
    assert p.max_batch_size == 3  # use_as_default when nothing else sets it
    assert p.draft is not None and p.draft.draft_model_name == "d"
    bare = build_params(_settings(max_seq_len=2048), entry, {}, startup=False)
    assert bare.max_seq_len is None  # config values do not apply to API loads by themselves
    startup = build_params(_settings(max_seq_len=2048, cache_mode="Q8"), entry, {}, startup=True)
    assert startup.max_seq_len == 2048 and startup.cache_mode == "Q4"


def test_draft_blocks_merge_separately(tmp_path: Path) -> None:
    entry = _model_folder(tmp_path, "model:\n  max_seq_len: 512\ndraft_model:\n  draft_cache_mode: Q8\n")
    settings = Settings.model_validate(
        {"model": {"use_as_default": ["draft_rope_scale"]}, "draft_model": {"draft_rope_scale": 2.0}}
    )
    p = build_params(
        settings,
        entry,
        {"draft_model": {"draft_model_name": "x", "draft_cache_mode": "Q4"}},
        startup=False,
    )
    assert p.max_seq_len == 512
    assert p.draft is not None
    assert (p.draft.draft_model_name, p.draft.draft_cache_mode, p.draft.draft_rope_scale) == ("x", "Q8", 2.0)


def test_old_flat_tabby_config_layout(tmp_path: Path) -> None:
    entry = _model_folder(tmp_path, "max_seq_len: 777\ndraft:\n  draft_model_name: y\n")
    model, draft = read_tabby_config(entry.folder)
    assert model == {"max_seq_len": 777} and draft == {"draft_model_name": "y"}


@pytest.mark.parametrize(
    ("tabby", "match"),
    [
        ("model:\n  cache_size: lots\n", "cache_size"),
        ("model:\n  cache_mode: Q3\n", "cache_mode"),
        ("model:\n  vision: true\n", "vision"),
        ("model:\n  gpu_split: [-8]\n", "gpu_split"),
        ("model:\n  backend: vllm\n", "backend"),
        ("model:\n  rope_alpha: lots\n", "rope_alpha"),
        ("draft_model:\n  draft_mode: sometimes\n", "draft_mode"),
        ("model: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_values_are_load_param_errors(tmp_path: Path, tabby: str, match: str) -> None:
    entry = _model_folder(tmp_path, tabby)
    with pytest.raises(LoadParamError, match=match):
        build_params(_settings(), entry, {}, startup=False)


def test_plan_load_resolves_the_draft(tmp_path: Path) -> None:
    _model_folder(tmp_path, "draft_model:\n  draft_model_name: m\n")
    plan = plan_load(_settings(), tmp_path / "models", tmp_path / "models", "m", {}, startup=False)
    assert plan.draft_entry is not None and plan.draft_entry.name == "m"
    (tmp_path / "models" / "m" / "tabby_config.yml").unlink()
    with pytest.raises(ValueError, match="draft model"):
        plan_load(
            _settings(),
            tmp_path / "models",
            tmp_path / "models",
            "m",
            {"draft_model": {"draft_model_name": "missing"}},
            startup=False,
        )


def test_plan_context_forces_flash_attention_for_quantised_v() -> None:
    info = ModelInfo(
        name="m",
        path=Path("m.gguf"),
        architecture="llama",
        n_vocab=10,
        n_ctx_train=0,
        n_params=1,
        size_bytes=1,
        bos_id=None,
        eos_ids=frozenset(),
        add_bos=False,
        bos_text="",
        eos_text="",
        chat_template=None,
        metadata={
            "llama.context_length": "4096",
            "llama.attention.head_count": "4",
            "llama.embedding_length": "256",
            "llama.rope.freq_base": "10000",
        },
    )
    params = ModelLoadParams(cache_mode="8,4", flash_attention=False, max_batch_size=4)
    plan = plan_context(params, info, n_threads=2)
    assert plan.max_seq_len == 4096  # from metadata when hparams were not loaded
    assert (plan.config.cache_type_k, plan.config.cache_type_v) == ("q8_0", "q4_0")
    assert plan.config.flash_attention and plan.cache_mode == "8,4"
    assert plan.num_slots == 12
    k_only = plan_context(ModelLoadParams(cache_mode="q8_0,f16", flash_attention=False), info, 2)
    assert not k_only.config.flash_attention


# -- progress --------------------------------------------------------------------------------


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_fills_gaps_and_finishes_each_component(caplog: pytest.LogCaptureFixture) -> None:
    events: list[ProgressEvent] = []
    caplog.set_level(logging.INFO, logger="kodkod.models.progress")
    progress = LoadProgress("m", events.append, ConsoleProgress("m", io.StringIO()), modules=10)
    draft = progress.callback("draft")
    for fraction in (0.0, 0.05, 0.72, 0.5, 1.0):  # jumps ahead, goes back: never skipped/repeated
        draft(fraction)
    progress.finish("draft")
    progress.callback("model")(0.3)
    progress.finish("model")
    got = [(e.model_type, e.module, e.status) for e in events]
    assert got == (
        [("draft", m, "processing") for m in range(1, 11)]
        + [("draft", 10, "finished")]
        + [("model", m, "processing") for m in range(1, 11)]
        + [("model", 10, "finished")]
    )
    assert events[0].as_dict() == {"model_type": "draft", "module": 1, "modules": 10, "status": "processing"}
    lines = [r.getMessage() for r in caplog.records]
    assert "loading m (draft): 70%" in lines and "loading m (model): 100%" in lines
    assert "loading m (draft): 60%" not in lines  # one line per 10 % reached, not per step


def test_progress_bar_on_a_terminal() -> None:
    tty = _Tty()
    progress = LoadProgress("m", None, ConsoleProgress("m", tty), modules=4)
    progress.callback("model")(0.5)
    progress.finish("model")
    text = tty.getvalue()
    assert text.startswith("\rloading m (model) [") and " 50%" in text and text.endswith("100%\n")
