"""Render `config_sample.yml` from the schema.

Every section and key appears with its default value, preceded by its description as comments,
so the sample never drifts from the code. Two keys get sample-only values
(`SAMPLE_OVERRIDES`): the default model, the `safe_defaults` sampler preset, and a 1 GiB
host-RAM prefix-cache tier.
"""

from __future__ import annotations

import textwrap

import yaml
from pydantic import BaseModel

from kodkod.settings.schema import Settings, section_classes

SAMPLE_OVERRIDES: tuple[tuple[str, str, object], ...] = (
    ("model", "model_name", "SmolLM2-135M-Instruct"),
    ("sampling", "override_preset", "safe_defaults"),
    ("memory", "sysmem_kv_cache", 1024),
)
"""(section, key, value) triples that differ from the schema defaults in the sample."""

_HEADER = """\
# kodkod configuration sample.
#
# Copy this file to config.yml and edit what you need. Every key is optional: a missing key, or
# a null value, keeps the default shown here. Environment variables override this file
# (KODKOD_<SECTION>_<KEY> or TABBY_<SECTION>_<KEY>, e.g. KODKOD_NETWORK_PORT=5001), and
# command-line flags override both (--<key with dashes>, e.g. --port 5001 or --gpu-split 20 24).
#
# This file is generated from the settings schema: python -m kodkod.settings > config_sample.yml
"""

_WIDTH = 98


def render_sample_config(
    settings_cls: type[BaseModel] = Settings,
    overrides: tuple[tuple[str, str, object], ...] = SAMPLE_OVERRIDES,
) -> str:
    """The commented sample config for `settings_cls`, as YAML text."""
    defaults = settings_cls().model_dump()
    for section, key, value in overrides:
        if key in defaults.get(section, {}):
            defaults[section][key] = value

    parts = [_HEADER]
    for section, cls in section_classes(settings_cls).items():
        about = settings_cls.model_fields[section].description or ""
        parts.append(f"\n# ===== {section}: {about}\n{section}:\n")
        entries = []
        for key, info in cls.model_fields.items():
            comment = "".join(f"  # {line}\n" for line in textwrap.wrap(info.description or key, _WIDTH - 4))
            entries.append(comment + "  " + _yaml_entry(key, defaults[section][key]))
        parts.append("\n".join(entries))
    return "".join(parts)


def _yaml_entry(key: str, value: object) -> str:
    # Block style for the key itself, flow style for a list or mapping value: `key: [a, b]`.
    flow = None if isinstance(value, list | dict) else False
    text = yaml.safe_dump(
        {key: value}, default_flow_style=flow, sort_keys=False, allow_unicode=True, width=10**6
    )
    if "\n" in text.rstrip("\n"):
        raise ValueError(f"default of {key!r} does not fit on one line: {text!r}")
    return text
