"""kodkod's configuration: config.yml + environment variables + CLI flags, validated by pydantic.

Use it like this::

    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)                       # --config PATH, --port, --model-name, ...
    ns = parser.parse_args()
    result = load_settings(None, cli_overrides_from_namespace(ns), os.environ)
    for warning in result.warnings: log.warning(warning)
    validate_paths(result.settings)                 # not for `kodkod models fetch`
    settings = result.settings                      # settings.network.port, settings.model.*

Sources are merged per key, later wins: config.yml < environment < CLI; a null never overrides.
The file is `--config PATH`, else the `config_path` argument, else ./config.yml if it exists.
Environment variables are `KODKOD_<SECTION>_<KEY>` or `TABBY_<SECTION>_<KEY>` (KODKOD_ wins);
CLI flags are the key with dashes and no section (`--max-seq-len 8192`).

Unlike TabbyAPI, where `--config` makes every other flag be ignored, here the other flags still
apply on top of the file given with `--config`: a flag that is typed should take effect.

Invalid input raises `ConfigError` whose text is one line naming where the value came from
(`config.yml:12: model.max_seq_len: expected an integer, got 'abc'`, `environment
TABBY_NETWORK_PORT: ...`, `--port: ...`). Unknown sections and keys are only warnings.

Modules: `sections` and `model_section` (the section models), `schema` (`Settings` and schema
introspection), `load` (merging, validation, messages), `cli` (flags), `sample` (generates
`config_sample.yml`; `python -m kodkod.settings` prints it).
"""

from kodkod.settings.cli import add_cli_arguments, cli_overrides_from_namespace
from kodkod.settings.errors import ConfigError
from kodkod.settings.load import LoadResult, Origin, load_settings, parse_text, validate_paths
from kodkod.settings.model_section import DEFAULT_MAX_BATCH_SIZE, ModelSettings
from kodkod.settings.sample import SAMPLE_OVERRIDES, render_sample_config
from kodkod.settings.schema import (
    FieldKind,
    Settings,
    cli_flag_table,
    field_kind,
    section_classes,
)
from kodkod.settings.sections import (
    API_SERVERS,
    DeveloperSettings,
    DraftModelSettings,
    EmbeddingsSettings,
    LimitsSettings,
    LoggingSettings,
    LoraSettings,
    LoraSpec,
    MemorySettings,
    NetworkSettings,
    SamplingSettings,
)

__all__ = [
    "API_SERVERS",
    "DEFAULT_MAX_BATCH_SIZE",
    "SAMPLE_OVERRIDES",
    "ConfigError",
    "DeveloperSettings",
    "DraftModelSettings",
    "EmbeddingsSettings",
    "FieldKind",
    "LimitsSettings",
    "LoadResult",
    "LoggingSettings",
    "LoraSettings",
    "LoraSpec",
    "MemorySettings",
    "ModelSettings",
    "NetworkSettings",
    "Origin",
    "SamplingSettings",
    "Settings",
    "add_cli_arguments",
    "cli_flag_table",
    "cli_overrides_from_namespace",
    "field_kind",
    "load_settings",
    "parse_text",
    "render_sample_config",
    "section_classes",
    "validate_paths",
]
