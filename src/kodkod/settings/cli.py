"""Command-line flags for every config key.

`add_cli_arguments` adds one flag per key, named after the key with `_` → `-` and no section
prefix (`--port`, `--model-name`, `--gpu-split 20 24`), plus `--config PATH`. Every flag defaults
to None so that flags not given never override, and values stay strings: `load_settings` parses
them with the schema, exactly like environment variables. List keys take one or more values;
mapping keys and `loras` get no flag.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Annotated, Literal, Union

from kodkod.settings.schema import (
    FieldKind,
    cli_flag_table,
    field_kind,
    section_classes,
)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config` and one flag per config key, grouped by section."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="YAML config file to read instead of ./config.yml; the other flags still override its values.",
    )
    classes = section_classes()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, (section, _) in cli_flag_table().items():
        if section not in groups:
            groups[section] = parser.add_argument_group(f"config section '{section}'")
        info = classes[section].model_fields[key]
        kind = field_kind(info.annotation)
        groups[section].add_argument(
            "--" + key.replace("_", "-"),
            dest=key,
            default=None,
            nargs="+" if kind is FieldKind.LIST else None,
            metavar=_metavar(info.annotation),
            help=(info.description or "").replace("%", "%%"),
        )


def cli_overrides_from_namespace(ns: argparse.Namespace) -> dict[str, object]:
    """{flag key: value} for the config flags (and `config`) that were given on the command line."""
    keys = {*cli_flag_table(), "config"}
    return {key: value for key, value in vars(ns).items() if key in keys and value is not None}


def _metavar(annotation: object) -> str:
    origin = typing.get_origin(annotation)
    if origin is Annotated:  # a bounded type (settings.load_table)
        return _metavar(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return "|".join(_metavar(a) for a in args)
    if origin is list:
        return _metavar(typing.get_args(annotation)[0])
    if origin is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(annotation)) + "}"
    names = {bool: "BOOL", int: "INT", float: "NUM", str: "TEXT"}
    return names.get(typing.cast(type, annotation), "VALUE")
