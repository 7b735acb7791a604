"""Adapter groups: which LoRA set each sequence runs with, and one set per decode.

llama.cpp applies LoRA adapters to the whole context, so one `llama_decode` can only compute
sequences that use the same adapter set. Each sequence carries an `AdapterKey`
(`core.types`), resolved by the backend's adapter host when the sequence is created:

* the scheduler plans each step for one group only (`pick_group`: its decode rows and, unless
  batch invariance is on, its prompt chunks), taking the groups in turn (round robin by key),
  so concurrent requests with different adapters each advance;
* the prefix cache only matches slots computed under the same key (`engine/kv.py`);
* the loop switches the context to the plan's key right before `decode` (`use_adapters`).

Keys name adapters by load id, not by name: after an adapter is reloaded, KV computed with
the old one is never reused. Exclusive work may load or free adapters (/v1/lora/load), so
afterwards sequences that are still waiting are resolved again (`refresh_waiting`): those
following the active set pick up the new one (TabbyAPI: requests wait for the LoRA swap);
those naming an adapter that was freed load it again on first use like any request does, or
end with an error when it cannot be loaded. (A preempted sequence waiting to recompute is
resolved again too: it continues with the new set.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from kodkod.core.types import AdapterKey
from kodkod.engine.backend import Backend
from kodkod.engine.group import members

if TYPE_CHECKING:
    from kodkod.engine.sequence import Sequence


def resolve_adapters(backend: Backend, wanted: tuple[tuple[str, float], ...] | None) -> AdapterKey:
    """The key for a request's adapters (None: the active set). Raises (AdapterError,
    ValueError) with a user-facing message when they cannot be used."""
    host = backend.capabilities.adapters
    if host is None:
        if wanted and any(scale != 0.0 for _, scale in wanted):
            raise ValueError("this model backend does not support LoRA adapters")
        return ()
    return host.key_for(wanted)


def use_adapters(backend: Backend, key: AdapterKey) -> None:
    """Make the context compute with `key`'s adapters (no-op when already in use)."""
    host = backend.capabilities.adapters
    if host is not None:
        host.use(key)
    elif key:
        raise ValueError("this model backend does not support LoRA adapters")


def pick_group(decoders: list[Sequence], last: AdapterKey | None) -> list[Sequence]:
    """The decoders of one adapter group: the smallest key after `last` (wrapping around), so
    groups take turns. With a single group (the usual case) that is every decoder."""
    if not decoders:
        return decoders
    first = decoders[0].adapter_key
    if all(s.adapter_key == first for s in decoders):
        return decoders
    keys = sorted({s.adapter_key for s in decoders})
    key = next((k for k in keys if last is not None and k > last), keys[0])
    return [s for s in decoders if s.adapter_key == key]


def refresh_waiting(
    waiting: Iterable[Sequence], backend: Backend, fail: Callable[[Sequence, str], None]
) -> None:
    """Resolve the keys of sequences not yet admitted again (after adapters changed)."""
    if backend.capabilities.adapters is None:
        return
    for seq in list(waiting):
        try:
            key = resolve_adapters(backend, seq.request.adapters)
        except Exception as exc:
            fail(seq, f"LoRA adapters unavailable: {exc}")
            continue
        for s in members(seq):
            s.adapter_key = key
