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
from kodkod.models.loading import build_params, plan_load, read_tabby_config
from kodkod.models.params import (
    LoadParamError,
    ModelLoadParams,
    auto_rope_alpha,
    cache_types,
    clamp_chunk_size,
    context_sizes,
    gpu_placement,
    needs_flash_attention,
    normalise_cache_mode,
    rope_settings,
)
from kodkod.models.progress import ConsoleProgress, LoadProgress, ProgressEvent
from kodkod.models.registry import ModelEntry
from kodkod.settings import Settings


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


def test_gpu_fields_without_gpu() -> None:
    assert gpu_placement(gpu_available=False) is None
    assert gpu_placement(gpu_available=False, gpu_split_auto=False, autosplit_reserve=[96]) is None
    for kwargs in (
        {"gpu_split": [20.0]},
        {"tensor_parallel": True},
        {"autosplit_reserve": [512.0]},
        {"draft_gpu_split": [1.0]},
    ):
        with pytest.raises(LoadParamError, match="no GPU in this build") as err:
            gpu_placement(gpu_available=False, **kwargs)  # type: ignore[arg-type]
        assert next(iter(kwargs)) in str(err.value)
    with pytest.raises(LoadParamError, match="tensor_parallel_backend"):
        gpu_placement(gpu_available=False, tensor_parallel_backend="mpi")


def test_gpu_fields_with_gpu() -> None:
    auto = gpu_placement(gpu_available=True)
    assert auto is not None and auto.split_mode == "layer" and auto.tensor_split == ()
    manual = gpu_placement(gpu_available=True, gpu_split=[20.0, 10.0])
    assert manual is not None and manual.split_mode == "layer"
    assert manual.tensor_split == pytest.approx((2 / 3, 1 / 3))
    tp = gpu_placement(gpu_available=True, tensor_parallel=True)
    assert tp is not None and tp.split_mode == "row"
    single = gpu_placement(gpu_available=True, gpu_split_auto=False)
    assert single is not None and single.split_mode == "none"
    with pytest.raises(LoadParamError, match="autosplit_reserve"):
        gpu_placement(gpu_available=True, autosplit_reserve=[1024.0])


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
        ("model:\n  gpu_split: [8]\n", "no GPU in this build"),
        ("model:\n  backend: exllamav3\n", "backend"),
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
