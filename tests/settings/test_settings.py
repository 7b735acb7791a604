"""Tests for kodkod.settings: defaults, source precedence, error messages, CLI flags, the sample."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kodkod.settings import (
    ConfigError,
    LoadResult,
    Settings,
    add_cli_arguments,
    cli_flag_table,
    cli_overrides_from_namespace,
    load_settings,
    render_sample_config,
    section_classes,
    validate_paths,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = REPO_ROOT / "config_sample.yml"


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each test in an empty directory so a developer's ./config.yml never leaks in."""
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str, name: str = "config.yml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(
    path: Path | None = None, cli: dict[str, object] | None = None, env: dict[str, str] | None = None
) -> LoadResult:
    return load_settings(path, cli, env or {})


def parse_flags(*argv: str) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return cli_overrides_from_namespace(parser.parse_args(list(argv)))


def config_error(
    path: Path | None = None, cli: dict[str, object] | None = None, env: dict[str, str] | None = None
) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, cli, env)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- defaults ------------------------------------------------------------------------------------


def test_defaults_match_reference() -> None:
    s = Settings()
    assert (s.network.host, s.network.port) == ("127.0.0.1", 5000)
    assert s.network.api_servers == ["OAI"]
    assert s.network.disable_auth is False
    assert s.network.sse_ping_interval == 15
    assert s.logging.log_chat_completion_requests is False
    assert s.model.model_dir == "models"
    assert s.model.model_name is None
    assert s.model.dummy_model_names == ["gpt-3.5-turbo"]
    assert s.model.use_as_default == []
    assert s.model.chunk_size == 2048
    assert s.model.cache_mode == "FP16"
    assert s.model.gpu_split_auto is True
    assert s.model.autosplit_reserve == [96]
    assert s.model.gpu_split == []
    assert s.model.rope_scale == 1.0 and s.model.rope_alpha is None
    assert s.model.tensor_parallel_backend == "native"
    assert s.model.output_chunking is True
    assert s.model.reasoning_start_token == "<think>"
    assert s.model.reasoning_end_token == "</think>"
    assert s.model.start_in_reasoning == "auto"
    assert s.model.tool_calls_in_reasoning is True
    assert s.model.harmony is None and s.model.muse_glimmer is None
    assert s.model.template_vars_default == {} and s.model.template_vars_force == {}
    assert s.model.max_batch_size is None and s.model.effective_max_batch_size() == 32
    assert s.model.flash_attention is True
    assert s.draft_model.draft_mode == "model"
    assert s.draft_model.draft_model_dir == "models"
    assert s.draft_model.draft_cache_mode == "FP16"
    assert s.draft_model.ngram_match_min == 2
    assert s.lora.lora_dir == "loras" and s.lora.loras is None
    assert s.embeddings.embeddings_device == "cpu"
    assert s.sampling.override_preset is None
    assert s.memory.sysmem_recurrent_cache == 4096 and s.memory.cuda_malloc_async is True
    assert s.developer.seqlog_server_url == "http://localhost:5341"


def test_no_file_means_defaults() -> None:
    result = load()
    assert result.settings == Settings()
    assert result.warnings == [] and result.config_file is None


def test_config_yml_in_working_directory_is_read(tmp_path: Path) -> None:
    write(tmp_path, "network:\n  port: 5123\n")
    assert load().settings.network.port == 5123


def test_n_threads_defaults_to_usable_cpus() -> None:
    assert Settings().model.effective_n_threads() == len(os.sched_getaffinity(0))
    assert Settings.model_validate({"model": {"n_threads": 3}}).model.effective_n_threads() == 3


def test_api_server_set_is_lowercase_and_never_empty() -> None:
    s = Settings.model_validate({"network": {"api_servers": ["OAI", "Kobold"]}})
    assert s.network.api_server_set() == {"oai", "kobold"}
    empty = Settings.model_validate({"network": {"api_servers": []}})
    assert empty.network.api_server_set() == {"oai"}


# --- precedence ----------------------------------------------------------------------------------


def test_precedence_file_env_cli(tmp_path: Path) -> None:
    path = write(tmp_path, "network:\n  port: 6000\n  host: 0.0.0.0\nmodel:\n  max_seq_len: 1024\n")
    env = {"TABBY_NETWORK_PORT": "7000", "TABBY_MODEL_MAX_SEQ_LEN": "2048"}
    s = load(path, {"port": "8000"}, env).settings
    assert s.network.port == 8000  # CLI beats env and file
    assert s.model.max_seq_len == 2048  # env beats file
    assert s.network.host == "0.0.0.0"  # file beats default


