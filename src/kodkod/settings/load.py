"""Build `Settings` from config.yml, environment variables and CLI flags.

`load_settings` collects one layer per source, each mapping (section, key) to a value and the
`Origin` it came from, merges them per key (file < environment < CLI; nulls never override),
then validates the result once with pydantic. A validation error is turned into a one-line
`ConfigError` that points at the origin of the offending value: `file:line: dotted.key: ...`,
`environment VAR: ...` or `--flag: ...`. Unknown sections and keys only produce warnings, which
name the closest known one (`unknown key 'model.gpu_splt' (ignored); did you mean 'gpu_split'?`).

YAML is composed into a node tree first so every key's line number is known, then constructed
from that same tree. Text values from the environment or the CLI are pre-parsed by the kind of
their key (`FieldKind`): lists accept a YAML/JSON list literal or comma-separated items,
structured keys a YAML/JSON literal; scalars go to pydantic as strings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from kodkod.settings.errors import ConfigError
from kodkod.settings.load_param import unknown_key_hint
from kodkod.settings.schema import (
    FieldKind,
    Settings,
    cli_flag_table,
    field_kind,
    section_classes,
)

DEFAULT_CONFIG_FILE = "config.yml"
ENV_PREFIXES = ("TABBY_", "KODKOD_")
"""Environment prefixes, lowest priority first (KODKOD_ wins over TABBY_)."""

_Key = tuple[str, str]
_Path = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a configured value came from."""

    kind: Literal["file", "env", "cli"]
    name: str  # file path as given, variable name, or flag
    line: int | None = None


@dataclass(slots=True)
class LoadResult:
    """Validated settings plus the warnings collected while loading."""

    settings: Settings
    warnings: list[str]
    config_file: Path | None = None


@dataclass(slots=True)
class _Layer:
    values: dict[_Key, tuple[object, Origin]]
    lines: dict[_Path, int]


def load_settings(
    config_path: Path | None,
    cli: Mapping[str, object] | None,
    environ: Mapping[str, str],
) -> LoadResult:
    """Load and validate the configuration; raises ConfigError on any invalid input.

    `config_path` None means ./config.yml if it exists, else defaults only. A `config` entry in
    `cli` (the `--config` flag) picks the file too, and wins over `config_path`. The other `cli`
    entries are flag keys (`port`, `model_name`, ...) or dotted `section.key` names.
    """
    warnings: list[str] = []
    cli = dict(cli or {})
    if cli.get("config") is not None:
        config_path = Path(str(cli["config"]))
    elif config_path is None and Path(DEFAULT_CONFIG_FILE).is_file():
        config_path = Path(DEFAULT_CONFIG_FILE)

    file_layer = _Layer({}, {})
    if config_path is not None:
        file_layer = _file_layer(config_path, warnings)
    layers = (file_layer, _env_layer(environ, warnings), _cli_layer(cli))

    merged: dict[_Key, tuple[object, Origin]] = {}
    for layer in layers:
        merged.update(layer.values)
    data: dict[str, dict[str, object]] = {}
    for (section, key), (value, _) in merged.items():
        data.setdefault(section, {})[key] = value
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        origins = {key: origin for key, (_, origin) in merged.items()}
        raise _config_error(exc, origins, file_layer.lines) from None

    origin = merged.get(("model", "use_as_default"), (None, None))[1]
    warnings.extend(_check_use_as_default(settings, origin, file_layer.lines))
    return LoadResult(settings, warnings, config_path)


def validate_paths(settings: Settings) -> None:
    """Raise ConfigError if `model.model_dir` is not an existing directory."""
    model_dir = settings.model.model_dir
    if not Path(model_dir).is_dir():
        raise ConfigError(
            f"model.model_dir '{model_dir}' does not exist (set model.model_dir in config.yml "
            "or run `kodkod models fetch`)"
        )


# --- config.yml ---------------------------------------------------------------------------------


