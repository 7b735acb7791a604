"""The top-level `Settings` model and introspection of the schema.

`Settings` has one field per config.yml section. `field_kind` says how a text value (from the
environment or the CLI) for a key must be parsed; `cli_flag_table` maps CLI flag keys to
(section, key) and refuses schemas where two sections' keys would share a flag.
"""

from __future__ import annotations

import enum
import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field

from kodkod.settings.model_section import ModelSettings
from kodkod.settings.sections import (
    DeveloperSettings,
    DraftModelSettings,
    EmbeddingsSettings,
    LimitsSettings,
    LoggingSettings,
    LoraSettings,
    MemorySettings,
    NetworkSettings,
    SamplingSettings,
)


class Settings(BaseModel):
    """The whole configuration."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    # Each section defaults to itself with every default. The factories are lambdas, not the
    # classes, for type checkers: a class fits both of Field's factory signatures (no argument,
    # or the validated data), and without pydantic's plugin they take a positional `Field`
    # default for a required argument.
    network: NetworkSettings = Field(
        default_factory=lambda: NetworkSettings.model_validate({}), description="HTTP server options."
    )
    logging: LoggingSettings = Field(
        default_factory=lambda: LoggingSettings.model_validate({}), description="What to log."
    )
    model: ModelSettings = Field(
        default_factory=lambda: ModelSettings.model_validate({}),
        description="The main model and how it is loaded.",
    )
    draft_model: DraftModelSettings = Field(
        default_factory=lambda: DraftModelSettings.model_validate({}), description="Speculative decoding."
    )
    lora: LoraSettings = Field(
        default_factory=lambda: LoraSettings.model_validate({}), description="LoRA adapters."
    )
    embeddings: EmbeddingsSettings = Field(
        default_factory=lambda: EmbeddingsSettings.model_validate({}), description="The embedding model."
    )
    sampling: SamplingSettings = Field(
        default_factory=lambda: SamplingSettings.model_validate({}),
        description="Default sampling parameters.",
    )
    memory: MemorySettings = Field(
        default_factory=lambda: MemorySettings.model_validate({}), description="Host-RAM caches."
    )
    limits: LimitsSettings = Field(
        default_factory=lambda: LimitsSettings.model_validate({}),
        description="Bounds on request sizes, queues, slow clients and a stuck engine.",
    )
    developer: DeveloperSettings = Field(
        default_factory=lambda: DeveloperSettings.model_validate({}),
        description="Options for debugging and development.",
    )

    def model_defaults(self) -> dict[str, Any]:
        """Values of the `model.use_as_default` keys that belong to the `model` section."""
        return _pick(self.model, self.model.use_as_default)

    def draft_defaults(self) -> dict[str, Any]:
        """Values of the `model.use_as_default` keys that belong to the `draft_model` section."""
        return _pick(self.draft_model, self.model.use_as_default)


def _pick(section: BaseModel, names: list[str]) -> dict[str, Any]:
    fields = type(section).model_fields
    dumped = section.model_dump()
    return {name: dumped[name] for name in names if name in fields}


def section_classes(settings_cls: type[BaseModel] = Settings) -> dict[str, type[BaseModel]]:
    """Section name → section model class, in declaration order."""
    return {
        name: typing.cast(type[BaseModel], info.annotation)
        for name, info in settings_cls.model_fields.items()
    }


class FieldKind(enum.Enum):
    """How a text value (environment, CLI) for a key is parsed before validation."""

    SCALAR = "scalar"  # the string goes to pydantic as is
    LIST = "list"  # a YAML/JSON list literal, or comma-separated items
    STRUCTURED = "structured"  # a YAML/JSON literal (mappings, lists of mappings)


def field_kind(annotation: object) -> FieldKind:
    """Classify a field annotation (Optional and Annotated are looked through)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return field_kind(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        kinds = {field_kind(a) for a in args}
        return kinds.pop() if len(kinds) == 1 else FieldKind.SCALAR
    if origin is list:
        (item,) = typing.get_args(annotation)
        is_model = isinstance(item, type) and issubclass(item, BaseModel)
        return FieldKind.STRUCTURED if is_model else FieldKind.LIST
    if origin is dict or annotation is dict:
        return FieldKind.STRUCTURED
    return FieldKind.SCALAR


def cli_flag_table(settings_cls: type[BaseModel] = Settings) -> dict[str, tuple[str, str]]:
    """CLI key (the config key, no section) → (section, key), for keys that get a flag.

    Structured keys (mappings, lists of mappings) get no flag. Raises RuntimeError if two
    sections share a key name, because their flags would collide.
    """
    table: dict[str, tuple[str, str]] = {}
    for section, cls in section_classes(settings_cls).items():
        for key, info in cls.model_fields.items():
            if field_kind(info.annotation) is FieldKind.STRUCTURED:
                continue
            if key in table or key == "config":
                other = ".".join(table.get(key, ("<reserved>", key)))
                raise RuntimeError(
                    f"CLI flag --{key.replace('_', '-')} would serve both {other} and {section}.{key}"
                )
            table[key] = (section, key)
    return table