def test_kodkod_prefix_wins_over_tabby() -> None:
    env = {
        "TABBY_NETWORK_PORT": "7000",
        "KODKOD_NETWORK_PORT": "7100",
        "KODKOD_DRAFT_MODEL_DRAFT_MODEL_NAME": "tiny",
    }
    s = load(env=env).settings
    assert s.network.port == 7100
    assert s.draft_model.draft_model_name == "tiny"


def test_null_never_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "network:\n  port: null\n  api_servers:\nmodel:\n")
    s = load(path, {"host": None}, {"TABBY_NETWORK_HOST": ""}).settings
    assert s == Settings()


def test_env_values_parse_by_type() -> None:
    env = {
        "TABBY_NETWORK_DISABLE_AUTH": "yes",
        "TABBY_MODEL_GPU_SPLIT": "20, 24",
        "TABBY_MODEL_AUTOSPLIT_RESERVE": "[128, 64]",
        "TABBY_MODEL_ROPE_ALPHA": "auto",
        "TABBY_MODEL_TEMPLATE_VARS_DEFAULT": '{"enable_thinking": false}',
        "TABBY_LORA_LORAS": "[{name: style, scaling: 0.5}]",
    }
    s = load(env=env).settings
    assert s.network.disable_auth is True
    assert s.model.gpu_split == [20.0, 24.0]
    assert s.model.autosplit_reserve == [128.0, 64.0]
    assert s.model.rope_alpha == "auto"
    assert s.model.template_vars_default == {"enable_thinking": False}
    assert s.lora.loras is not None and s.lora.loras[0].scaling == 0.5


# --- errors and warnings -------------------------------------------------------------------------


def test_broken_yaml_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "network:\n  port: 5000\n host: x\n")
    message = config_error(path)
    assert message.startswith(f"{path}:3:")
    assert "invalid YAML" in message


def test_wrong_type_names_key_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "network:\n  port: 5000\n\nmodel:\n  max_seq_len: abc\n")
    assert config_error(path) == f"{path}:5: model.max_seq_len: expected an integer, got 'abc'"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("network:\n  port: 70000\n", ":2: network.port: must be <= 65535"),
        ("network:\n  port: 0\n", ":2: network.port: must be >= 1"),
        ("network:\n  port: true\n", ":2: network.port: expected an integer, got true"),
        ("model:\n  chunk_size: 0\n", ":2: model.chunk_size: must be > 0"),
        ("network:\n  sse_ping_interval: -1\n", ":2: network.sse_ping_interval: must be >= 0"),
        ("model:\n  cache_size: 300\n", ":2: model.cache_size: expected a positive multiple"),
        ("model:\n  cache_size: 0\n", ":2: model.cache_size: expected a positive multiple"),
        ("network:\n  api_servers: [oai, soap]\n", ":2: network.api_servers: expected one of"),
        (
            # "auto" is accepted, as for model.rope_alpha and the load request (one rule)
            "draft_model:\n  draft_rope_alpha: lots\n",
            ":2: draft_model.draft_rope_alpha: expected a number or 'auto', got 'lots'",
        ),
        (
            "lora:\n  loras:\n    - name: a\n    - name: b\n      scaling: -1\n",
            ":5: lora.loras[1].scaling: must be >= 0",
        ),
        ("- a\n", ":1: expected a mapping of sections"),
        ("\nmodel: [1, 2]\n", ":2: model: expected a mapping of keys, got a list"),
    ],
)
def test_invalid_values_name_line_and_key(tmp_path: Path, body: str, expected: str) -> None:
    path = write(tmp_path, body)
    message = config_error(path)
    assert message.startswith(str(path) + expected), message


def test_cache_size_multiple_of_256_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  cache_size: 4096\n  rope_alpha: 2.5\n")
    s = load(path).settings
    assert s.model.cache_size == 4096 and s.model.rope_alpha == 2.5


def test_unknown_keys_are_warnings_with_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "network:\n  port: 5001\nmodel:\n  foo: 1\nextras:\n  x: 1\n")
    result = load(path)
    assert result.settings.network.port == 5001
    assert result.warnings == [
        f"{path}:4: unknown key 'model.foo' (ignored)",
        f"{path}:5: unknown section 'extras' (ignored)",
    ]
    assert not hasattr(result.settings.model, "foo")
    assert "foo" not in result.settings.model.model_dump()


def test_env_error_names_variable() -> None:
    message = config_error(env={"TABBY_NETWORK_PORT": "x"})
    assert message == "environment TABBY_NETWORK_PORT: expected an integer, got 'x'"


def test_unknown_env_key_warns() -> None:
    result = load(env={"KODKOD_MODEL_FOO": "1", "UNRELATED": "x"})
    assert result.warnings == ["environment KODKOD_MODEL_FOO: unknown key 'model.foo' (ignored)"]