def _file_layer(path: Path, warnings: list[str]) -> _Layer:
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: config file is not UTF-8 text: {exc.reason}") from None

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        raise ConfigError(f"{where}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()

    lines: dict[_Path, int] = {}
    if node is not None:
        _record_lines(node, (), lines, set())
    layer = _Layer({}, lines)
    if data is None:
        return layer
    if not isinstance(data, dict):
        line = node.start_mark.line + 1 if node is not None else 1
        raise ConfigError(
            f"{name}:{line}: expected a mapping of sections at the top level, got {_describe(data)}"
        )

    sections = section_classes()
    for section, body in data.items():
        section_line = lines.get((str(section),), 1)
        if section not in sections:
            hint = unknown_key_hint(str(section), sections)
            warnings.append(f"{name}:{section_line}: unknown section '{section}' (ignored){hint}")
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(
                f"{name}:{section_line}: {section}: expected a mapping of keys, got {_describe(body)}"
            )
        fields = sections[section].model_fields
        for key, value in body.items():
            line = lines.get((section, str(key)), section_line)
            if key not in fields:
                hint = unknown_key_hint(str(key), fields)
                warnings.append(f"{name}:{line}: unknown key '{section}.{key}' (ignored){hint}")
            elif value is not None:
                layer.values[(section, key)] = (value, Origin("file", name, line))
    return layer


def _record_lines(node: yaml.Node, path: _Path, out: dict[_Path, int], seen: set[int]) -> None:
    """Record the 1-based line of every mapping key and sequence item below `node`."""
    if id(node) in seen:  # aliases may make the graph cyclic
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                child = (*path, str(key_node.value))
                out[child] = key_node.start_mark.line + 1
                _record_lines(value_node, child, out, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out[(*path, index)] = item.start_mark.line + 1
            _record_lines(item, (*path, index), out, seen)


# --- environment and CLI ------------------------------------------------------------------------


def _env_layer(environ: Mapping[str, str], warnings: list[str]) -> _Layer:
    layer = _Layer({}, {})
    known: set[str] = set()
    sections = section_classes()
    for section, cls in sections.items():
        for key, info in cls.model_fields.items():
            for prefix in ENV_PREFIXES:
                var = f"{prefix}{section}_{key}".upper()
                known.add(var)
                raw = environ.get(var)
                if raw is None or not raw.strip():
                    continue
                fail = _failer(f"environment {var}")
                value = parse_text(raw, field_kind(info.annotation), fail)
                layer.values[(section, key)] = (value, Origin("env", var))

    # Longest section first so TABBY_DRAFT_MODEL_X is not read as section "draft".
    by_length = sorted(sections, key=len, reverse=True)
    for var in sorted(environ):
        if var in known:
            continue
        for prefix in ENV_PREFIXES:
            match = next((s for s in by_length if var.startswith(f"{prefix}{s.upper()}_")), None)
            if match is not None:
                key = var[len(prefix) + len(match) + 1 :].lower()
                hint = unknown_key_hint(key, sections[match].model_fields)
                warnings.append(f"environment {var}: unknown key '{match}.{key}' (ignored){hint}")
                break
    return layer


def _cli_layer(cli: Mapping[str, object]) -> _Layer:
    layer = _Layer({}, {})
    flags = cli_flag_table()
    sections = section_classes()
    for name, value in cli.items():
        if value is None or name == "config":
            continue
        flag = f"--{name.replace('_', '-')}"
        section, _, key = name.rpartition(".")
        if not section and name in flags:
            section, key = flags[name]
        if section not in sections or key not in sections[section].model_fields:
            raise ConfigError(f"{flag}: unknown option")
        kind = field_kind(sections[section].model_fields[key].annotation)
        if isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(item, str) for item in value)
        ):
            value = parse_text(value, kind, _failer(flag))
        layer.values[(section, key)] = (value, Origin("cli", flag))
    return layer


def _failer(where: str) -> Callable[[str], ConfigError]:
    return lambda message: ConfigError(f"{where}: {message}")


def parse_text(raw: str | list[str], kind: FieldKind, fail: Callable[[str], ConfigError]) -> object:
    """Pre-parse a text value (or several, from a CLI flag with nargs) for a key of `kind`."""
    if isinstance(raw, list):
        if len(raw) == 1:
            raw = raw[0]
        elif kind is FieldKind.LIST:
            return [item for part in raw for item in _split_items(part)]
        else:
            raise fail(f"expected one value, got {len(raw)}")
    if kind is FieldKind.SCALAR:
        return raw
    text = raw.strip()
    if kind is FieldKind.LIST and not text.startswith("["):
        return _split_items(text)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "not valid YAML/JSON"
        raise fail(f"cannot parse {raw!r}: {problem}") from None
    if kind is FieldKind.LIST and not isinstance(value, list):
        raise fail(f"expected a list, got {raw!r}")
    return value


def _split_items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


# --- messages -----------------------------------------------------------------------------------

_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "a boolean (true/false)",
    "bool_type": "a boolean (true/false)",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _config_error(exc: ValidationError, origins: dict[_Key, Origin], lines: dict[_Path, int]) -> ConfigError:
    errors = exc.errors(include_url=False)
    error = errors[0]
    loc: _Path = tuple(error["loc"])
    dotted = _dotted(loc)
    message = _message(error)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    origin = origins.get((str(loc[0]), str(loc[1]))) if len(loc) >= 2 else None
    if origin is None:
        return ConfigError(f"{dotted}: {message}")
    if origin.kind == "file":
        line = next((lines[loc[:n]] for n in range(len(loc), 1, -1) if loc[:n] in lines), origin.line)
        return ConfigError(f"{origin.name}:{line}: {dotted}: {message}")
    where = "environment " + origin.name if origin.kind == "env" else origin.name
    detail = f"{dotted}: " if len(loc) > 2 else ""
    return ConfigError(f"{where}: {detail}{message}")


def _message(error: Any) -> str:
    kind = error["type"]
    got = _describe(error.get("input"))
    ctx = error.get("ctx") or {}
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {got}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()), "?")
        return f"must be {_BOUNDS[kind]} {bound}, got {got}"
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected')}, got {got}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind == "missing":
        return "required key is missing"
    return f"{error['msg']}, got {got}"


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict | BaseModel):
        return "a mapping"
    return type(value).__name__


def _dotted(loc: _Path) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _check_use_as_default(settings: Settings, origin: Origin | None, lines: dict[_Path, int]) -> list[str]:
    known = set(type(settings.model).model_fields) | set(type(settings.draft_model).model_fields)
    warnings = []
    for index, name in enumerate(settings.model.use_as_default):
        if name in known:
            continue
        if origin is None:
            where = ""
        elif origin.kind == "file":
            line = lines.get(("model", "use_as_default", index), origin.line)
            where = f"{origin.name}:{line}: "
        else:
            where = ("environment " if origin.kind == "env" else "") + origin.name + ": "
        warnings.append(f"{where}model.use_as_default: unknown key '{name}' (ignored)")
    return warnings
