"""Finding a model's chat template at load time, and the `templates/` folder.

`find_template()` follows the TabbyAPI lookup order adapted to GGUF models; the
first rule that yields a compilable template wins, and a rule that fails is logged and skipped:

1. `prompt_template` is set: `templates/<name>.jinja`, then the named template `<name>` from the
   GGUF (`tokenizer.chat_template.<name>`) or from the model folder's `tokenizer_config.json`.
2. `<model folder>/tabby_template.jinja`.
3. `<model folder>/chat_template.jinja`, then `<model folder>/chat_template.json` key
   `chat_template`.
4. `<model folder>/tokenizer_config.json` key `chat_template` (a string, or a list of
   `{"name", "template"}` whose `default` entry, else first entry, is used), then the GGUF's own
   `tokenizer.chat_template` (named `from_gguf_metadata`). A file beside the GGUF is a deliberate
   override, so it comes before the embedded template.
5. A file in `templates/` whose stem occurs, case-insensitively, in the model's name (folder
   name, or file stem for a bare `.gguf`). Every file is considered; the longest stem wins.

`model_path` is a model folder or a bare `.gguf` file; a bare file has no folder, so the folder
rules (2, 3 and the `tokenizer_config.json` parts) are skipped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kodkod.chat.errors import TemplateError, TemplateFileError
from kodkod.chat.template import ChatTemplate
from kodkod.fsutil import is_file, plain_name

__all__ = ["find_template", "list_templates", "load_named_template"]

logger = logging.getLogger(__name__)

TEMPLATE_SUFFIX = ".jinja"
GGUF_TEMPLATE_NAME = "from_gguf_metadata"
TOKENIZER_CONFIG_TEMPLATE_NAME = "from_tokenizer_config"

Candidate = Callable[[], ChatTemplate | None]


def list_templates(templates_dir: Path) -> list[str]:
    """Names (file stems) of the `*.jinja` files in `templates_dir`, sorted."""
    if not templates_dir.is_dir():
        return []
    return sorted(path.stem for path in templates_dir.glob(f"*{TEMPLATE_SUFFIX}") if path.is_file())


def load_named_template(templates_dir: Path, name: str) -> ChatTemplate:
    """Compile `templates_dir/<name>.jinja` (".jinja" appended when absent).

    Raises `TemplateFileError` for a missing/unreadable file or a name that could leave the
    folder (path separators, ".."), and `TemplateError` when the file does not compile.
    """
    if not plain_name(name):
        raise TemplateFileError(f"invalid chat template name {name[:100]!r}")
    filename = name if name.endswith(TEMPLATE_SUFFIX) else name + TEMPLATE_SUFFIX
    path = templates_dir / filename
    if not is_file(path):
        raise TemplateFileError(f"chat template {name!r} was not found")
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateFileError(f"chat template {name!r} could not be read: {exc}") from None
    return ChatTemplate.compile(path.stem, source)


def find_template(
    *,
    prompt_template: str | None,
    templates_dir: Path,
    model_path: Path,
    gguf_template: str | None,
    gguf_named_templates: Mapping[str, str] | None = None,
) -> ChatTemplate | None:
    """The model's chat template by the lookup order of the module docstring, or None."""
    folder = model_path if model_path.is_dir() else None
    model_name = model_path.name if folder is not None else model_path.stem
    named = gguf_named_templates or {}

    candidates: list[tuple[str, Candidate]] = []
    if prompt_template:
        name = prompt_template
        candidates += [
            (f"templates/{name}", lambda: load_named_template(templates_dir, name)),
            (f"GGUF template {name!r}", lambda: _from_source(name, named.get(name))),
        ]
        if folder is not None:
            candidates.append(
                (f"tokenizer_config.json template {name!r}", lambda: _config_named(folder, name))
            )
    if folder is not None:
        candidates += [
            ("tabby_template.jinja", lambda: _from_file(folder / "tabby_template.jinja")),
            ("chat_template.jinja", lambda: _from_file(folder / "chat_template.jinja")),
            ("chat_template.json", lambda: _from_json_key(folder / "chat_template.json")),
            ("tokenizer_config.json", lambda: _from_json_key(folder / "tokenizer_config.json")),
        ]
    candidates += [
        ("GGUF tokenizer.chat_template", lambda: _from_source(GGUF_TEMPLATE_NAME, gguf_template)),
        ("templates/ name match", lambda: _match_by_name(templates_dir, model_name)),
    ]

    for description, candidate in candidates:
        try:
            template = candidate()
        except (TemplateError, OSError, ValueError) as exc:
            logger.warning("chat template from %s skipped: %s", description, exc)
            continue
        if template is not None:
            logger.info("using chat template %r (from %s)", template.name, description)
            return template
    logger.warning("no chat template found for %s", model_path)
    return None


def _from_source(name: str, source: str | None) -> ChatTemplate | None:
    if not source:
        return None
    return ChatTemplate.compile(name, source)


def _from_file(path: Path) -> ChatTemplate | None:
    if not path.is_file():
        return None
    return ChatTemplate.compile(path.stem, path.read_text(encoding="utf-8"))


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


def _from_json_key(path: Path) -> ChatTemplate | None:
    """`chat_template` of a JSON file: a string, or a list of named templates."""
    data = _read_json(path)
    if data is None:
        return None
    value = data.get("chat_template")
    if isinstance(value, str):
        name = "chat_template" if path.stem == "chat_template" else TOKENIZER_CONFIG_TEMPLATE_NAME
        return _from_source(name, value)
    entries = _named_entries(value)
    if not entries:
        return None
    name = "default" if "default" in entries else next(iter(entries))
    return _from_source(name, entries[name])


def _config_named(folder: Path, name: str) -> ChatTemplate | None:
    data = _read_json(folder / "tokenizer_config.json")
    if data is None:
        return None
    return _from_source(name, _named_entries(data.get("chat_template")).get(name))


def _named_entries(value: Any) -> dict[str, str]:
    """`[{"name": ..., "template": ...}, ...]` as an ordered name → source mapping."""
    entries: dict[str, str] = {}
    if isinstance(value, list):
        for entry in value:
            if isinstance(entry, dict):
                name, source = entry.get("name"), entry.get("template")
                if isinstance(name, str) and isinstance(source, str):
                    entries.setdefault(name, source)
    return entries


def _match_by_name(templates_dir: Path, model_name: str) -> ChatTemplate | None:
    """The template whose stem occurs in the model name; the longest (most specific) wins."""
    lowered = model_name.lower()
    matches = [stem for stem in list_templates(templates_dir) if stem and stem.lower() in lowered]
    for stem in sorted(matches, key=lambda stem: (-len(stem), stem)):
        try:
            return load_named_template(templates_dir, stem)
        except TemplateError as exc:
            logger.warning("chat template %r skipped: %s", stem, exc)
    return None
