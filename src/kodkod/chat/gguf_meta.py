"""Chat-related metadata of a GGUF file, read with `gguf.GGUFReader` (no llama.cpp needed).

`read_gguf_chat_info(path)` returns the default chat template (`tokenizer.chat_template`), the
named ones (`tokenizer.chat_template.<name>`, listed in `tokenizer.chat_templates`) and the
text of the BOS/EOS/PAD/UNK tokens -- everything `find_template()` and `ChatTemplate.render()`
need. Only the few tokens asked for are decoded, so large vocabularies cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GGUFChatInfo", "read_gguf_chat_info"]

TEMPLATE_KEY = "tokenizer.chat_template"
TOKENS_KEY = "tokenizer.ggml.tokens"


@dataclass(slots=True)
class GGUFChatInfo:
    """Chat template sources and special-token strings of one GGUF file."""

    chat_template: str | None = None
    named_templates: dict[str, str] = field(default_factory=dict)
    bos_token: str = ""
    eos_token: str = ""
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos_token: bool | None = None


def read_gguf_chat_info(path: Path) -> GGUFChatInfo:
    """Read the chat template(s) and special tokens; raises OSError/ValueError on a bad file."""
    from gguf import GGUFReader  # imported lazily: only model loading needs it

    reader = GGUFReader(str(path))
    fields = reader.fields

    def scalar(key: str) -> Any:
        item = fields.get(key)
        return item.contents() if item is not None and item.types else None

    def token(key: str) -> str | None:
        token_id = scalar(key)
        tokens = fields.get(TOKENS_KEY)
        if not isinstance(token_id, int) or tokens is None or not 0 <= token_id < len(tokens.data):
            return None
        text = tokens.contents(token_id)
        return text if isinstance(text, str) else None

    named: dict[str, str] = {}
    prefix = TEMPLATE_KEY + "."
    for key in fields:
        if key.startswith(prefix):
            source = scalar(key)
            if isinstance(source, str):
                named[key[len(prefix) :]] = source
    template = scalar(TEMPLATE_KEY)
    add_bos = scalar("tokenizer.ggml.add_bos_token")
    return GGUFChatInfo(
        chat_template=template if isinstance(template, str) else None,
        named_templates=named,
        bos_token=token("tokenizer.ggml.bos_token_id") or "",
        eos_token=token("tokenizer.ggml.eos_token_id") or "",
        pad_token=token("tokenizer.ggml.padding_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        add_bos_token=add_bos if isinstance(add_bos, bool) else None,
    )
