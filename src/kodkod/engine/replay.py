"""Replaying the scheduler's KV operations (engine/plan.py) on the backend, in order, before a
step's decode — and on the draft model's context when speculative decoding mirrors them."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kodkod.engine.backend import Backend
from kodkod.engine.host_cache import HostPrefixCache
from kodkod.engine.plan import CopyPrefix, KVOp, Offload, Restore, Truncate


def replay_kv_ops(
    backend: Backend,
    ops: Iterable[KVOp],
    host: HostPrefixCache | None,
    mirror: Callable[[CopyPrefix | Truncate], None] | None,
) -> None:
    for op in ops:
        if isinstance(op, CopyPrefix):
            backend.kv_copy(op.src, op.dst, 0, op.length)
        elif isinstance(op, Truncate):
            backend.kv_remove(op.slot, op.length, -1)
        elif isinstance(op, Offload):
            assert host is not None
            host.stored(op.entry, backend.kv_save(op.slot))
            continue  # the draft keeps its copy until the Truncate that follows
        elif isinstance(op, Restore):
            assert op.entry.data is not None
            backend.kv_restore(op.slot, op.entry.data)
            continue  # the draft has nothing for this slot yet: it catches up lazily
        if mirror is not None:
            mirror(op)
