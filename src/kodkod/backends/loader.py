"""The backend loader the server uses: where a model's llama.cpp context lives.

A model with `rpc_servers` runs in an engine child process (`rpc_child.ChildBackend`): ggml's
RPC client aborts the process whose worker stops answering, and that must not be the server.
Every other load (local CPU or GPUs, vocabulary-only probes) is an in-process
`LlamaCppBackend`, with nothing in between.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kodkod.backends.llamacpp.backend import LlamaCppBackend
from kodkod.backends.rpc_child.backend import ChildBackend
from kodkod.core.backend_types import ContextConfig, ModelInfo, ModelSource


def load_backend(
    source: ModelSource,
    make_config: Callable[[ModelInfo], ContextConfig] | None,
    *,
    split_mode: str | None = None,
    tensor_split: Sequence[float] = (),
    rpc_servers: Sequence[str] = (),
) -> LlamaCppBackend | ChildBackend:
    """`models.draft.BackendLoader`: a child-process backend for RPC loads, else in-process."""
    if rpc_servers and make_config is not None and not source.vocab_only:
        return ChildBackend.load(source, make_config, tensor_split=tensor_split, rpc_servers=rpc_servers)
    return LlamaCppBackend.load(
        source, make_config, split_mode=split_mode, tensor_split=tensor_split, rpc_servers=rpc_servers
    )
