"""LoRA adapters in `lora.lora_dir`: discovery, validation against the model, preparation.

Discovery follows the model rules (`models/registry.py`):
* a folder holding a PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`) is an
  adapter named after the folder (GGUF files beside them are conversion caches);
* otherwise a folder holding exactly one GGUF is a GGUF adapter named after the folder;
* a bare `*.gguf` file is an adapter named after its stem.
Names may be nested but must stay inside the directory.

`LoraLibrary` (one per loaded model) *prepares* an adapter: a PEFT one is converted to GGUF on
first use (`models/peft.py`, cached beside it), then the GGUF is checked against the model's
own GGUF with the `gguf` package — `general.type` adapter, `adapter.type` lora, the same
`general.architecture`, `<tensor>.lora_a`/`.lora_b` pairs of 2-D tensors the model has, with
llama.cpp's shape rules — so a wrong adapter is a `LoraError` (→ 400) and never reaches
llama.cpp's asserts. Results are cached per source file state (size, mtime).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf

from kodkod.engine.backend import Backend
from kodkod.engine.client import RequestError
from kodkod.models.peft import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    BaseFacts,
    LoraError,
    ensure_gguf,
)

__all__ = [
    "BaseFacts",
    "LoraEntry",
    "LoraError",
    "LoraLibrary",
    "PreparedLora",
    "attach_library",
    "check_adapter",
    "discover_loras",
    "read_base",
    "resolve_lora",
]

log = logging.getLogger(__name__)

_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<idx>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class LoraEntry:
    name: str
    kind: Literal["gguf", "peft"]
    path: Path  # the GGUF file, or the PEFT folder


@dataclass(frozen=True, slots=True)
class PreparedLora:
    """An adapter checked against the model: `path` is the GGUF llama.cpp loads."""

    name: str
    kind: str
    path: Path
    alpha: float
    ranks: tuple[int, ...]
    num_targets: int


# -- discovery ------------------------------------------------------------------------------


def _is_gguf(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() == ".gguf"


def _entry_for_folder(folder: Path, name: str) -> LoraEntry | None:
    if (folder / PEFT_CONFIG).is_file() and (folder / PEFT_WEIGHTS).is_file():
        return LoraEntry(name, "peft", folder)
    ggufs = [p for p in folder.iterdir() if _is_gguf(p)]
    if len(ggufs) == 1:
        return LoraEntry(name, "gguf", ggufs[0])
    log.debug("ignoring %s: neither a PEFT adapter nor exactly one GGUF", folder)
    return None


def discover_loras(directory: Path) -> list[LoraEntry]:
    """Every adapter directly inside `directory`, sorted by name."""
    if not directory.is_dir():
        return []
    root = directory.resolve()
    found: dict[str, LoraEntry] = {}
    for child in sorted(directory.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_symlink() and root not in child.resolve().parents:
            continue
        entry = None
        if child.is_dir():
            entry = _entry_for_folder(child, child.name)
        elif _is_gguf(child):
            entry = LoraEntry(child.stem, "gguf", child)
        if entry is not None:
            found.setdefault(entry.name, entry)
    return sorted(found.values(), key=lambda e: e.name)


def resolve_lora(directory: Path, name: str) -> LoraEntry:
    """The adapter called `name` in `directory`; LoraError when there is none."""
    if not name or not name.strip():
        raise LoraError("a LoRA name is required")
    if "\\" in name or name.startswith(("/", "~")) or ".." in Path(name).parts or ":" in name:
        raise LoraError(f"invalid LoRA name {name!r}: it must name an adapter in the LoRA directory")
    if not directory.is_dir():
        raise LoraError(f"the LoRA directory {directory} does not exist")
    root = directory.resolve()
    candidate = (directory / name).resolve()
    if root not in candidate.parents:
        raise LoraError(f"invalid LoRA name {name!r}: it points outside the LoRA directory")
    entry = None
    if candidate.is_dir():
        entry = _entry_for_folder(candidate, name)
    elif _is_gguf(candidate):
        entry = LoraEntry(name, "gguf", candidate)
    elif _is_gguf(candidate.with_name(candidate.name + ".gguf")):
        entry = LoraEntry(name, "gguf", candidate.with_name(candidate.name + ".gguf"))
    if entry is None:
        raise LoraError(f"LoRA {name!r} was not found in {directory}")
    return entry


# -- the model and adapter GGUFs ------------------------------------------------------------


def _reader(path: Path, what: str) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:
        raise LoraError(f"{what} {path.name} is not a readable GGUF file ({exc})") from None


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _parts(path: Path) -> list[Path]:
    m = _SPLIT.match(path.name)
    if m is None:
        return [path]
    count = int(m["count"])
    return [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def read_base(model_path: Path) -> BaseFacts:
    """Architecture, tensor shapes (GGUF order: innermost first) and head counts of a model."""
    shapes: dict[str, tuple[int, ...]] = {}
    first = None
    for part in _parts(model_path):
        reader = _reader(part, "the model file")
        first = first or reader
        for t in reader.tensors:
            shapes[t.name] = tuple(int(x) for x in t.shape)
    assert first is not None
    arch = str(_field(first, "general.architecture") or "unknown")

    def count(key: str) -> int:
        value = _field(first, f"{arch}.attention.{key}")
        if isinstance(value, list):
            value = max(value) if value else 0
        return int(value or 0)

    n_head = count("head_count")
    return BaseFacts(arch, shapes, n_head, count("head_count_kv") or n_head)


def check_adapter(path: Path, base: BaseFacts, name: str) -> tuple[float, tuple[int, ...], int]:
    """(alpha, ranks, number of adapted tensors) of a GGUF adapter that llama.cpp can apply to
    the model; LoraError naming the first problem otherwise."""
    reader = _reader(path, f"LoRA {name!r}:")
    gtype = _field(reader, "general.type")
    if gtype != "adapter":
        raise LoraError(f"LoRA {name!r} is not an adapter (general.type is {gtype!r}, not 'adapter')")
    atype = _field(reader, "adapter.type")
    if atype != "lora":
        raise LoraError(f"LoRA {name!r} is not a LoRA adapter (adapter.type is {atype!r})")
    arch = _field(reader, "general.architecture")
    if arch != base.arch:
        raise LoraError(
            f"LoRA {name!r} was made for architecture {arch!r}, but the loaded model is {base.arch!r}"
        )
    if _field(reader, "adapter.alora.invocation_tokens") is not None:
        raise LoraError(f"LoRA {name!r} is an activated LoRA (aLoRA), which is not supported")
    pairs: dict[str, dict[str, Any]] = {}
    for t in reader.tensors:
        stem, _, suffix = t.name.rpartition(".")
        if suffix in ("lora_a", "lora_b"):
            block, _size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            shape = tuple(int(x) for x in t.shape)
            if len(shape) != 2 or shape[0] % block:
                raise LoraError(f"LoRA {name!r}: tensor {t.name} has an unusable shape {list(shape)}")
            pairs.setdefault(stem, {})[suffix] = shape
        elif not t.name.endswith("_norm.weight"):  # llama.cpp ignores norm vectors
            raise LoraError(f"LoRA {name!r}: unexpected tensor {t.name!r} (not .lora_a / .lora_b)")
    if not pairs:
        raise LoraError(f"LoRA {name!r} holds no LoRA tensors")
    ranks: set[int] = set()
    for target, pair in sorted(pairs.items()):
        a, b = pair.get("lora_a"), pair.get("lora_b")
        if a is None or b is None:
            raise LoraError(f"LoRA {name!r}: {target} has only one of lora_a / lora_b")
        model = base.shapes.get(target)
        if model is None:
            raise LoraError(
                f"LoRA {name!r} adapts {target}, which the loaded model does not have (an adapter "
                "for another model?)"
            )
        if len(model) != 2:
            raise LoraError(f"LoRA {name!r} adapts {target}, which is not a matrix")
        if target.endswith("token_embd.weight"):  # llama.cpp's flipped layout for embeddings
            ok = model[0] == b[1] and model[1] == a[1]
        else:
            ok = model[0] == a[0] and model[1] == b[1] and a[1] == b[0]
        if not ok:
            raise LoraError(
                f"LoRA {name!r}: the shapes of {target} (lora_a {list(a)}, lora_b {list(b)}) do "
                f"not fit the model's {list(model)} (an adapter for another model size?)"
            )
        ranks.add(b[0])
    alpha = float(_field(reader, "adapter.lora.alpha") or 0.0)
    return alpha, tuple(sorted(ranks)), len(pairs)


# -- the library of one loaded model --------------------------------------------------------


def _state(entry: LoraEntry) -> tuple[Any, ...]:
    files = [entry.path / PEFT_CONFIG, entry.path / PEFT_WEIGHTS] if entry.kind == "peft" else [entry.path]
    out: list[Any] = [entry.kind, str(entry.path)]
    for f in files:
        st = f.stat()
        out += [st.st_size, st.st_mtime_ns]
    return tuple(out)


class LoraLibrary:
    """Adapters of `lora_dir` prepared for one model; thread-safe (one preparation at a time).

    `active` is the adapter set /v1/lora reports (kept by the admin API); the backend holds the
    adapters themselves."""

    def __init__(self, lora_dir: Path, model_path: Path) -> None:
        self.lora_dir = lora_dir
        self.model_path = model_path
        self.active: tuple[tuple[str, float], ...] = ()
        self._base: BaseFacts | None = None
        self._lock = threading.Lock()
        self._prepared: dict[str, tuple[tuple[Any, ...], PreparedLora]] = {}

    def entries(self) -> list[LoraEntry]:
        return discover_loras(self.lora_dir)

    def base(self) -> BaseFacts:
        with self._lock:
            return self._base_locked()

    def _base_locked(self) -> BaseFacts:
        if self._base is None:
            self._base = read_base(self.model_path)
        return self._base

    def prepare(self, name: str) -> PreparedLora:
        """The adapter `name`, converted if needed and checked against the model (cached)."""
        entry = resolve_lora(self.lora_dir, name)
        try:
            state = _state(entry)
        except OSError as exc:
            raise LoraError(f"LoRA {name!r} could not be read: {exc}") from None
        hit = self._prepared.get(name)  # no lock for a hit: the engine thread asks too, and
        if hit is not None and hit[0] == state:  # must not wait behind another conversion
            return hit[1]
        with self._lock:
            hit = self._prepared.get(name)
            if hit is not None and hit[0] == state:
                return hit[1]
            base = self._base_locked()
            path = ensure_gguf(entry.path, base, name) if entry.kind == "peft" else entry.path
            alpha, ranks, num = check_adapter(path, base, name)
            prepared = PreparedLora(name, entry.kind, path, alpha, ranks, num)
            self._prepared[name] = (state, prepared)
            log.info(
                "LoRA %s ready: %s, %d tensors, rank %s, alpha %g",
                name,
                path.name,
                num,
                "/".join(map(str, ranks)),
                alpha,
            )
            return prepared

    def prepared_path(self, name: str) -> Path:
        """The GGUF to load for `name` (the backend's `source` for adapters requests name)."""
        return self.prepare(name).path

    def check_request(self, adapters: Sequence[tuple[str, float]]) -> None:
        """A request's `loras`: RequestError (400) unless every one can be used."""
        seen: set[str] = set()
        for name, scale in adapters:
            if name in seen:
                raise RequestError(f"loras: {name!r} is listed twice", "invalid_request_error")
            seen.add(name)
            if scale < 0:
                raise RequestError(f"loras: the scaling of {name!r} must be >= 0")
            try:
                self.prepare(name)
            except LoraError as exc:
                raise RequestError(str(exc)) from None


def attach_library(lora_dir: Path | None, model_path: Path, backend: Backend) -> LoraLibrary | None:
    """Give a freshly loaded model its library (None when the backend reports no adapter
    support): the backend loads adapters requests name through it, and the engine client is
    started with its `check_request`, so it checks them before accepting a request."""
    host = backend.capabilities.adapters
    if host is None or lora_dir is None:
        return None
    library = LoraLibrary(lora_dir, model_path)
    host.source = library.prepared_path
    return library
