"""Model discovery in `model_dir` and safe name → path resolution.

Rules (the same for models, drafts and adapters):
* a folder holding exactly one GGUF, or one split set `*-00001-of-0000N.gguf`, is a model named
  after the folder (projector files `mmproj*` are ignored);
* a bare `*.gguf` file is a model named after its stem (split parts other than the first are
  not separate models);
* hidden names (a leading ".", e.g. a download in progress) are skipped;
* encoder-only GGUFs (BERT-family embedding models, `models/gguf_header.py`) are never models
  here: they are served by the embedding API;
* anything else is ignored with a debug log.
A name may be nested (`family/model`) but must stay inside the directory: `..`, absolute paths
and links that point outside are refused.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from kodkod.models.gguf_header import is_encoder, read_architecture

log = logging.getLogger(__name__)

_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<idx>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


class ModelNameError(ValueError):
    """The requested name is not a model in the directory (message is user-facing)."""


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    gguf: Path  # the file to load (first part of a split set)
    folder: Path | None  # the model's own folder, when it has one


def _is_gguf(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() == ".gguf" and not p.name.lower().startswith("mmproj")


def _first_of_split(files: list[Path]) -> Path | None:
    """The first part if `files` is exactly one split set, else None."""
    groups: dict[str, list[re.Match[str]]] = {}
    for f in files:
        m = _SPLIT.match(f.name)
        if m is None:
            return None
        groups.setdefault(m["stem"], []).append(m)
    if len(groups) != 1:
        return None
    (parts,) = groups.values()
    count = int(parts[0]["count"])
    if sorted(int(m["idx"]) for m in parts) != list(range(1, count + 1)):
        return None
    return next(f for f in files if _SPLIT.match(f.name)["idx"] == "00001")  # type: ignore[index]


def _not_encoder(entry: ModelEntry | None) -> ModelEntry | None:
    if entry is not None and is_encoder(entry.gguf):
        log.debug("ignoring %s: an embedding model (load it with /v1/model/embedding/load)", entry.gguf)
        return None
    return entry


def entry_for_folder(folder: Path, name: str) -> ModelEntry | None:
    return _not_encoder(_entry_for_folder(folder, name))


def _entry_for_folder(folder: Path, name: str) -> ModelEntry | None:
    ggufs = sorted(p for p in folder.iterdir() if _is_gguf(p))
    if len(ggufs) == 1:
        return ModelEntry(name, ggufs[0], folder)
    if len(ggufs) > 1:
        first = _first_of_split(ggufs)
        if first is not None:
            return ModelEntry(name, first, folder)
        log.debug("ignoring %s: it holds several GGUF files", folder)
        return None
    log.debug("ignoring %s: no GGUF file inside", folder)
    return None


def entry_for_file(path: Path) -> ModelEntry | None:
    return _not_encoder(_entry_for_file(path))


def _entry_for_file(path: Path) -> ModelEntry | None:
    if not _is_gguf(path):
        return None
    m = _SPLIT.match(path.name)
    if m is not None:
        if m["idx"] != "00001":
            return None
        return ModelEntry(m["stem"], path, None)
    return ModelEntry(path.stem, path, None)


def discover(directory: Path) -> list[ModelEntry]:
    """Every model directly inside `directory`, sorted by name."""
    if not directory.is_dir():
        return []
    found: dict[str, ModelEntry] = {}
    root = directory.resolve()
    for child in sorted(directory.iterdir()):
        entry = None
        if child.name.startswith("."):
            continue  # hidden: a download in progress (models/download.py), editor files
        if child.is_symlink() and root not in child.resolve().parents:
            log.debug("ignoring %s: it links outside the directory", child)
            continue
        if child.is_dir():
            entry = entry_for_folder(child, child.name)
        elif child.is_file():
            entry = entry_for_file(child)
            if entry is None and child.suffix.lower() != ".gguf":
                log.debug("ignoring %s: not a GGUF file", child)
        if entry is not None and entry.name not in found:
            found[entry.name] = entry
    return sorted(found.values(), key=lambda e: e.name)


def resolve(directory: Path, name: str) -> ModelEntry:
    """The model called `name` in `directory`; ModelNameError when there is none."""
    if not name or not name.strip():
        raise ModelNameError("a model name is required")
    if "\\" in name or name.startswith(("/", "~")) or ".." in Path(name).parts or ":" in name:
        raise ModelNameError(f"invalid model name {name!r}: it must name a model inside the model directory")
    root = directory.resolve()
    candidate = (directory / name).resolve()
    if root != candidate and root not in candidate.parents:
        raise ModelNameError(f"invalid model name {name!r}: it points outside the model directory")
    entry: ModelEntry | None = None
    if candidate.is_dir():
        entry = entry_for_folder(candidate, name)
        _refuse_embedding_model(
            name, _entry_for_folder(candidate, name) if entry is None else None, candidate
        )
    elif candidate.is_file():
        entry = entry_for_file(candidate)
        _refuse_embedding_model(name, _entry_for_file(candidate) if entry is None else None, None)
    else:
        as_file = candidate.with_name(candidate.name + ".gguf")
        if as_file.is_file():
            entry = entry_for_file(as_file)
            _refuse_embedding_model(name, _entry_for_file(as_file) if entry is None else None, None)
        else:
            split = [e for e in discover(candidate.parent) if e.name == candidate.name]
            entry = split[0] if split else None
    if entry is None:
        raise ModelNameError(f"model {name!r} was not found in {directory}")
    return ModelEntry(name, entry.gguf, entry.folder)


def _refuse_embedding_model(name: str, hidden: ModelEntry | None, folder: Path | None) -> None:
    """Say why `name` is no chat model when it is an embedding model (ModelNameError)."""
    how = "load it with POST /v1/model/embedding/load"
    if hidden is not None:
        arch = read_architecture(hidden.gguf)
        raise ModelNameError(
            f"model {name!r} is an embedding model (architecture {arch}), not a chat model: it "
            f"cannot generate text; {how}"
        )
    if folder is not None and (folder / "modules.json").is_file() and (folder / "config.json").is_file():
        raise ModelNameError(
            f"model {name!r} is a Hugging Face sentence-transformers folder (an embedding model, no "
            f"GGUF file), not a chat model; {how}"
        )
