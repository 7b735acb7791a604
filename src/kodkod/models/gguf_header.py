"""`general.architecture` of a GGUF file, and whether it embeds, from its header alone (a few
reads, no full parse).

The model list must never offer an encoder (a BERT-family embedding model) as a chat model, and
listing runs on every `/v1/models`, so it reads only the start of the key/value section: the
architecture key comes first in every GGUF writer we know of, and the walk gives up after
`MAX_KEYS` keys or on anything unexpected (then the file is listed, as before).
`read_roles` also reads the architecture's pooling type and causal flag: a causal model that
declares no pooling is a text generator, not an embedding model.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = b"GGUF"
MAX_KEYS = 64
MAX_STRING_BYTES = 1 << 16
# Encoder-only architectures llama.cpp knows: they embed, they do not generate text.
ENCODER_ARCHITECTURES = frozenset(
    {
        "bert",
        "nomic-bert",
        "nomic-bert-moe",
        "jina-bert-v2",
        "jina-bert-v3",
        "modern-bert",
        "neo-bert",
        "t5encoder",
    }
)

# GGUF value types → fixed sizes in bytes (string = 8, array = 9 are variable)
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_UINT32, _BOOL, _STRING, _ARRAY = 4, 7, 8, 9


@dataclass(frozen=True, slots=True)
class GgufRoles:
    """What the header says about how a model may be used."""

    architecture: str
    pooling_type: int | None  # `<arch>.pooling_type`; None when the file declares none
    causal: bool  # `<arch>.attention.causal` (true when absent, as llama.cpp assumes)
    # every architecture key was seen: all keys read, or the tokenizer keys (written after
    # the architecture's) reached
    complete: bool = True

    @property
    def encoder(self) -> bool:
        """Only embeds: never a chat model."""
        return self.architecture in ENCODER_ARCHITECTURES

    @property
    def text_generator(self) -> bool:
        """A causal model without a pooling type: a chat model, not an embedding model."""
        return self.complete and not self.encoder and self.causal and self.pooling_type is None


class _Malformed(Exception):
    pass


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _Malformed
    return data


def _u32(f: BinaryIO) -> int:
    return int(struct.unpack("<I", _read(f, 4))[0])


def _u64(f: BinaryIO) -> int:
    return int(struct.unpack("<Q", _read(f, 8))[0])


def _string(f: BinaryIO) -> bytes:
    n = _u64(f)
    if n > MAX_STRING_BYTES:
        raise _Malformed
    return _read(f, n)


def _skip(f: BinaryIO, vtype: int) -> None:
    if vtype in _FIXED:
        f.seek(_FIXED[vtype], 1)
    elif vtype == _STRING:
        f.seek(_u64(f), 1)
    elif vtype == _ARRAY:
        item, count = _u32(f), _u64(f)
        if item in _FIXED:
            f.seek(_FIXED[item] * count, 1)
        elif item == _STRING:
            for _ in range(count):
                f.seek(_u64(f), 1)
        else:
            raise _Malformed  # nested arrays: not worth walking for a listing
    else:
        raise _Malformed


def _walk(path: Path, pooling_too: bool) -> GgufRoles | None:
    """The header's roles; with `pooling_too` False it stops at the architecture key."""
    try:
        with path.open("rb") as f:
            if _read(f, 4) != MAGIC:
                return None
            version = _u32(f)
            if version < 2:
                return None
            _u64(f)  # tensor count
            num_keys = _u64(f)
            arch: str | None = None
            pooling: int | None = None
            causal = True
            complete = num_keys <= MAX_KEYS
            for _ in range(min(num_keys, MAX_KEYS)):
                key = _string(f).decode("utf-8", "replace")
                vtype = _u32(f)
                if arch is not None and key.startswith("tokenizer."):
                    complete = True
                    break
                if key == "general.architecture" and vtype == _STRING:
                    arch = _string(f).decode("utf-8", "replace")
                    if not pooling_too:
                        break
                elif arch is not None and key == f"{arch}.pooling_type" and vtype == _UINT32:
                    pooling = _u32(f)
                elif arch is not None and key == f"{arch}.attention.causal" and vtype == _BOOL:
                    causal = _read(f, 1) != b"\0"
                else:
                    _skip(f, vtype)
    except (OSError, _Malformed, struct.error):
        return None
    return None if arch is None else GgufRoles(arch, pooling, causal, complete)


def read_architecture(path: Path) -> str | None:
    """The file's `general.architecture`, or None (not GGUF, unreadable, or not found early)."""
    roles = _walk(path, pooling_too=False)
    return None if roles is None else roles.architecture


def read_roles(path: Path) -> GgufRoles | None:
    """Architecture, pooling type and causal flag among the first `MAX_KEYS` keys (None: not a
    readable GGUF, or no architecture found)."""
    return _walk(path, pooling_too=True)


def is_encoder(path: Path) -> bool:
    """True for a GGUF whose architecture only embeds (never a chat model)."""
    return read_architecture(path) in ENCODER_ARCHITECTURES