def test_cli_error_names_flag() -> None:
    assert config_error(cli=parse_flags("--port", "x")).startswith("--port: expected an integer")
    assert config_error(cli=parse_flags("--disable-auth", "maybe")).startswith("--disable-auth:")


def test_missing_model_dir(tmp_path: Path) -> None:
    s = load(cli={"model_dir": str(tmp_path / "nowhere")}).settings
    with pytest.raises(ConfigError, match=r"model\.model_dir '.*nowhere' does not exist"):
        validate_paths(s)
    (tmp_path / "nowhere").mkdir()
    validate_paths(s)


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    assert "cannot read config file" in config_error(tmp_path / "absent.yml")


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_flags_parse_lists_and_booleans() -> None:
    flags = parse_flags(
        "--gpu-split",
        "20",
        "24",
        "--api-servers",
        "OAI",
        "kobold",
        "--disable-auth",
        "true",
        "--model-name",
        "X",
        "--max-seq-len",
        "8192",
        "--draft-model-name",
        "Y",
        "--override-preset",
        "safe_defaults",
        "--embedding-model-name",
        "Z",
        "--host",
        "0.0.0.0",
    )
    s = load(cli=flags).settings
    assert s.model.gpu_split == [20.0, 24.0]
    assert s.network.api_server_set() == {"oai", "kobold"}
    assert s.network.disable_auth is True
    assert (s.model.model_name, s.model.max_seq_len) == ("X", 8192)
    assert s.draft_model.draft_model_name == "Y"
    assert s.sampling.override_preset == "safe_defaults"
    assert s.embeddings.embedding_model_name == "Z"
    assert s.network.host == "0.0.0.0"


def test_unset_flags_are_not_overrides() -> None:
    assert parse_flags() == {}
    assert parse_flags("--port", "5001") == {"port": "5001"}


def test_structured_keys_have_no_flag() -> None:
    table = cli_flag_table()
    assert {"template_vars_default", "template_vars_force", "loras"}.isdisjoint(table)
    assert table["port"] == ("network", "port")
    with pytest.raises(SystemExit):
        parse_flags("--loras", "x")


def test_every_other_key_has_exactly_one_flag() -> None:
    keys = [key for cls in section_classes().values() for key in cls.model_fields]
    assert len(keys) == len(set(keys)), "two sections share a key name: CLI flags would collide"
    assert len(cli_flag_table()) == len(keys) - 3


def test_config_flag_picks_file_and_other_flags_still_apply(tmp_path: Path) -> None:
    write(tmp_path, "network:\n  port: 5001\n")
    other = write(tmp_path, "network:\n  port: 6001\n  host: 0.0.0.0\n", name="other.yml")
    result = load(cli=parse_flags("--config", str(other), "--host", "10.0.0.1"))
    assert result.settings.network.port == 6001
    assert result.settings.network.host == "10.0.0.1"
    assert result.config_file == other


# --- use_as_default ------------------------------------------------------------------------------


def test_use_as_default_splits_model_and_draft(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "model:\n  max_seq_len: 4096\n  cache_mode: Q8\n"
        "  use_as_default: [max_seq_len, cache_mode, draft_cache_mode, bogus]\n"
        "draft_model:\n  draft_cache_mode: Q4\n",
    )
    result = load(path)
    assert result.settings.model_defaults() == {"max_seq_len": 4096, "cache_mode": "Q8"}
    assert result.settings.draft_defaults() == {"draft_cache_mode": "Q4"}
    assert result.warnings == [f"{path}:4: model.use_as_default: unknown key 'bogus' (ignored)"]


# --- sample config -------------------------------------------------------------------------------


def test_sample_config_is_current() -> None:
    assert SAMPLE.read_text(encoding="utf-8") == render_sample_config(), (
        "config_sample.yml is stale; regenerate it with "
        "`PYTHONPATH=src python -m kodkod.settings > config_sample.yml`"
    )


def test_sample_round_trips_to_defaults_plus_overrides() -> None:
    result = load(SAMPLE)
    assert result.warnings == []
    expected = Settings.model_validate(
        {
            "model": {"model_name": "SmolLM2-135M-Instruct"},
            "sampling": {"override_preset": "safe_defaults"},
            "memory": {"sysmem_kv_cache": 1024},
        }
    )
    assert result.settings == expected


def test_sample_lists_every_key_with_a_comment() -> None:
    text = render_sample_config()
    data = yaml.safe_load(text)
    for section, cls in section_classes().items():
        assert set(data[section]) == set(cls.model_fields)
        for key in cls.model_fields:
            assert "  # " in text.split(f"\n  {key}:")[0].rsplit("\n\n", 1)[-1], key


def test_module_main_prints_sample() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kodkod.settings"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")},
    ).stdout
    assert out == render_sample_config()
